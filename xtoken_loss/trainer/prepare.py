"""What a run needs before any model is loaded: the tokenizers, the checks of the config against
them (projection artifacts, same-vocab teachers, data files, the run directory), and the cached
inputs built once and shared between runs (vocabulary remaps, `projection: auto` artifacts,
pre-trained demo teachers).

The cache lives outside `output_dir`: `$XTOKEN_CACHE`, default `data/cache/`. Each entry is keyed by
the resolved config that makes it (never the student's seed, `max_steps` or `output_dir`), so a
second run reuses it. Under torchrun rank 0 builds the remaps and projections while the others wait
at a barrier; a teacher's pre-training is itself a (collective) trainer run, resumable if killed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from xtoken_align import load_tokenizer
from xtoken_align.tokenizer.loader import TokenizerInfo
from xtoken_core.errors import XTokenError
from xtoken_loss.projection import load_projection
from xtoken_loss.trainer.config import TrainConfig, TrainConfigError

RUN_MARKER = ".xtoken-run"  # written into every output_dir this trainer creates


def cache_root() -> Path:
    return Path(os.environ.get("XTOKEN_CACHE", "data/cache"))


def config_key(obj) -> str:
    """A short stable hash of a JSON-able object (the cache key of what it describes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Sides:
    """The tokenizers of a run: the student's and each teacher's (in config order)."""

    student: TokenizerInfo
    teachers: list[TokenizerInfo]


def _load_tok(name: str, key: str) -> TokenizerInfo:
    try:
        return load_tokenizer(name)
    except XTokenError as exc:
        raise TrainConfigError(f"{key}: {exc}") from None


def check_run_dir(cfg: TrainConfig) -> None:
    """`output_dir` is new, empty, or a run of ours (`resume=true` to continue it)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainConfigError(f"output_dir {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / RUN_MARKER).exists():
        raise TrainConfigError(f"output_dir {out} is not empty and was not created by xtoken-train; choose another "
                               "output_dir (nothing there is overwritten)")
    if not cfg.resume:
        raise TrainConfigError(f"output_dir {out} already holds a run: pass resume=true to continue it, or choose "
                               "another output_dir")


def preflight(cfg: TrainConfig) -> Sides:
    """Every check that needs no model, in seconds: data files, tokenizers, projections, the run
    directory. Raises `TrainConfigError` naming the key."""
    for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if path is not None and not Path(path).is_file():
            raise TrainConfigError(f"{key}: file {path} does not exist")
    student = _load_tok(cfg.student.tokenizer, "student.tokenizer")
    teachers = []
    for i, t in enumerate(cfg.teachers):
        info = _load_tok(t.tokenizer, f"teachers.{i}.tokenizer")
        teachers.append(info)
        if t.same_vocab and info.fingerprint != student.fingerprint:
            raise TrainConfigError(
                f"teachers.{i}: loss {t.loss!r} is same-vocab, but its tokenizer {t.tokenizer!r} differs from the "
                f"student's {cfg.student.tokenizer!r} (fingerprints {info.fingerprint[:19]}... vs "
                f"{student.fingerprint[:19]}...); use a cross-tokenizer loss (pkl, hkl, gold, uld, alm)")
        if t.projection not in (None, "auto"):
            p = Path(t.projection)
            if not p.exists():
                raise TrainConfigError(f"teachers.{i}.projection: {p} does not exist (give an artifact directory "
                                       "from `xtoken-align build-projection`, or 'auto')")
            try:
                load_projection(p, student_fingerprint=student.fingerprint, teacher_fingerprint=info.fingerprint)
            except XTokenError as exc:
                raise TrainConfigError(f"teachers.{i}.projection: {exc}") from None
    _check_model_path("student.model", cfg.student.model)
    for i, t in enumerate(cfg.teachers):
        _check_model_path(f"teachers.{i}.model", t.model)
    check_run_dir(cfg)
    return Sides(student, teachers)


def _check_model_path(key: str, model) -> None:
    """A model given as a local path must be a directory with a config.json (a Hub name is checked
    when it is loaded)."""
    if not isinstance(model, str):
        return
    p = Path(model).expanduser()
    looks_local = model.startswith(("/", ".", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        what = "does not exist" if not p.exists() else "holds no config.json (not a Hugging Face model directory)"
        raise TrainConfigError(f"{key}: {model} {what}")


@contextmanager
def cache_lock(path: Path, what: str, *, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a file beside a cache entry) while building the entry: a
    second run that needs the same entry waits, then finds it built (`fcntl.flock`, POSIX)."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another run that is building {what} ({path})", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def auto_projection(student: TokenizerInfo, teacher: TokenizerInfo, teacher_width: int, dist) -> Path:
    """The cached default projection student -> teacher (built by rank 0; the others wait)."""
    from xtoken_align import ProjectionConfig, build_projection

    pcfg = ProjectionConfig(teacher_model_vocab_size=teacher_width)
    key = config_key({"student": student.fingerprint, "teacher": teacher.fingerprint, "config": pcfg.to_dict()})
    path = cache_root() / "projections" / f"{student.name}-{teacher.name}-{key}".replace("/", "_")
    with cache_lock(path.with_name(path.name + ".lock"), f"the projection {path.name}", enabled=dist.is_main):
        if dist.is_main and not (path / "projection.json").exists():
            build_projection(student, teacher, pcfg).save(path)
        dist.barrier()
    return path
