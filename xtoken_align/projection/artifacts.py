"""Versioned on-disk artifacts: a directory with `<kind>.safetensors` + `<kind>.json` (CONTRACTS §4).

The generic helpers (`atomic_dir`, `write_meta`/`read_meta`, `write_tensors`/`read_tensors`,
`tokenizer_meta`, `check_tokenizers`) serve every artifact kind; projections use them through
`write_projection` / `read_projection`, and alignment artifacts (`kind: "alignment"`) reuse them
the same way.

Conventions shared by all kinds:
- `<kind>.json` holds `schema_version` (integer), `kind`, the tokenizers (`{name, fingerprint,
  vocab_size, model_vocab_size}`), the method and its parameters, statistics and `created_with`.
- Writing is atomic: everything goes to a temporary sibling directory that is renamed into place
  only when complete, so a failure leaves either the previous artifact or nothing, never half of one.
- Reading checks the schema version and kind, and, when the caller passes tokenizers, their
  fingerprints; any difference raises `ArtifactError` naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from xtoken_core.errors import ArtifactError

SCHEMA_VERSION = 1

PROJECTION_KIND = "projection"
PROJECTION_JSON = "projection.json"
PROJECTION_TENSORS = "projection.safetensors"
REVERSE_SUBDIR = "teacher_to_student"
DIRECTIONS = ("student_to_teacher", "teacher_to_student")


def created_with() -> str:
    from xtoken_core import __version__

    return f"xtoken {__version__}"


# --- generic helpers -----------------------------------------------------------------------------

def tokenizer_meta(info, model_vocab_size: int | None = None) -> dict:
    """`{name, fingerprint, vocab_size, model_vocab_size}` of a `TokenizerInfo` (model vocab size
    defaults to the tokenizer's vocab size)."""
    return {
        "name": info.name,
        "fingerprint": info.fingerprint,
        "vocab_size": int(info.vocab_size),
        "model_vocab_size": int(model_vocab_size if model_vocab_size is not None else info.vocab_size),
    }


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


def read_meta(path: Path, *, kind: str) -> dict:
    """Read and check an artifact's JSON: it exists, parses, has this schema version and kind."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path.parent} is not a {kind} artifact: {path.name} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not an artifact description (expected a JSON object)")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema_version {version!r} is not supported (this xtoken reads "
                            f"schema_version {SCHEMA_VERSION}); rebuild the artifact with this version")
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}: kind is {meta.get('kind')!r}, expected {kind!r}")
    return meta


def write_tensors(path: Path, tensors: dict[str, np.ndarray], *, kind: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"kind": kind, "schema_version": str(SCHEMA_VERSION)})


def read_tensors(path: Path, required: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """Load a safetensors file and check that the `required` tensors exist with these dtypes."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path.parent} is incomplete: {path.name} is missing")
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    for name, dtype in required.items():
        if name not in tensors:
            raise ArtifactError(f"{path}: tensor {name!r} is missing")
        if tensors[name].dtype != dtype:
            raise ArtifactError(f"{path}: tensor {name!r} is {tensors[name].dtype}, expected {np.dtype(dtype)}")
    return tensors


def _fingerprint_of(x) -> str:
    return x if isinstance(x, str) else x.fingerprint


def check_tokenizers(meta: dict, path: Path, **expected) -> None:
    """Compare the artifact's tokenizer fingerprints with `role=TokenizerInfo | fingerprint` pairs
    (None = not checked); raise `ArtifactError` naming each role that differs."""
    diffs = []
    for role, want in expected.items():
        if want is None:
            continue
        have = (meta.get(role) or {}).get("fingerprint")
        if have != _fingerprint_of(want):
            name = getattr(want, "name", None)
            diffs.append(f"{role} tokenizer differs (artifact: {(meta.get(role) or {}).get('name')!r} {have}; "
                         f"given: {name + ' ' if name else ''}{_fingerprint_of(want)})")
    if diffs:
        raise ArtifactError(f"{path} was built for other tokenizers: " + "; ".join(diffs)
                            + "; rebuild it with these tokenizers")


# --- projections ---------------------------------------------------------------------------------

# Row kinds stored in `row_kind [R] uint8` (an extra tensor beside CONTRACTS §4's two).
(ROW_UNMAPPED, ROW_EXACT, ROW_SPECIAL, ROW_DECOMPOSED, ROW_REVERSE_ONLY, ROW_CORPUS_ONLY, ROW_PADDED,
 ROW_UNUSED) = range(8)
ROW_KIND_NAMES = ("unmapped", "exact", "special", "decomposed", "reverse_only", "corpus_only", "padded", "unused")


