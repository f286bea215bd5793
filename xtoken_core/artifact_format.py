"""The on-disk artifact format (CONTRACTS §4): one definition, one reader, one writer.

An artifact is a directory with `<kind>.json` (the description) and safetensors files (the arrays).
Everything that reads or writes one goes through this module: the projection builder and
`read_projection` (`xtoken_align.projection.artifacts`), the loss library's `load_projection`,
`LearnedProjection.save` and GOLD's exact rows (`xtoken_loss`), and the alignment artifacts
(`xtoken_align.batch.alignment_artifacts`). It imports only numpy, safetensors and json, so both
packages use it without pulling in each other's dependencies.

Conventions shared by every kind:
- `<kind>.json` holds `schema_version` (integer, `SCHEMA_VERSION`), `kind`, the tokenizers
  (`{name, fingerprint, vocab_size, model_vocab_size}`, `tokenizer_meta`), the method and its
  parameters, statistics and `created_with`. Readers check the schema version, the kind and the keys
  they need; keys they do not know are ignored.
- Each description records the content hash of the tensors file(s) it describes
  (`tensors_sha256`, `"sha256:<hex>"`; per shard for alignments), so readers refuse a tensors file
  swapped in or edited (`ArtifactError` naming it); one without the key loads with an
  `ArtifactWarning`.
- Writing (`atomic_dir`) replaces only the writer's own files and each of them atomically, the
  descriptions last, under a writer lock (`fcntl.flock`) that refuses a concurrent writer; a
  directory holding anything else is refused. The protocol is spelled out at the writer below and
  in docs/contracts.md §4.
- Reading checks, when the caller passes tokenizers (or fingerprint strings), that the artifact was
  built for them (`check_tokenizers`); any difference raises `ArtifactError` naming both tokenizers.

Projections (`kind: "projection"`): `projection.safetensors` holds `indices [R, K]` int64 (-1 = empty
slot), `weights [R, K]` float32 (0 in empty slots) and optionally `row_kind [R]` uint8
(`ROW_KIND_NAMES`); rows are the row side's ids (R = its model vocab size), columns the other side's
tokenizer ids. `--both-directions` adds the reverse direction under `teacher_to_student/`.
`validate_projection` holds the one rule set for these tensors, on disk or built in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from xtoken_core.errors import ArtifactError, ArtifactNotFoundError

SCHEMA_VERSION = 1

# --- projection artifacts ------------------------------------------------------------------------
PROJECTION_KIND = "projection"
PROJECTION_JSON = "projection.json"
PROJECTION_TENSORS = "projection.safetensors"
STUDENT_TO_TEACHER = "student_to_teacher"
TEACHER_TO_STUDENT = "teacher_to_student"
DIRECTIONS = (STUDENT_TO_TEACHER, TEACHER_TO_STUDENT)
REVERSE_SUBDIR = TEACHER_TO_STUDENT  # the reverse direction's subdirectory is named after it
PROJECTION_REQUIRED_KEYS = ("direction", "student", "teacher", "top_k")
ROW_SUM_TOLERANCE = 1e-4  # |sum - 1| allowed for a mapped row read from disk (float32 rounding is ~1e-7)

# Row kinds stored in `row_kind [R] uint8`: the code is the position in this table.
ROW_KIND_NAMES = ("unmapped", "exact", "special", "decomposed", "reverse_only", "corpus_only", "padded", "unused")
(ROW_UNMAPPED, ROW_EXACT, ROW_SPECIAL, ROW_DECOMPOSED, ROW_REVERSE_ONLY, ROW_CORPUS_ONLY, ROW_PADDED,
 ROW_UNUSED) = range(len(ROW_KIND_NAMES))

# --- alignment artifacts -------------------------------------------------------------------------
ALIGNMENT_KIND = "alignment"
ALIGNMENT_JSON = "alignment.json"


def alignment_shard_name(k: int) -> str:
    """File name of alignment shard `k` (`alignment-00000.safetensors`, ...)."""
    return f"alignment-{k:05d}.safetensors"


_REBUILD = {
    PROJECTION_KIND: "rebuild the projection for these tokenizers (`xtoken-align build-projection`)",
    ALIGNMENT_KIND: "rebuild the alignment artifact for these tokenizers (`xtoken-align align --out`)",
}


def created_with() -> str:
    from xtoken_core import __version__

    return f"xtoken {__version__}"


def tokenizer_meta(info, model_vocab_size: int | None = None) -> dict:
    """`{name, fingerprint, vocab_size, model_vocab_size}` of a `TokenizerInfo` (model vocab size
    defaults to the tokenizer's vocab size)."""
    return {
        "name": info.name,
        "fingerprint": info.fingerprint,
        "vocab_size": int(info.vocab_size),
        "model_vocab_size": int(model_vocab_size if model_vocab_size is not None else info.vocab_size),
    }


# --- writing: one writer, replacing only its own files ------------------------------------------
#
# Replacement protocol (docs/contracts.md §4). `out` stays a plain directory: the writer
# 1. refuses `out` unless it is new, empty, or holds only files of a previous artifact of the same
#    kind (`own_file`), and refuses a missing parent directory (it is never created);
# 2. takes the writer lock `out/.xtoken-write.lock` (`fcntl.flock`, non-blocking: a second writer
#    is refused, never raced), creating `out` itself if needed;
# 3. removes stale temporaries of killed runs (`.NAME.tmp-*` inside `out`, and the sibling
#    `.OUT.tmp-*` / `.OUT.old-*` directories older versions made);
# 4. has the caller write the new files into a staging directory `out/.xtoken-staging.tmp-*`;
# 5. moves each staged file into place with `os.replace` (atomic per file): tensors first, each
#    `<kind>.json` last, so the description that records the tensors' `tensors_sha256` appears
#    after them; then removes the previous artifact's files the new one does not have;
# 6. unlinks the lock.
# At every instant each path holds a complete old or new file; a reader that pairs an old JSON with
# new tensors sees the hash differ and reads again (`_read_described`).

TENSORS_SHA256 = "tensors_sha256"
LOCK_NAME = ".xtoken-write.lock"
STAGING_PREFIX = ".xtoken-staging"
_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-z_]+$")  # `.NAME.tmp-<suffix>`: a temporary of a writer
_OWN_FILES = {  # marker -> the files (relative posix paths) an artifact of that kind consists of
    PROJECTION_JSON: re.compile(rf"^(?:{REVERSE_SUBDIR}/)?projection\.(?:json|safetensors)$"),
    ALIGNMENT_JSON: re.compile(r"^alignment(?:\.json|-\d{5,}\.safetensors)$"),
}
_OWN_DIRS = {PROJECTION_JSON: (REVERSE_SUBDIR,), ALIGNMENT_JSON: ()}
_KIND_OF = {PROJECTION_JSON: PROJECTION_KIND, ALIGNMENT_JSON: ALIGNMENT_KIND}
_RACE_WAIT_S = 10.0  # how long a reader waits for a writer that is between its renames


