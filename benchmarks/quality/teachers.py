"""The data files and the two teachers: pre-trained once (the trainer's `teachers.N.pretrain`, CE only,
cached in `$XTOKEN_CACHE/teachers/`, `protocol.pretrain_config`) and their top-k caches written once
(`teacher_cache.writer.write_cache`) into `$XTOKEN_CACHE/quality/<teacher>-k<K>-<key>/`, the key being
what determines the cache (the teacher's identity, the data files' hashes, K, the positions budget),
so every arm, seed and later invocation reads the same cache.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.quality.digits import is_digit_heavy, write_atomic
from benchmarks.quality.protocol import CROSS, SAME, Protocol, pretrain_config, teachers_config

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "corpus"


def quality_cache() -> Path:
    """`$XTOKEN_CACHE/quality` (the trainer's cache root, default data/cache/)."""
    from xtoken_loss.trainer.prepare import cache_root

    return cache_root() / "quality"


@dataclass(frozen=True)
class DataFiles:
    train: Path
    heldout: Path
    heldout_docs: int
    digit_docs: int


def _subset(src: Path, keep, tag: str) -> Path:
    """The lines of `src` that `keep(index, record)` accepts, in order, as a JSONL file in the quality
    cache named by their content hash (an existing one is reused: same name, same bytes)."""
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    chosen = "".join(line for j, line in enumerate(lines) if line.strip() and keep(j, json.loads(line)))
    digest = hashlib.sha256(chosen.encode()).hexdigest()[:16]
    out = quality_cache() / "data" / f"{tag}-{digest}.jsonl"
    if not out.is_file():
        write_atomic(out, chosen)
    return out


def data_files(p: Protocol) -> DataFiles:
    """The protocol's train and held-out files: the bundled splits, or their first lines (the held-out
    subset always keeps the digit-heavy documents, so the digit BPB is defined)."""
    train, heldout = CORPUS / "train.jsonl", CORPUS / "heldout.jsonl"
    if p.train_lines is not None:
        train = _subset(train, lambda j, r: j < p.train_lines, f"train-{p.train_lines}")
    if p.heldout_lines is not None:
        heldout = _subset(heldout, lambda j, r: j < p.heldout_lines or is_digit_heavy(r), f"heldout-{p.heldout_lines}")
    records = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines() if line.strip()]
    return DataFiles(train, heldout, len(records), sum(map(is_digit_heavy, records)))


@dataclass
class Teacher:
    name: str
    model: Path  # the pre-trained final/ directory
    cache: Path
    pretrain_dir: Path
    heldout_bpb: float  # the pre-training run's final held-out bits per byte (its own context windows)
    pretrain_s: float | None  # None: found in the cache
    cache_s: float | None


def _last_bpb(run_dir: Path) -> float:
    from xtoken_loss.trainer.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir) if "eval/bpb" in r]
    return float(evals[-1]["eval/bpb"]) if evals else float("nan")


def cache_dir_for(cfg, i: int, top_k: int) -> Path:
    """Where teacher i's top-k cache of `cfg` lives, keyed by what determines its content."""
    from xtoken_loss.trainer.prepare import config_key
    from xtoken_loss.trainer.run import sample_max_chars
    from xtoken_loss.trainer.teacher_cache.writer import teacher_budget, teacher_identity
    from xtoken_loss.trainer.vocab_remap import file_sha256

    key = config_key({"identity": teacher_identity(cfg, i), "budget": teacher_budget(cfg, i), "top_k": top_k,
                      "train": file_sha256(cfg.data.train), "eval": file_sha256(cfg.data.eval),
                      "max_chars": sample_max_chars(cfg), "max_length": cfg.data.max_length})
    return quality_cache() / f"{cfg.teachers[i].name}-k{top_k}-{key}"