@dataclass
class ProjectionArtifact:
    """One direction of a projection: rows = source ids, `indices`/`weights` `[R, K]`.

    `meta` is the `projection.json` content; `row_kind` says how each row was made (ROW_*).
    """

    indices: np.ndarray  # [R, K] int64, -1 = empty slot
    weights: np.ndarray  # [R, K] float32, 0 in empty slots
    meta: dict = field(default_factory=dict)
    row_kind: np.ndarray | None = None  # [R] uint8

    @property
    def num_rows(self) -> int:
        return int(self.indices.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.indices.shape[1])

    @property
    def direction(self) -> str:
        return self.meta.get("direction", "student_to_teacher")

    @property
    def num_columns(self) -> int:
        """Width of the target vocabulary (the column side's tokenizer vocab size)."""
        return int(self.meta[self.meta.get("columns", "teacher")]["vocab_size"])

    def row(self, i: int) -> list[tuple[int, float]]:
        keep = self.indices[i] >= 0
        return list(zip(self.indices[i][keep].tolist(), self.weights[i][keep].tolist()))

    def to_scipy(self, num_columns: int | None = None):
        """The projection as a `scipy.sparse.csr_matrix [R, num_columns]`."""
        import scipy.sparse as sp

        keep = self.indices >= 0
        rows = np.nonzero(keep)[0]
        return sp.csr_matrix((self.weights[keep].astype(np.float64), (rows, self.indices[keep])),
                             shape=(self.num_rows, num_columns or self.num_columns))


def write_projection(out: Path, forward: ProjectionArtifact, reverse: ProjectionArtifact | None = None) -> Path:
    """Write `forward` (and `reverse` under `teacher_to_student/`) atomically to `out`."""
    out = Path(out)
    with atomic_dir(out, marker=PROJECTION_JSON) as tmp:
        _write_one(tmp, forward)
        if reverse is not None:
            sub = tmp / REVERSE_SUBDIR
            sub.mkdir()
            _write_one(sub, reverse)
    return out


def _write_one(directory: Path, proj: ProjectionArtifact) -> None:
    tensors = {"indices": proj.indices.astype(np.int64), "weights": proj.weights.astype(np.float32)}
    if proj.row_kind is not None:
        tensors["row_kind"] = proj.row_kind.astype(np.uint8)
    write_tensors(directory / PROJECTION_TENSORS, tensors, kind=PROJECTION_KIND)
    write_meta(directory / PROJECTION_JSON, proj.meta)


def read_projection(path: Path, *, student=None, teacher=None, reverse: bool = False) -> ProjectionArtifact:
    """Read a projection artifact directory (with `reverse=True`, its `teacher_to_student/` part).

    `student` / `teacher` (a `TokenizerInfo` or a fingerprint string) are checked against the
    artifact's fingerprints when given. Raises `ArtifactError` on any mismatch or malformed file.
    """
    path = Path(path)
    if reverse:
        path = path / REVERSE_SUBDIR
        if not path.exists():
            raise ArtifactError(f"{path.parent} has no teacher-to-student part; build it with --both-directions")
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a projection artifact directory")
    meta = read_meta(path / PROJECTION_JSON, kind=PROJECTION_KIND)
    for key in ("direction", "student", "teacher", "top_k"):
        if key not in meta:
            raise ArtifactError(f"{path / PROJECTION_JSON}: field {key!r} is missing")
    if meta["direction"] not in DIRECTIONS:
        raise ArtifactError(f"{path / PROJECTION_JSON}: direction {meta['direction']!r} is not one of {DIRECTIONS}")
    check_tokenizers(meta, path, student=student, teacher=teacher)
    t = read_tensors(path / PROJECTION_TENSORS, {"indices": np.int64, "weights": np.float32})
    indices, weights = t["indices"], t["weights"]
    rows_side = "student" if meta["direction"] == "student_to_teacher" else "teacher"
    cols_side = "teacher" if rows_side == "student" else "student"
    want_rows = int(meta[rows_side].get("model_vocab_size") or meta[rows_side]["vocab_size"])
    if indices.ndim != 2 or indices.shape != weights.shape:
        raise ArtifactError(f"{path}: indices {indices.shape} and weights {weights.shape} must be equal [R, K] shapes")
    if indices.shape != (want_rows, int(meta["top_k"])):
        raise ArtifactError(f"{path}: tensors are {list(indices.shape)}, but projection.json says "
                            f"[{want_rows}, {meta['top_k']}] ({rows_side} model vocab size, top_k)")
    if indices.size and (indices.max() >= int(meta[cols_side]["vocab_size"]) or indices.min() < -1):
        raise ArtifactError(f"{path}: indices out of range for the {cols_side} vocab size "
                            f"{meta[cols_side]['vocab_size']}")
    return ProjectionArtifact(indices=indices, weights=weights, meta=meta, row_kind=t.get("row_kind"))
