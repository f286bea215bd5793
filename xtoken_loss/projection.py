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

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from xtoken_core import artifact_format as fmt
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.batch_tokenizers import TokenizerPair


@dataclass(frozen=True, eq=False)
class Projection:
    """A sparse student -> teacher projection, validated once when built.

    `teacher_width` is the number of teacher columns the logits may have at least (the teacher's
    model vocab size when the artifact records one, else its vocab size); teacher logits may be
    wider. `row_kind [R]` uint8 says how each row was made (`xtoken_core.artifact_format.ROW_*`:
    exact, decomposed, ...; None when unknown); GOLD's exact-match common set comes from it.
    """

    indices: torch.Tensor  # [R, K] int64, -1 = empty
    weights: torch.Tensor  # [R, K] float32, 0 in empty slots
    teacher_width: int
    metadata: dict = field(default_factory=dict, repr=False)
    # Python ints computed at build time, so calls never sync with the device to check shapes.
    max_index: int = -1  # largest teacher id used (-1: W is empty)
    min_student_width: int = 0  # 1 + the last non-empty row
    row_kind: torch.Tensor | None = field(default=None, repr=False)  # [R] uint8

    @classmethod
    def from_tensors(cls, indices, weights, *, teacher_width: int | None = None, metadata: dict | None = None,
                     row_kind=None):
        """Build from `indices [R, K]`, `weights [R, K]` and optionally `row_kind [R]`, checked by the
        artifact format's validator (`xtoken_core.artifact_format.validate_projection`: shapes,
        dtypes, -1 only as an empty slot with weight 0, weights finite and >= 0, indices below
        `teacher_width` when given, known row kinds)."""
        indices = torch.as_tensor(indices)
        weights = torch.as_tensor(weights)
        if weights.dtype in (torch.float16, torch.bfloat16):
            weights = weights.to(torch.float32)
        rk = None if row_kind is None else torch.as_tensor(row_kind)
        fmt.validate_projection(
            _numpy(indices), _numpy(weights), None if rk is None else _numpy(rk),
            num_columns=teacher_width, columns="teacher", where="projection",
        )
        return cls._build(indices, weights, teacher_width, metadata, rk)

    @classmethod
    def _build(cls, indices, weights, teacher_width, metadata, row_kind) -> Projection:
        """Construct from tensors the format validator has accepted."""
        indices = indices.to(torch.int64)
        weights = weights.to(torch.float32) if weights.dtype != torch.float64 else weights
        if row_kind is not None:
            row_kind = row_kind.to(torch.uint8)
        icpu, wcpu = indices.cpu(), weights.cpu()
        max_index = int(icpu.max()) if icpu.numel() else -1
        if teacher_width is None:
            teacher_width = max_index + 1
        nonempty = ((icpu >= 0) & (wcpu > 0)).any(dim=1).nonzero()
        min_width = int(nonempty[-1]) + 1 if nonempty.numel() else 0
        return cls(indices, weights, int(teacher_width), dict(metadata or {}), max_index, min_width, row_kind)

    @property
    def num_rows(self) -> int:
        return self.indices.shape[0]

    @property
    def top_k(self) -> int:
        return self.indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    @property
    def tokenizers(self) -> TokenizerPair | None:
        """The student and teacher tokenizers (names, fingerprints) the artifact metadata records; None
        when it records none (built from tensors). Losses compare it with the batch's fingerprint keys
        (`xtoken_loss.batch_tokenizers`)."""
        return TokenizerPair.from_metadata(self.metadata)

    def to(self, device) -> Projection:
        """The same projection with its tensors (`row_kind` included) on `device`."""
        return Projection(
            self.indices.to(device), self.weights.to(device), self.teacher_width, self.metadata,
            self.max_index, self.min_student_width, None if self.row_kind is None else self.row_kind.to(device),
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


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def load_projection(
    path,
    *,
    student_fingerprint: str | None = None,
    teacher_fingerprint: str | None = None,
    device=None,
) -> Projection:
    """Load a projection artifact directory (CONTRACTS §4), `row_kind` included, and check it.

    Reads through the artifact format's one reader (`xtoken_core.artifact_format.
    read_projection_files`, shared with `xtoken_align`'s `read_projection`): schema version, kind,
    direction `student_to_teacher`, the student and teacher fingerprints when given (compared as
    strings), the tensors against the recorded sizes (teacher ids below the teacher tokenizer's
    vocab size). Raises `ProjectionArtifactError` (= `ArtifactError`) with what to do.
    """
    f = fmt.read_projection_files(path, student=student_fingerprint, teacher=teacher_fingerprint,
                                  direction=fmt.STUDENT_TO_TEACHER)
    width = fmt.model_vocab_size(f.meta["teacher"])
    proj = Projection._build(_torch(f.indices), _torch(f.weights), width, f.meta,
                             None if f.row_kind is None else _torch(f.row_kind))
    return proj.to(device) if device is not None else proj


def as_projection(projection, device) -> Projection:
    """Accept a `Projection`, an artifact directory (`str` or any `os.PathLike`), or an
    `(indices, weights)` pair."""
    if isinstance(projection, Projection):
        return projection if projection.device == torch.device(device) else projection.to(device)
    if isinstance(projection, (str, os.PathLike)):
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


def log_slot_masses(t: torch.Tensor, slots: torch.Tensor, k: int, *, differentiable: bool = False):
    """Log-space projection onto k slots: `log_mass[n, j] = logsumexp_{e: slots[e] == j} t[n, e]`.

    `t [n, E]` holds one log-term per entry of W that lands in a slot (`log p[row_e] + log w_e`, so
    every term is <= 0), `slots [E]` its slot. Each slot is shifted by its own largest term, so a mass
    far below the row's maximum (a confident student, a +100 logit elsewhere) keeps its full precision
    instead of underflowing. Returns `(log_mass [n, k], u [n, E], s [n, k])` with `u = exp(t - max of
    its slot)` and `s` the per-slot sums of u (>= 1 where the slot has a finite term, 0 where it has
    none: log_mass -inf): an entry's share of its slot's mass is `u / s[slot]`. `t` may be overwritten
    unless `differentiable` (then autograd flows through `t`, finite also at empty slots)."""
    n = t.shape[0]
    with torch.no_grad():  # the shifts are constants; finfo.min where a slot has no finite term
        top = torch.full((n, k), torch.finfo(t.dtype).min, dtype=t.dtype, device=t.device)
        top.scatter_reduce_(1, slots.expand(n, -1), t.detach(), "amax")
    if not differentiable:
        u = t.sub_(top.index_select(1, slots)).exp_()
        s = torch.zeros(n, k, dtype=t.dtype, device=t.device).index_add_(1, slots, u)
        return s.log().add_(top), u, s
    u = torch.exp(t - top.index_select(1, slots))
    s = torch.zeros(n, k, dtype=t.dtype, device=t.device).index_add(1, slots, u)
    pos = s > 0
    log_mass = torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))) + top,
                           torch.full_like(s, float("-inf")))
    return log_mass, u, s
