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
- Writing is atomic (`atomic_dir`): everything goes to a temporary sibling directory that is renamed
  into place only when complete, so a failure leaves either the previous artifact or nothing.
- Reading checks, when the caller passes tokenizers (or fingerprint strings), that the artifact was
  built for them (`check_tokenizers`); any difference raises `ArtifactError` naming both tokenizers.

Projections (`kind: "projection"`): `projection.safetensors` holds `indices [R, K]` int64 (-1 = empty
slot), `weights [R, K]` float32 (0 in empty slots) and optionally `row_kind [R]` uint8
(`ROW_KIND_NAMES`); rows are the row side's ids (R = its model vocab size), columns the other side's
tokenizer ids. `--both-directions` adds the reverse direction under `teacher_to_student/`.
`validate_projection` holds the one rule set for these tensors, on disk or built in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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


# --- writing ------------------------------------------------------------------------------------

def check_writable(out: Path, *, marker: str) -> None:
    """Raise `ArtifactError` early if `out` cannot become an artifact directory: it is a file, a
    non-empty directory that is not an artifact (holds no `marker`), or its parent is not writable."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ArtifactError(f"cannot write artifact to {out}: it exists and is not a directory")
        if any(out.iterdir()) and not (out / marker).exists():
            raise ArtifactError(f"cannot write artifact to {out}: the directory exists, is not empty and holds "
                                f"no {marker}; choose a new or empty directory")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write artifact to {out}: {parent} is not a writable directory")


@contextmanager
def atomic_dir(out: Path, *, marker: str) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on normal exit it replaces `out` in one rename.

    On an exception the temporary directory is removed and `out` is left as it was. A previous
    artifact at `out` is replaced (moved aside first, removed after the rename).
    """
    out = Path(out)
    check_writable(out, marker=marker)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise ArtifactError(f"cannot write artifact to {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "artifact")
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_meta(path: Path, meta: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def write_tensors(path: Path, tensors: dict[str, np.ndarray], *, kind: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"kind": kind, "schema_version": str(SCHEMA_VERSION)})


def write_projection_files(directory: Path, indices: np.ndarray, weights: np.ndarray,
                           row_kind: np.ndarray | None, meta: dict) -> None:
    """Write one direction of a projection (`projection.safetensors` + `projection.json`) into
    `directory`, normally the temporary directory of an `atomic_dir`. Tensors are stored as int64 /
    float32 / uint8; they are not validated here (the readers validate)."""
    directory = Path(directory)
    tensors = {"indices": np.asarray(indices).astype(np.int64), "weights": np.asarray(weights).astype(np.float32)}
    if row_kind is not None:
        tensors["row_kind"] = np.asarray(row_kind).astype(np.uint8)
    write_tensors(directory / PROJECTION_TENSORS, tensors, kind=PROJECTION_KIND)
    write_meta(directory / PROJECTION_JSON, meta)


# --- reading ------------------------------------------------------------------------------------

def read_meta(path: Path, *, kind: str, required: tuple[str, ...] = ()) -> dict:
    """Read and check an artifact's JSON: it exists, parses, has this schema version and kind, and
    holds the `required` keys. Other keys are returned as they are (readers ignore what they do
    not know)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"{path.parent} is not a {kind} artifact: {path.name} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    return meta


def read_tensors(path: Path, required: dict[str, np.dtype], optional: dict[str, np.dtype] | None = None
                 ) -> dict[str, np.ndarray]:
    """Load a safetensors file; the `required` tensors must exist, and they and any `optional` ones
    present must have these dtypes."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactNotFoundError(f"{path.parent} is incomplete: {path.name} is missing")
    try:
        tensors = load_file(str(path))
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
                        columns: str = "teacher", where: str = "projection") -> None:
    """The one rule set for projection tensors; raise `ArtifactError` naming the first violation.

    - `indices` and `weights` are `[R, K]` of an integer and a floating dtype;
    - `-1` is the only negative index and marks an empty slot, whose weight is 0;
    - weights are finite and >= 0;
    - indices are `< num_columns`, the column side's *tokenizer* vocab size (ids in padding columns
      beyond the tokenizer are never a target), when given;
    - `R == num_rows` (the row side's model vocab size) and `K == top_k`, when given;
    - `row_kind` is `[R]` of an integer dtype holding known codes (`ROW_KIND_NAMES`), when given.
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

    Checks the schema version, kind and required keys, the direction (one of `DIRECTIONS`, or
    exactly `direction` when given), the fingerprints of `student` / `teacher` (a `TokenizerInfo` or a
    fingerprint string) when given, then the tensors with `validate_projection` against the recorded
    sizes. Raises `ArtifactError` (`ArtifactNotFoundError` for missing files) naming what is wrong.
    """
    path = projection_dir(path, reverse=reverse)
    meta_path = path / PROJECTION_JSON
    meta = read_meta(meta_path, kind=PROJECTION_KIND, required=PROJECTION_REQUIRED_KEYS)
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
    t = read_tensors(path / PROJECTION_TENSORS, {"indices": np.int64, "weights": np.float32},
                     optional={"row_kind": np.uint8})
    rows_side, cols_side = projection_sides(meta)
    validate_projection(t["indices"], t["weights"], t.get("row_kind"), num_rows=model_vocab_size(meta[rows_side]),
                        top_k=int(meta["top_k"]), num_columns=int(meta[cols_side]["vocab_size"]), columns=cols_side,
                        where=str(path))
    return ProjectionFiles(t["indices"], t["weights"], t.get("row_kind"), meta, path)