def check_rows(pre_cfg, arm_cfg, i: int, *, strict: bool = True, log=print) -> int:
    """The arms' restricted rows of teacher i must be rows the pre-trained teacher has (its pieces are
    longer): otherwise its exported final/ has untrained zero rows there. ConfigError naming them
    (`strict=False`, the smoke configuration's corpus slice: a logged warning); returns their number."""
    from xtoken_core.errors import ConfigError
    from xtoken_loss.trainer.prepare import _load_tok, cache_root
    from xtoken_loss.trainer.run import sample_max_chars
    from xtoken_loss.trainer.vocab_remap import build_remap

    t = arm_cfg.teachers[i]
    tok = _load_tok(t.tokenizer, f"teachers.{i}.tokenizer")
    files = [arm_cfg.data.train, arm_cfg.data.eval]
    ids = {}
    for name, c in (("pre", pre_cfg), ("arm", arm_cfg)):
        remap = build_remap(tok, files, max_chars=sample_max_chars(c), cache_dir=cache_root() / "remaps")
        ids[name] = set(map(int, remap.used_ids))
    missing = sorted(ids["arm"] - ids["pre"])
    if missing:
        msg = (f"teacher {t.name}: {len(missing)} token ids of the arms' data (e.g. {missing[:5]}) are not in the "
               "pre-training's restricted rows (its longer pieces tokenize differently)")
        if strict:
            raise ConfigError(msg)
        log(f"warning: {msg}; their rows are untrained zeros")
    return len(missing)


def prepare_teachers(p: Protocol, files: DataFiles, log=print) -> dict[str, Teacher]:
    """Pre-train both teachers and write their caches where missing; teacher name -> `Teacher`."""
    from xtoken_loss.trainer.config import TrainConfig
    from xtoken_loss.trainer.distributed import init_distributed
    from xtoken_loss.trainer.prepare import cache_lock
    from xtoken_loss.trainer.run import pretrain_config as trainer_pretrain_config
    from xtoken_loss.trainer.run import teacher_source
    from xtoken_loss.trainer.teacher_cache.writer import write_cache

    pre = TrainConfig.from_dict(pretrain_config(p, str(files.train), str(files.heldout)))
    dist = init_distributed(pre.parallel.device)
    models, pdirs, pre_s = {}, {}, {}
    for i, name in enumerate((CROSS, SAME)):
        pdirs[name] = Path(trainer_pretrain_config(pre, i).output_dir)
        pre_s[name] = None
        if not (pdirs[name] / "final" / "config.json").exists():
            log(f"teacher {name}: pre-training {p.teacher_steps} steps (CE only) into {pdirs[name]}")
            t0 = time.perf_counter()
            teacher_source(pre, i, dist)
            pre_s[name] = time.perf_counter() - t0
        models[name] = str(teacher_source(pre, i, dist))  # the cached final/ (nothing is trained again)
    cfg = TrainConfig.from_dict(teachers_config(p, str(files.train), str(files.heldout), models))
    out = {}
    for i, name in enumerate((CROSS, SAME)):
        assert cfg.teachers[i].name == name
        check_rows(pre, cfg, i, strict=p.strict_rows, log=log)
        cache = cache_dir_for(cfg, i, p.top_k)
        cache_s = None
        with cache_lock(cache.with_name(cache.name + ".lock"), f"the teacher cache {cache.name}"):
            if not (cache / "cache.json").exists():
                log(f"teacher {name}: writing its top-{p.top_k} cache into {cache}")
                t0 = time.perf_counter()
                write_cache(cfg, i, cache, top_k=p.top_k, batch_size=p.cache_batch_size, dist=dist)
                cache_s = time.perf_counter() - t0
        out[name] = Teacher(name, Path(models[name]), cache, pdirs[name], _last_bpb(pdirs[name]), pre_s[name],
                            cache_s)
        took = "cached" if pre_s[name] is None and cache_s is None else (
            f"pre-training {pre_s[name] or 0:.0f} s, cache {cache_s or 0:.0f} s")
        log(f"teacher {name}: held-out BPB {out[name].heldout_bpb:.4f} in its pre-training run ({took})")
    return out
