"""Projection artifacts on the numpy/scipy side: `ProjectionArtifact`, `write_projection`,
`read_projection` (CONTRACTS §4).

The format itself (schema version, file names, directions, row kinds, metadata and fingerprint
checks, tensor validation, the atomic directory writer) is defined once in
`xtoken_core.artifact_format`; this module builds on it and re-exports the names the builder and
the CLI use (`art.ROW_EXACT`, `art.PROJECTION_JSON`, `art.check_writable`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xtoken_core import artifact_format as fmt
from xtoken_core.artifact_format import (  # noqa: F401  (re-exported for the builder and the CLI)
    DIRECTIONS,
    PROJECTION_JSON,
    PROJECTION_KIND,
    PROJECTION_TENSORS,
    REVERSE_SUBDIR,
    ROW_CORPUS_ONLY,
    ROW_DECOMPOSED,
    ROW_EXACT,
    ROW_KIND_NAMES,
    ROW_PADDED,
    ROW_REVERSE_ONLY,
    ROW_SPECIAL,
    ROW_UNMAPPED,
    ROW_UNUSED,
    SCHEMA_VERSION,
    STUDENT_TO_TEACHER,
    TEACHER_TO_STUDENT,
    atomic_dir,
    check_tokenizers,
    check_writable,
    created_with,
    tokenizer_meta,
)


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
        return self.meta.get("direction", STUDENT_TO_TEACHER)

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
        fmt.write_projection_files(tmp, forward.indices, forward.weights, forward.row_kind, forward.meta)
        if reverse is not None:
            sub = tmp / REVERSE_SUBDIR
            sub.mkdir()
            fmt.write_projection_files(sub, reverse.indices, reverse.weights, reverse.row_kind, reverse.meta)
    return out


def read_projection(path: Path, *, student=None, teacher=None, reverse: bool = False) -> ProjectionArtifact:
    """Read a projection artifact directory (with `reverse=True`, its `teacher_to_student/` part).

    `student` / `teacher` (a `TokenizerInfo` or a fingerprint string) are checked against the
    artifact's fingerprints when given. Reads and validates through
    `xtoken_core.artifact_format.read_projection_files` (the reader `load_projection` uses too);
    raises `ArtifactError` on any mismatch or malformed file.
    """
    f = fmt.read_projection_files(path, student=student, teacher=teacher, reverse=reverse)
    return ProjectionArtifact(indices=f.indices, weights=f.weights, meta=f.meta, row_kind=f.row_kind)