class ArtifactWarning(UserWarning):
    """An artifact can be read but not fully checked (e.g. it records no `tensors_sha256`)."""


def sha256_of(data: bytes) -> str:
    """`"sha256:<hex>"` of `data`, the form `tensors_sha256` records."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def own_file(marker: str, rel: str) -> bool:
    """Whether `rel` (a path relative to the artifact directory, `/`-separated) is a file an
    artifact with this `marker` (`projection.json`, `alignment.json`) writes."""
    return bool(_OWN_FILES[marker].match(rel))


def _kind_name(marker: str) -> str:
    """'a projection' / 'an alignment': the kind of artifact with this marker, with its article."""
    kind = _KIND_OF.get(marker, marker)
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


def foreign_entries(out: Path, *, marker: str) -> list[Path]:
    """The entries of directory `out` that are not part of an artifact with this `marker` (nor a
    temporary or the lock of its writer); symbolic links are never followed and always foreign."""
    found: list[Path] = []

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            for entry in sorted(it, key=lambda e: e.name):
                rel = prefix + entry.name
                if _TEMP_RE.match(entry.name) and not entry.is_symlink():
                    continue
                if not prefix and entry.name == LOCK_NAME and entry.is_file(follow_symlinks=False):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if rel in _OWN_DIRS.get(marker, ()):
                        walk(Path(entry.path), rel + "/")
                    else:
                        found.append(Path(entry.path))
                elif not (entry.is_file(follow_symlinks=False) and own_file(marker, rel)):
                    found.append(Path(entry.path))

    walk(Path(out), "")
    return found


def _missing_parent(out: Path) -> Path | None:
    parent = Path(os.path.abspath(out)).parent
    return None if parent.is_dir() else parent


def check_writable(out: Path, *, marker: str) -> None:
    """Raise `ArtifactError` before any work if the writer would refuse `out`: it is not a
    directory; its parent directory is missing (never created) or not writable; or it holds
    anything but a previous artifact of this kind (`foreign_entries`: user files are never
    replaced or deleted)."""
    out = Path(out)
    kind = _kind_name(marker)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ArtifactError(f"cannot write artifact to {out}: it exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ArtifactError(f"cannot write artifact to {out}: the directory is not writable")
        foreign = foreign_entries(out, marker=marker)
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise ArtifactError(
                f"cannot write artifact to {out}: it holds {foreign[0]}{more}, which is not part of {kind} "
                f"artifact (only a previous {kind.split()[1]} artifact there is replaced; nothing else is "
                f"touched); move it away or choose a new or empty directory")
        return
    missing = _missing_parent(out)
    if missing is not None:
        what = "is not a directory" if missing.exists() else "does not exist (create it first)"
        raise ArtifactError(f"cannot write artifact to {out}: {missing} {what}")
    parent = Path(os.path.abspath(out)).parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write artifact to {out}: {parent} is not a writable directory")


class _Held(NamedTuple):
    fd: int
    thread: int
    created: bool


_HELD: dict[str, list] = {}  # realpath -> [_Held, depth]: locks this process holds
_HELD_GUARD = threading.Lock()


def _busy(out: Path) -> ArtifactError:
    return ArtifactError(f"cannot write artifact to {out}: another writer is writing it now (it holds "
                         f"{Path(out) / LOCK_NAME}); wait for it to finish or choose another directory")


def _acquire(out: Path) -> _Held:
    """Take the writer lock of `out` (creating `out` if it does not exist); refuse if it is held."""
    import fcntl

    created = False
    lock = out / LOCK_NAME
    for _ in range(100):
        try:
            os.mkdir(out)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise ArtifactError(f"cannot write artifact to {out}: {exc.strerror or exc}") from None
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)
        except FileNotFoundError:  # `out` was removed by a writer that failed: create it again
            continue
        except OSError as exc:
            raise ArtifactError(f"cannot write artifact to {out}: cannot create {lock}: "
                                f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(out) from None
        try:
            same = os.path.samestat(os.stat(lock), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked while we waited for it
            return _Held(fd, threading.get_ident(), created)
        os.close(fd)
    raise _busy(out)


def _release(out: Path, held: _Held) -> None:
    try:
        os.unlink(out / LOCK_NAME)
    except FileNotFoundError:
        pass
    finally:
        os.close(held.fd)
    if held.created:  # a directory this writer made and never wrote into goes again
        try:
            os.rmdir(out)
        except OSError:
            pass


@contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Hold the writer lock of artifact directory `out` (`out/.xtoken-write.lock`, `fcntl.flock`).

    A second writer (another process or thread) is refused with `ArtifactError`; the same thread may
    nest it (the CLI takes it before the work, the writer again when it writes). `out` is created if
    missing (its parent must exist) and removed again on release if nothing was written into it."""
    out = Path(out)
    key = os.path.realpath(out)
    with _HELD_GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            if entry[0].thread != threading.get_ident():
                raise _busy(out)
            entry[1] += 1
    if entry is not None:
        try:
            yield
        finally:
            with _HELD_GUARD:
                entry[1] -= 1
        return
    missing = _missing_parent(out)
    if missing is not None:
        raise ArtifactError(f"cannot write artifact to {out}: {missing} does not exist (create it first)")
    held = _acquire(out)
    with _HELD_GUARD:
        _HELD[key] = [held, 1]
    try:
        yield
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        _release(out, held)


