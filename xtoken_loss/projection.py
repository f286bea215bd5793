"""The student -> teacher projection W at run time: load the artifact, restrict it to a set of teacher
columns, and apply it to student probabilities, never building anything of size V_s x V_t.

W is stored sparse (CONTRACTS §4): `indices [R, K]` int64 (teacher ids, -1 = empty slot) and
`weights [R, K]` float32; row v says how student token v's probability spreads over teacher tokens.
Rows of student ids the artifact does not cover (a model output layer wider than R) are empty: their
probability maps nowhere and the P-KL renormalises it away (docs/losses.md).

Applying W to the batch's chosen teacher columns S (k of them) uses the *entries* of W that land in S
(E of them, typically a few times k): `a[n, j] = sum_e p[n, row_e] w_e [slot_e == j]`, a gather of
`[n, E]` plus an index-add, and the mass W sends outside S is one mat-vec with the per-row weight
outside S. Nothing scales with V_s x V_t.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xtoken_core.errors import LossInputError, LossOptionError, ProjectionArtifactError

SCHEMA_VERSION = 1
ARTIFACT_KIND = "projection"
DIRECTION = "student_to_teacher"
TENSORS_FILE = "projection.safetensors"
META_FILE = "projection.json"


@dataclass(frozen=True, eq=False)
class Projection:
    """A sparse student -> teacher projection, validated once when built.

    `teacher_width` is the number of teacher columns the indices may address (the teacher's model
    vocab size when the artifact records one, else its vocab size); teacher logits may be wider.
    """

    indices: torch.Tensor  # [R, K] int64, -1 = empty
    weights: torch.Tensor  # [R, K] float32, 0 in empty slots
    teacher_width: int
    metadata: dict = field(default_factory=dict, repr=False)
    # Python ints computed at build time, so calls never sync with the device to check shapes.
    max_index: int = -1  # largest teacher id used (-1: W is empty)
    min_student_width: int = 0  # 1 + the last non-empty row

    @classmethod
    def from_tensors(cls, indices, weights, *, teacher_width: int | None = None, metadata: dict | None = None):
        """Build from `indices [R, K]` and `weights [R, K]` (checked: shapes, dtypes, -1 only as an
        empty slot, weights finite and >= 0 and 0 in empty slots)."""
        indices = torch.as_tensor(indices)
        weights = torch.as_tensor(weights)
        if indices.dim() != 2 or weights.shape != indices.shape:
            raise ProjectionArtifactError(
                f"projection: indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be "
                "[R, K]; rebuild the artifact with `xtoken-align build-projection`"
            )
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ProjectionArtifactError(f"projection: indices must be integers, got {indices.dtype}")
        if not weights.dtype.is_floating_point:
            raise ProjectionArtifactError(f"projection: weights must be floating point, got {weights.dtype}")
        indices = indices.to(torch.int64)
        weights = weights.to(torch.float32) if weights.dtype != torch.float64 else weights
        icpu, wcpu = indices.cpu(), weights.cpu()
        if bool((icpu < -1).any()):
            raise ProjectionArtifactError("projection: indices below -1 (only -1 marks an empty slot)")
        if not bool(torch.isfinite(wcpu).all()) or bool((wcpu < 0).any()):
            raise ProjectionArtifactError("projection: weights must be finite and >= 0")
        if bool(((icpu < 0) & (wcpu != 0)).any()):
            raise ProjectionArtifactError("projection: empty slots (index -1) must have weight 0")
        max_index = int(icpu.max()) if icpu.numel() else -1
        if teacher_width is None:
            teacher_width = max_index + 1
        if max_index >= teacher_width:
            raise ProjectionArtifactError(
                f"projection: teacher index {max_index} >= teacher width {teacher_width} recorded in the artifact"
            )
        nonempty = ((icpu >= 0) & (wcpu > 0)).any(dim=1).nonzero()
        min_width = int(nonempty[-1]) + 1 if nonempty.numel() else 0
        return cls(indices, weights, int(teacher_width), dict(metadata or {}), max_index, min_width)

    @property
    def num_rows(self) -> int:
        return self.indices.shape[0]

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device) -> Projection:
        """The same projection with its tensors on `device`."""
        return Projection(
            self.indices.to(device), self.weights.to(device), self.teacher_width, self.metadata,
            self.max_index, self.min_student_width,
        )

    def dense(self, student_width: int | None = None, teacher_width: int | None = None, dtype=torch.float64):
        """Dense `[student_width, teacher_width]` W, for tests and small problems only."""
        sw = student_width or self.num_rows
        tw = teacher_width or self.teacher_width
        w = torch.zeros(sw, tw, dtype=dtype, device=self.device)
        rows = torch.arange(self.num_rows, device=self.device)[:, None].expand_as(self.indices)
        keep = (self.indices >= 0) & (rows < sw)
        w.index_put_((rows[keep], self.indices[keep]), self.weights[keep].to(dtype), accumulate=True)
        return w

    def check_widths(self, student_width: int, teacher_width: int) -> None:
        """Raise unless student logits `student_width` wide and teacher logits `teacher_width` wide
        fit this projection (wider student logits are fine: their extra rows are empty)."""
        if student_width < self.min_student_width:
            raise LossInputError(
                f"student logits have {student_width} columns but the projection maps student ids up to "
                f"{self.min_student_width - 1}; pass the full-width student logits, or a projection built "
                "for this student"
            )
        if teacher_width <= self.max_index:
            raise LossInputError(
                f"teacher logits have {teacher_width} columns but the projection points at teacher id "
                f"{self.max_index}; pass the full-width teacher logits, or a projection built for this teacher"
            )

    def reachable_columns(self, teacher_width: int) -> torch.Tensor:
        """`[teacher_width]` bool: teacher columns that receive weight from some student row."""
        reach = torch.zeros(teacher_width, dtype=torch.bool, device=self.device)
        keep = (self.indices >= 0) & (self.weights > 0)
        reach[self.indices[keep]] = True
        return reach


def _check_meta_side(meta: dict, side: str, fingerprint: str | None, path: Path) -> None:
    info = meta.get(side)
    if not isinstance(info, dict):
        raise ProjectionArtifactError(f"{path}: `{side}` is missing from {META_FILE}; rebuild the artifact")
    if fingerprint is not None and str(info.get("fingerprint")) != str(fingerprint):
        raise ProjectionArtifactError(
            f"{path}: built for {side} tokenizer {info.get('name')!r} with fingerprint {info.get('fingerprint')!r}, "
            f"but the {side} tokenizer in use has fingerprint {fingerprint!r}; rebuild the projection for these "
            "tokenizers (`xtoken-align build-projection`)"
        )


def load_projection(
    path,
    *,
    student_fingerprint: str | None = None,
    teacher_fingerprint: str | None = None,
    device=None,
) -> Projection:
    """Load a projection artifact directory (CONTRACTS §4) and check it.

    Checks the schema version, kind and direction, and, when given, the student and teacher
    fingerprints (compared as strings). Raises `ProjectionArtifactError` with what to do.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.name in (META_FILE, TENSORS_FILE):
        path = path.parent
    meta_path, tensors_path = path / META_FILE, path / TENSORS_FILE
    if not meta_path.is_file() or not tensors_path.is_file():
        raise ProjectionArtifactError(
            f"{path}: not a projection artifact (needs {META_FILE} and {TENSORS_FILE}); build one with "
            "`xtoken-align build-projection`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ProjectionArtifactError(f"{meta_path}: cannot read it as JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ProjectionArtifactError(f"{meta_path}: expected a JSON object")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ProjectionArtifactError(
            f"{path}: schema_version {meta.get('schema_version')!r}, this xtoken_loss reads version "
            f"{SCHEMA_VERSION}; rebuild the artifact with a matching xtoken version"
        )
    if meta.get("kind") != ARTIFACT_KIND:
        raise ProjectionArtifactError(f"{path}: kind {meta.get('kind')!r}, expected {ARTIFACT_KIND!r}")
    if meta.get("direction") != DIRECTION:
        raise ProjectionArtifactError(
            f"{path}: direction {meta.get('direction')!r}, expected {DIRECTION!r} (the P-KL projects student "
            "probabilities into the teacher vocabulary; a teacher_to_student/ subdirectory is the other way)"
        )
    _check_meta_side(meta, "student", student_fingerprint, path)
    _check_meta_side(meta, "teacher", teacher_fingerprint, path)
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ProjectionArtifactError(f"{tensors_path}: cannot read it: {exc}") from None
    if "indices" not in tensors or "weights" not in tensors:
        raise ProjectionArtifactError(f"{tensors_path}: needs tensors `indices` and `weights`, has {sorted(tensors)}")
    teacher = meta["teacher"]
    width = teacher.get("model_vocab_size") or teacher.get("vocab_size")
    proj = Projection.from_tensors(
        tensors["indices"], tensors["weights"], teacher_width=int(width) if width else None, metadata=meta
    )
    student = meta["student"]
    rows = student.get("model_vocab_size") or student.get("vocab_size")
    if rows and int(rows) != proj.num_rows:
        raise ProjectionArtifactError(
            f"{path}: {proj.num_rows} rows but the student's recorded (model) vocab size is {rows}"
        )
    return proj.to(device) if device is not None else proj


def as_projection(projection, device) -> Projection:
    """Accept a `Projection`, an artifact path, or an `(indices, weights)` pair."""
    if isinstance(projection, Projection):
        return projection if projection.device == torch.device(device) else projection.to(device)
    if isinstance(projection, (str, Path)):
        return load_projection(projection, device=device)
    if isinstance(projection, (tuple, list)) and len(projection) == 2:
        return Projection.from_tensors(*projection).to(device)
    raise LossOptionError(
        "projection: pass a Projection (see load_projection), an artifact directory, or (indices, weights); "
        f"got {type(projection).__name__}"
    )


# --------------------------------------------------------------------------------------------------
# Teacher column selection


def reduce_column_scores(scores: torch.Tensor, process_group=None) -> torch.Tensor:
    """Max-reduce per-column scores over `process_group` (in place), so every rank picks the same
    columns (CONTRACTS §5). No-op without a group."""
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(scores, op=dist.ReduceOp.MAX, group=process_group)
    return scores


def top_columns(scores: torch.Tensor, k: int | None) -> torch.Tensor:
    """The ids of the `k` highest-scoring columns whose score is > -inf, ascending. Ties are broken
    towards the lower id (a stable sort), so the choice never depends on batch order."""
    finite = scores > float("-inf")
    if k is None:
        return finite.nonzero().squeeze(1)
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    order = order[finite[order]]
    return torch.sort(order).values


@dataclass(frozen=True, eq=False)
class ColumnRestriction:
    """W restricted to teacher columns `columns` (k of them) plus one "rest" column.

    `entry_rows/slots/weights` list the E entries of W that land in a chosen column; `rest_weights
    [V]` is each student row's weight on reachable columns outside the chosen set (the rest bucket).
    Rows are sized to the student logits width V (rows beyond the artifact are empty).
    """

    columns: torch.Tensor  # [k] int64 teacher ids, ascending
    entry_rows: torch.Tensor  # [E] int64 student ids
    entry_slots: torch.Tensor  # [E] int64 in [0, k)
    entry_weights: torch.Tensor  # [E] compute dtype
    rest_weights: torch.Tensor  # [V] compute dtype
    # rows whose rest weight is not 1 (rows with entries in S, unmapped rows, rows past the artifact):
    # a gradient step treats every other row's rest weight as exactly 1 (they differ by rounding only)
    odd_rows: torch.Tensor | None = None  # [J] int64

    @property
    def num_columns(self) -> int:
        return self.columns.shape[0]


def restrict_projection(
    proj: Projection, columns: torch.Tensor, student_width: int, teacher_width: int, dtype
) -> ColumnRestriction:
    """Restrict `proj` to the teacher `columns` (the rest bucket gets every other reachable column)."""
    dev = proj.device
    k = columns.shape[0]
    col_to_slot = torch.full((teacher_width,), -1, dtype=torch.int64, device=dev)
    col_to_slot[columns] = torch.arange(k, device=dev)
    rows = min(proj.num_rows, student_width)
    idx, w = proj.indices[:rows], proj.weights[:rows]
    valid = (idx >= 0) & (w > 0)
    slot = torch.where(valid, col_to_slot[idx.clamp(min=0)], -1)  # [rows, K]
    in_s = slot >= 0
    entry = in_s.nonzero()  # [E, 2]
    rest = torch.zeros(student_width, dtype=dtype, device=dev)
    rest[:rows] = (w.to(dtype) * (valid & ~in_s)).sum(dim=1)
    return ColumnRestriction(
        columns=columns,
        entry_rows=entry[:, 0].contiguous(),
        entry_slots=slot[in_s].contiguous(),
        entry_weights=w[in_s].to(dtype).contiguous(),
        rest_weights=rest,
        odd_rows=((rest - 1.0).abs() > ROW_SUM_TOLERANCE).nonzero().squeeze(1),
    )


# Rows of W sum to 1 up to float32 rounding; a rest weight this close to 1 counts as 1.
ROW_SUM_TOLERANCE = 1e-6


def project_probs(p: torch.Tensor, restr: ColumnRestriction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project student probabilities `p [n, V]` through the restricted W.

    Returns `(a [n, k], rest [n], pe [n, E])`: the mass on each chosen teacher column, the mass W
    sends to reachable columns outside them, and the per-entry products (kept for the backward).
    """
    pe = p[:, restr.entry_rows] * restr.entry_weights  # [n, E]
    a = torch.zeros(p.shape[0], restr.num_columns, dtype=p.dtype, device=p.device)
    a.scatter_add_(1, restr.entry_slots.expand(p.shape[0], -1), pe)  # [n, k]
    rest = p @ restr.rest_weights  # [n]
    return a, rest, pe
