"""Top-k teacher outputs for the cross-tokenizer chunk losses (P-KL, the learned P-KL, H-KL, GOLD, ULD):
the entry checks and refusals they share, the teacher side of each unit, and the chunked autograd
runner the top-k forms use (docs/losses.md, "Top-k teacher outputs").

The teacher at a unit's row is known only on its listed ids (`topk_logprobs`, `topk_indices`, -1 =
an empty slot) plus one *rest* outcome, the mass outside them (`rest_logprob`, CONTRACTS §3). Both
are log-probabilities at temperature 1, so a top-k form refuses another temperature, and the public
forms (NeMo-RL's, TRL's), which read the teacher's whole distribution, are refused too.

`unit_teacher` reads the rows of the units only: values at other positions and at empty slots are
never used (they may be anything, NaN included). A NaN or +inf in a listed slot or in the rest of a
read row, or a read row with no mass at all (every listed value and the rest -inf), marks the loss
bad (`checks.poison`: a NaN loss, no sync); `check_inputs=True` names it instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.checks import check_finite_rows, check_key, nonfinite
from xtoken_loss.chunked import compute_dtype, needs_grad
from xtoken_loss.teacher_outputs import TeacherOutputs

NEG_INF = float("-inf")
ANY_ID = 1 << 62  # no vocabulary width bounds a top-k teacher's ids: they must only be >= -1
# Elements of one group's largest temporary in the top-k runners (autograd keeps a few such tensors).
TOPK_GROUP_ELEMENTS = 1 << 22


def refuse_topk_options(loss: str, *, temperature: float, public: bool = False, chunk_form: str | None = None,
                        tail_cut: int | None = None) -> None:
    """One `LossOptionError` line for an option a top-k form cannot honour."""
    if public:
        raise LossOptionError(
            f"{loss}: public=True reads the teacher's whole distribution (the published loss), but the teacher "
            "outputs are top-k; pass full teacher logits, or drop public=True for the top-k form"
        )
    if float(temperature) != 1.0:
        raise LossOptionError(
            f"{loss}: temperature={temperature!r} with top-k teacher outputs: their log-probabilities are at "
            "temperature 1 and the teacher's distribution at another temperature is unknown; use temperature=1 or "
            "full teacher logits"
        )
    if chunk_form not in (None, "start"):
        raise LossOptionError(
            f"{loss}: chunk_form={chunk_form!r} with top-k teacher outputs: each position lists its own ids, so only "
            "the chunk-start distribution ('start') is known; use chunk_form='start' or full teacher logits"
        )
    if tail_cut is not None:
        raise LossOptionError(
            f"{loss}: tail_cut={tail_cut!r} with top-k teacher outputs: the top-k form already compares the listed "
            "ranks plus the rest; leave tail_cut=None"
        )


def check_topk_batch(loss: str, teacher: TeacherOutputs, batch: dict, teacher_index: int, batch_size: int) -> int:
    """The shapes a top-k teacher must share with the batch (no sync); returns T_t."""
    if teacher.batch_size != batch_size:
        raise LossInputError(
            f"{loss}: teacher top-k outputs have batch size {teacher.batch_size}, the student logits {batch_size}"
        )
    Lt = teacher.length
    i = teacher_index
    check_key(loss, batch, f"alignment_{i}_teacher_chunk_id", (batch_size, Lt),
              f" (teacher {i}'s alignment; its [B, T_t] must match the top-k outputs' [B, T_t])")
    return Lt


def check_topk_ids(loss: str, idx: torch.Tensor, rows: torch.Tensor, width: int, what: str):
    """The listed ids at the read rows `rows` (flat `b * T_t + p`) must lie in `[-1, width)`. CPU: a
    `LossInputError` naming the range; an accelerator (reading would sync): a `[]` bool flag for
    `checks.poison`, the caller clamps. Returns None when checked."""
    live = idx.reshape(-1, idx.shape[-1])[rows]
    if live.numel() == 0:
        return None
    if live.device.type != "cpu":
        return ((live < -1) | (live >= width)).any()
    lo, hi = int(live.min()), int(live.max())
    if lo < -1 or hi >= width:
        raise LossInputError(
            f"{loss}: topk_indices hold ids in [{lo}, {hi}] at the positions the loss reads; they must lie in "
            f"[-1, {width - 1}] (-1: empty slot; {what} is {width} wide)"
        )
    return None


def check_topk_finite(loss: str, teacher: TeacherOutputs, rows: torch.Tensor) -> None:
    """`check_inputs=True`: raise naming the field and the first `(sample, position)` among `rows` whose
    listed values or rest hold NaN or +inf, or whose mass is zero (syncs)."""
    T = teacher.length
    lp = teacher.topk_logprobs.reshape(-1, teacher.k)[rows].double()
    listed = teacher.topk_indices.reshape(-1, teacher.k)[rows] >= 0
    rest = teacher.rest_logprob.reshape(-1)[rows].double()
    nan_lp = (listed & (torch.isnan(lp) | (lp == float("inf")))).any(dim=1)
    nan_rest = torch.isnan(rest) | (rest == float("inf"))
    tot = torch.logaddexp(torch.where(listed, lp, NEG_INF).logsumexp(dim=1), rest)
    empty = ~nan_lp & ~nan_rest & (tot == NEG_INF)
    for flag, name, what in ((nan_lp, "topk_logprobs", "NaN or +inf in a listed slot"),
                             (nan_rest, "rest_logprob", "NaN or +inf"),
                             (empty, "topk_logprobs / rest_logprob", "no mass (every listed value and the rest -inf)")):
        hit = flag.nonzero()
        if hit.numel():
            r = int(rows[hit[0, 0]])
            raise LossInputError(f"{loss}: teacher {name} holds {what} at sample {r // T}, position {r % T} (a "
                                 "position the loss reads)")


@dataclass(frozen=True, eq=False)
class TopkRows:
    """The teacher at n read rows, renormalised over its listed ids plus the rest (so the stored
    values' rounding does not leave a distribution summing to other than 1)."""

    log_p: torch.Tensor  # [n, k] log-probabilities of the listed slots, -inf at empty slots
    ids: torch.Tensor  # [n, k] int64 teacher ids, -1 at empty slots
    log_rest: torch.Tensor  # [n] log-probability of the rest outcome
    raw: torch.Tensor  # [n, k] the listed log-probabilities as given (-inf at empty slots): column scores
    bad: torch.Tensor  # [] bool: a read row holds NaN / +inf, or has no mass

    @property
    def listed(self) -> torch.Tensor:
        return self.ids >= 0


def unit_teacher(teacher: TeacherOutputs, rows: torch.Tensor, cdt) -> TopkRows:
    """The teacher side of the units whose teacher rows are `rows [n]` (module doc). Every negative id
    is an empty slot (ids below -1 were refused, or flagged on an accelerator, by `check_topk_ids`)."""
    k = teacher.k
    idx = teacher.topk_indices.reshape(-1, k)[rows].to(torch.int64)
    idx = torch.where(idx >= 0, idx, torch.full_like(idx, -1))
    listed = idx >= 0
    lp = teacher.topk_logprobs.reshape(-1, k)[rows].to(cdt)
    rest = teacher.rest_logprob.reshape(-1)[rows].to(cdt)
    broken = (listed & (torch.isnan(lp) | (lp == float("inf")))).any(dim=1) | torch.isnan(rest) | (rest == float("inf"))
    raw = torch.where(listed, lp, torch.full_like(lp, NEG_INF))  # empty slots: whatever they hold, never read
    raw = torch.where(torch.isnan(raw), torch.full_like(raw, NEG_INF), raw)  # poisoned below; keep the rest finite
    rest = torch.where(torch.isnan(rest), torch.full_like(rest, NEG_INF), rest)
    log_z = torch.logaddexp(raw.logsumexp(dim=1), rest) if k else rest
    broken |= ~torch.isfinite(log_z)  # +inf somewhere, or no mass at all
    z0 = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
    return TopkRows(raw - z0[:, None], idx, rest - z0, raw, broken.any())


def run_topk_units(student_logits: torch.Tensor, units, norm, unit_fn, metric_names, *, width: int, params=()):
    """Sum `unit_fn(log_q [n, V_s] (differentiable), u0, u1) -> (loss [n], {metric: [n]}, bad [])` over
    the units (chunk starts), a group at a time, with autograd on each group's student rows (and on
    `params`, leaves `unit_fn` uses, when they require a gradient). Only the units' rows are read:
    anything elsewhere changes nothing and gets gradient 0. `width`: the widest per-unit temporary,
    which sets the group size. Returns `(total, grad [B * T_s, V_s] or None, metric sums, bad, param
    grads)`, the gradients already divided by `norm`."""
    B, Ls, Vs = student_logits.shape
    dev = student_logits.device
    cdt = compute_dtype(student_logits.dtype)
    srows = units.student_rows
    U = srows.shape[0]
    zs_flat = student_logits.reshape(B * Ls, Vs)
    want_grad = needs_grad(student_logits)
    want_p = [torch.is_grad_enabled() and p.requires_grad for p in params]
    grad = torch.zeros_like(zs_flat) if want_grad else None
    g_params = [torch.zeros_like(p) if w else None for p, w in zip(params, want_p)]
    n = max(1, TOPK_GROUP_ELEMENTS // max(width, Vs, 1))
    total = torch.zeros((), dtype=cdt, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    sums = {k: torch.zeros((), dtype=cdt, device=dev) for k in metric_names}
    for u0 in range(0, U, n):
        u1 = min(u0 + n, U)
        z = zs_flat.detach()[srows[u0:u1]].to(cdt).requires_grad_(want_grad)
        bad = bad | nonfinite(z.detach().amax(dim=1))
        inputs = ([z] if want_grad else []) + [p for p, w in zip(params, want_p) if w]
        with torch.enable_grad() if inputs else torch.no_grad():
            log_q = torch.log_softmax(z, dim=1)
            loss_u, extra, group_bad = unit_fn(log_q, u0, u1)
            group_total = loss_u.sum()
        if inputs:
            grads = iter(torch.autograd.grad(group_total, inputs))
            if want_grad:
                grad.index_add_(0, srows[u0:u1], (next(grads) / norm).to(grad.dtype))
            for j, w in enumerate(want_p):
                if w:
                    g_params[j] += next(grads) / norm
        bad = bad | group_bad
        total += group_total.detach()
        for k in metric_names:
            sums[k] += extra[k].detach().sum()
    return total, grad, sums, bad, g_params


def masked_logsumexp(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`logsumexp` over the entries of each row of `x` where `keep`, -inf where none is kept, with a
    finite gradient in every case (the shift detached, the log guarded). Differentiable."""
    y = torch.where(keep, x, torch.full_like(x, NEG_INF))
    m = y.detach().amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(y - m).sum(dim=1)
    pos = s > 0
    return torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))) + m.squeeze(1),
                       torch.full_like(s, NEG_INF))


def check_read_rows(loss: str, student_logits, teacher: TeacherOutputs, units) -> None:
    """`check_inputs=True`: the student rows and the teacher top-k rows the loss reads (syncs)."""
    check_finite_rows(loss, "student_logits", student_logits, units.student_rows)
    check_topk_finite(loss, teacher, units.teacher_rows)