def writer_active(directory: Path) -> bool:
    """Whether a writer holds the lock of artifact `directory` (or of the artifact it is part of,
    e.g. the `teacher_to_student/` part). Opens the lock read-only and never creates it."""
    import fcntl

    for lock in (Path(directory) / LOCK_NAME, Path(directory).parent / LOCK_NAME):
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _clean_stale(out: Path, marker: str) -> None:
    """Remove what killed writers left: `.NAME.tmp-*` inside `out` (and its own subdirectories),
    and the sibling `.OUT.tmp-*` / `.OUT.old-*` directories of versions that wrote next to `out`.
    Called with the writer lock held, so none of them belongs to a live writer."""
    for directory in [out, *(out / d for d in _OWN_DIRS.get(marker, ()))]:
        if directory.is_dir() and not directory.is_symlink():
            for entry in directory.iterdir():
                if _TEMP_RE.match(entry.name):
                    _remove(entry)
    absolute = Path(os.path.abspath(out))
    sibling = re.compile(rf"^\.{re.escape(absolute.name)}\.(?:tmp|old)-[0-9a-z_]+$")
    for entry in absolute.parent.iterdir():
        if sibling.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _fsync(path: Path, *, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync directories
        pass
    finally:
        os.close(fd)


def _files_under(directory: Path) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        out.extend((rel / f).as_posix() for f in files)
    return sorted(out)


def _install(staging: Path, out: Path, marker: str) -> None:
    """Move the staged files into `out` (step 5 of the protocol above)."""
    new = _files_under(staging)
    for rel in new:
        if not own_file(marker, rel):
            raise ArtifactError(f"internal error: the writer staged {rel}, which is not part of "
                                f"{_kind_name(marker)} artifact")
    described = [r for r in new if not r.endswith(".json")]
    descriptions = sorted((r for r in new if r.endswith(".json")), key=lambda r: (-r.count("/"), r))
    for rel in described + descriptions:
        _fsync(staging / rel)
    for rel in described + descriptions:
        dst = out / rel
        if dst.parent != out:
            dst.parent.mkdir(exist_ok=True)
        os.replace(staging / rel, dst)
    old = [r for r in _files_under_own(out, marker) if r not in new]
    for rel in sorted(old, key=lambda r: (not r.endswith(".json"), r)):  # descriptions go first
        _remove(out / rel)
    for sub in _OWN_DIRS.get(marker, ()):
        if (out / sub).is_dir() and not any((out / sub).iterdir()):
            (out / sub).rmdir()
    for sub in ["", *_OWN_DIRS.get(marker, ())]:
        _fsync(out / sub, directory=True)


def _files_under_own(out: Path, marker: str) -> list[str]:
    """The files of a (previous) artifact in `out`: only paths `own_file` accepts, so a file
    someone put there meanwhile is never touched."""
    rels = []
    for d in ["", *_OWN_DIRS.get(marker, ())]:
        directory = out / d
        if directory.is_dir() and not directory.is_symlink():
            for entry in directory.iterdir():
                rel = (Path(d) / entry.name).as_posix()
                if entry.is_file() and not entry.is_symlink() and own_file(marker, rel):
                    rels.append(rel)
    return rels


@contextmanager
def atomic_dir(out: Path, *, marker: str) -> Iterator[Path]:
    """Yield a staging directory; on normal exit its files replace the artifact at `out`.

    The replacement protocol is described above (and in docs/contracts.md §4): `out` must be new,
    empty or hold only a previous artifact of this kind (`check_writable`); the writer lock refuses
    a concurrent writer; stale temporaries are cleaned; each file is replaced atomically with the
    `<kind>.json` descriptions last; files of the previous artifact that the new one lacks are
    removed. On an exception inside the block nothing at `out` has changed. Permissions follow the
    umask (no file or directory is made with `mkdtemp`'s 0700).
    """
    out = Path(out)
    check_writable(out, marker=marker)
    with writer_lock(out):
        check_writable(out, marker=marker)  # again, now that no other writer can change it
        try:
            _clean_stale(out, marker)
            staging = _make_staging(out)
        except OSError as exc:
            raise ArtifactError(f"cannot write artifact to {out}: {exc.strerror or exc}") from None
        try:
            yield staging
            _install(staging, out, marker)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _make_staging(out: Path) -> Path:
    while True:
        staging = out / f"{STAGING_PREFIX}.tmp-{secrets.token_hex(4)}"
        try:
            staging.mkdir()  # mode 0777 & ~umask
            return staging
        except FileExistsError:
            continue


def write_meta(path: Path, meta: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def write_tensors(path: Path, tensors: dict[str, np.ndarray], *, kind: str) -> str:
    """Write a safetensors file; returns its `sha256_of` (what `tensors_sha256` records)."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={"kind": kind, "schema_version": str(SCHEMA_VERSION)})
    with open(path, "wb") as fh:
        fh.write(data)
    return sha256_of(data)


def write_projection_files(directory: Path, indices: np.ndarray, weights: np.ndarray,
                           row_kind: np.ndarray | None, meta: dict) -> None:
    """Write one direction of a projection (`projection.safetensors` + `projection.json`) into
    `directory`, normally the staging directory of an `atomic_dir`. Tensors are stored as int64 /
    float32 / uint8; they are not validated here (the readers validate). `meta` gets the
    `tensors_sha256` of the tensors file written (in place, so the caller's copy says what is on
    disk)."""
    directory = Path(directory)
    tensors = {"indices": np.asarray(indices).astype(np.int64), "weights": np.asarray(weights).astype(np.float32)}
    if row_kind is not None:
        tensors["row_kind"] = np.asarray(row_kind).astype(np.uint8)
    meta[TENSORS_SHA256] = write_tensors(directory / PROJECTION_TENSORS, tensors, kind=PROJECTION_KIND)
    write_meta(directory / PROJECTION_JSON, meta)


# --- reading ------------------------------------------------------------------------------------

def _load_meta(path: Path, *, kind: str, required: tuple[str, ...] = ()) -> tuple[dict, bytes]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise ArtifactNotFoundError(f"{path.parent} is not a {kind} artifact: {path.name} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not an artifact description (expected a JSON object)")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema_version {version!r} is not supported (this xtoken reads "
                            f"schema_version {SCHEMA_VERSION}); rebuild the artifact with this version")
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}: kind is {meta.get('kind')!r}, expected {kind!r} (an artifact of kind "
                            f"{meta.get('kind')!r} cannot be read as one of kind {kind!r})")
    for key in required:
        if key not in meta:
            raise ArtifactError(f"{path}: `{key}` is missing; rebuild the artifact")
    return meta, raw


def read_meta(path: Path, *, kind: str, required: tuple[str, ...] = ()) -> dict:
    """Read and check an artifact's JSON: it exists, parses, has this schema version and kind, and
    holds the `required` keys. Other keys are returned as they are (readers ignore what they do
    not know)."""
    return _load_meta(path, kind=kind, required=required)[0]


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise ArtifactNotFoundError(f"{Path(path).parent} is incomplete: {Path(path).name} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse_tensors(data: bytes, path: Path, required: dict[str, np.dtype],
                   optional: dict[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    for name, dtype in {**required, **(optional or {})}.items():
        if name not in tensors:
            if name in required:
                raise ArtifactError(f"{path}: tensor {name!r} is missing (it has {sorted(tensors)})")
            continue
        if tensors[name].dtype != dtype:
            raise ArtifactError(f"{path}: tensor {name!r} is {tensors[name].dtype}, expected {np.dtype(dtype)}")
    return tensors


def read_tensors(path: Path, required: dict[str, np.dtype], optional: dict[str, np.dtype] | None = None, *,
                 sha256: str | None = None, described_by: Path | None = None) -> dict[str, np.ndarray]:
    """Load a safetensors file; the `required` tensors must exist, and they and any `optional` ones
    present must have these dtypes. With `sha256` (what the description `described_by` records as
    `tensors_sha256`) the file's content must have that hash (`check_tensors_sha256`)."""
    path = Path(path)
    data = _read_bytes(path)
    if sha256 is not None:
        check_tensors_sha256(data, sha256, path, described_by)
    return _parse_tensors(data, path, required, optional)


def _sha_mismatch(data: bytes, recorded, path: Path, described_by: Path | None) -> str | None:
    """None if `data` hashes to `recorded`; else the message (also for a malformed `recorded`)."""
    where = described_by or path.parent
    if not isinstance(recorded, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", recorded):
        return f"{where}: {TENSORS_SHA256} must be 'sha256:<64 hex digits>', got {recorded!r}; rebuild the artifact"
    got = sha256_of(data)
    if got == recorded:
        return None
    return (f"{path} does not belong to {where}: its content hash is {got}, the description records "
            f"{recorded} (the file was replaced or edited, e.g. copied in from another artifact); rebuild the "
            f"artifact or restore the file")


def check_tensors_sha256(data: bytes, recorded, path: Path, described_by: Path | None = None) -> None:
    """Raise `ArtifactError` naming `path` unless `data` (its content) hashes to `recorded`."""
    msg = _sha_mismatch(data, recorded, Path(path), described_by)
    if msg is not None:
        raise ArtifactError(msg)


def warn_unchecked(described_by: Path, what: str, *, stacklevel: int = 3) -> None:
    """The warning for an artifact without `tensors_sha256` (older xtoken, another tool);
    `stacklevel` 3 points at the caller of the function calling this."""
    warnings.warn(f"{described_by} records no {TENSORS_SHA256} (written by an older xtoken or another tool): "
                  f"{what} cannot be checked against it; rebuild the artifact to add it", ArtifactWarning,
                  stacklevel=stacklevel)


def _pause() -> None:
    """Between two attempts of a reader that found a writer mid-way."""
    time.sleep(0.01)


def _read_described(json_path: Path, tensors_path: Path, *, kind: str, required: tuple[str, ...]
                    ) -> tuple[dict, bytes]:
    """Read a description and the tensors file it records the hash of, as one consistent pair.

    A writer replaces the tensors before the description, so for a moment an old description sits
    next to new tensors: when the hash differs and the description changed meanwhile or a writer
    holds the lock, read both again (for up to `_RACE_WAIT_S`); otherwise the file was swapped or
    edited, an `ArtifactError` naming it."""
    deadline = time.monotonic() + _RACE_WAIT_S
    while True:
        meta, raw = _load_meta(json_path, kind=kind, required=required)
        try:
            data = _read_bytes(tensors_path)
        except ArtifactNotFoundError:
            if writer_active(json_path.parent) and time.monotonic() < deadline:
                _pause()
                continue
            raise
        if TENSORS_SHA256 not in meta:
            warn_unchecked(json_path, tensors_path.name, stacklevel=5)  # the caller of read_projection
            return meta, data
        msg = _sha_mismatch(data, meta[TENSORS_SHA256], tensors_path, json_path)
        if msg is None:
            return meta, data
        try:
            changed = json_path.read_bytes() != raw
        except OSError:
            changed = True
        if (changed or writer_active(json_path.parent)) and time.monotonic() < deadline:
            _pause()
            continue
        raise ArtifactError(msg)


def _fingerprint_of(x) -> str | None:
    return None if x is None else str(x if isinstance(x, str) else x.fingerprint)


def check_tokenizers(meta: dict, path: Path, **expected) -> None:
    """Compare the artifact's tokenizer fingerprints with `role=TokenizerInfo | fingerprint` pairs
    (None = not checked); raise `ArtifactError` naming, for each role that differs, the tokenizer
    the artifact was built for and the one given."""
    diffs = []
    for role, want in expected.items():
        if want is None:
            continue
        side = meta.get(role) if isinstance(meta.get(role), dict) else {}
        have, given = side.get("fingerprint"), _fingerprint_of(want)
        if have is None or str(have) != given:
            name = getattr(want, "name", None)
            diffs.append(f"{role} tokenizer differs (artifact: {side.get('name')!r}, fingerprint {have}; given: "
                         f"{name + ', ' if name else ''}fingerprint {given})")
    if diffs:
        rebuild = _REBUILD.get(meta.get("kind"), "rebuild it for these tokenizers")
        raise ArtifactError(f"{path} was built for other tokenizers: " + "; ".join(diffs) + f"; {rebuild}")


# --- projections: one validator, one reader ------------------------------------------------------

class ProjectionFiles(NamedTuple):
    """One direction of a projection as read from disk (numpy arrays, validated)."""

    indices: np.ndarray  # [R, K] int64, -1 = empty slot
    weights: np.ndarray  # [R, K] float32, 0 in empty slots
    row_kind: np.ndarray | None  # [R] uint8, ROW_* codes
    meta: dict  # the projection.json content
    path: Path  # the directory read


def projection_sides(meta: dict) -> tuple[str, str]:
    """`(rows side, columns side)` of a projection direction: ("student", "teacher") or the reverse."""
    return ("student", "teacher") if meta.get("direction") == STUDENT_TO_TEACHER else ("teacher", "student")


def model_vocab_size(side: dict) -> int:
    """A tokenizer entry's model vocab size (its vocab size when none is recorded)."""
    return int(side.get("model_vocab_size") or side["vocab_size"])


def validate_projection(indices: np.ndarray, weights: np.ndarray, row_kind: np.ndarray | None = None, *,
                        num_rows: int | None = None, top_k: int | None = None, num_columns: int | None = None,
                        columns: str = "teacher", row_sums: bool = False, where: str = "projection") -> None:
    """The one rule set for projection tensors; raise `ArtifactError` naming the first violation.

    - `indices` and `weights` are `[R, K]` of an integer and a floating dtype;
    - `-1` is the only negative index and marks an empty slot, whose weight is 0;
    - weights are finite and >= 0;
    - indices are `< num_columns`, the column side's *tokenizer* vocab size (ids in padding columns
      beyond the tokenizer are never a target), when given;
    - `R == num_rows` (the row side's model vocab size) and `K == top_k`, when given;
    - `row_kind` is `[R]` of an integer dtype holding known codes (`ROW_KIND_NAMES`), when given;
    - with `row_sums` (the artifact readers), every row sums to 1 (within `ROW_SUM_TOLERANCE`) or is
      empty (CONTRACTS §4).
    `columns` names the column side ("teacher" / "student") in messages; `where` prefixes them.
    """
    indices, weights = np.asarray(indices), np.asarray(weights)
    if indices.ndim != 2 or indices.shape != weights.shape:
        raise ArtifactError(f"{where}: indices {list(indices.shape)} and weights {list(weights.shape)} must both be "
                            "[R, K]; rebuild the artifact with `xtoken-align build-projection`")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ArtifactError(f"{where}: indices must be integers, got {indices.dtype}")
    if not np.issubdtype(weights.dtype, np.floating):
        raise ArtifactError(f"{where}: weights must be floating point, got {weights.dtype}")
    if num_rows is not None and top_k is not None and indices.shape != (num_rows, top_k):
        raise ArtifactError(f"{where}: tensors are {list(indices.shape)}, but projection.json says "
                            f"[{num_rows}, {top_k}] (the rows side's model vocab size, top_k)")
    if num_rows is not None and indices.shape[0] != num_rows:
        raise ArtifactError(f"{where}: {indices.shape[0]} rows, expected {num_rows} (the rows side's model vocab size)")
    if indices.size:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1:
            raise ArtifactError(f"{where}: indices below -1 (found {lo}; only -1 marks an empty slot)")
        if num_columns is not None and hi >= num_columns:
            raise ArtifactError(f"{where}: {columns} index {hi} is out of range: indices must be in [0, "
                                f"{num_columns}) (the {columns} tokenizer's vocab size; -1 marks an empty slot)")
        if not bool(np.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ArtifactError(f"{where}: weights must be finite and >= 0")
        if bool(((indices < 0) & (weights != 0)).any()):
            raise ArtifactError(f"{where}: empty slots (index -1) must have weight 0")
        if row_sums:
            sums = weights.sum(axis=1, dtype=np.float64)
            bad = np.flatnonzero((sums != 0) & (np.abs(sums - 1.0) > ROW_SUM_TOLERANCE))
            if bad.size:
                raise ArtifactError(f"{where}: row {int(bad[0])} sums to {float(sums[bad[0]]):.6g} ({bad.size} rows "
                                    f"do not sum to 1); every mapped row of a projection sums to 1 and an unmapped "
                                    "row is empty")
    if row_kind is not None:
        row_kind = np.asarray(row_kind)
        if row_kind.shape != (indices.shape[0],) or not np.issubdtype(row_kind.dtype, np.integer):
            raise ArtifactError(f"{where}: row_kind must be [R] = [{indices.shape[0]}] integer codes, got "
                                f"{list(row_kind.shape)} {row_kind.dtype}")
        if row_kind.size and (int(row_kind.min()) < 0 or int(row_kind.max()) >= len(ROW_KIND_NAMES)):
            raise ArtifactError(f"{where}: row_kind holds code {int(row_kind.max())}, known codes are 0..."
                                f"{len(ROW_KIND_NAMES) - 1} ({', '.join(ROW_KIND_NAMES)})")


def projection_dir(path, *, reverse: bool = False) -> Path:
    """The directory of one projection direction: `path` itself (or the directory of a
    `projection.json` / `projection.safetensors` inside it), or its `teacher_to_student/` part."""
    path = Path(path)
    if path.is_file() and path.name in (PROJECTION_JSON, PROJECTION_TENSORS):
        path = path.parent
    if reverse:
        sub = path / REVERSE_SUBDIR
        if not sub.is_dir():
            raise ArtifactNotFoundError(f"{path} has no teacher-to-student part; build it with --both-directions")
        path = sub
    if not path.is_dir():
        raise ArtifactNotFoundError(f"{path} is not a projection artifact: no such directory; build one with "
                                    "`xtoken-align build-projection`")
    return path


def read_projection_files(path, *, student=None, teacher=None, reverse: bool = False,
                          direction: str | None = None) -> ProjectionFiles:
    """Read and validate one direction of a projection artifact (the one reader).

    Checks the schema version, kind and required keys, that `projection.safetensors` is the file
    `projection.json` describes (its `tensors_sha256`; an artifact without one loads with an
    `ArtifactWarning`), the direction (one of `DIRECTIONS`, or exactly `direction` when given), the
    fingerprints of `student` / `teacher` (a `TokenizerInfo` or a fingerprint string) when given,
    then the tensors with `validate_projection` against the recorded sizes, row sums included.
    Raises `ArtifactError` (`ArtifactNotFoundError` for missing files) naming what is wrong.
    """
    path = projection_dir(path, reverse=reverse)
    meta_path = path / PROJECTION_JSON
    meta, data = _read_described(meta_path, path / PROJECTION_TENSORS, kind=PROJECTION_KIND,
                                 required=PROJECTION_REQUIRED_KEYS)
    got = meta["direction"]
    if got not in DIRECTIONS:
        raise ArtifactError(f"{meta_path}: direction {got!r} is not one of {DIRECTIONS}")
    if direction is not None and got != direction:
        raise ArtifactError(f"{path}: direction {got!r}, expected {direction!r}"
                            + (" (a teacher_to_student/ subdirectory holds the other direction)"
                               if direction == STUDENT_TO_TEACHER else ""))
    for side in ("student", "teacher"):
        info = meta[side]
        if not isinstance(info, dict) or not isinstance(info.get("vocab_size"), int):
            raise ArtifactError(f"{meta_path}: `{side}` must be {{name, fingerprint, vocab_size, model_vocab_size}}, "
                                f"got {info!r}; rebuild the artifact")
    check_tokenizers(meta, path, student=student, teacher=teacher)
    tensors_path = path / PROJECTION_TENSORS
    t = _parse_tensors(data, tensors_path, {"indices": np.int64, "weights": np.float32},
                       optional={"row_kind": np.uint8})
    rows_side, cols_side = projection_sides(meta)
    validate_projection(t["indices"], t["weights"], t.get("row_kind"), num_rows=model_vocab_size(meta[rows_side]),
                        top_k=int(meta["top_k"]), num_columns=int(meta[cols_side]["vocab_size"]), columns=cols_side,
                        row_sums=True, where=str(tensors_path))
    return ProjectionFiles(t["indices"], t["weights"], t.get("row_kind"), meta, path)
