"""The chunk-unit runner shared by ULD and the H-KL / GOLD hybrids.

A loss over aligned chunks (CONTRACTS §2, `units.chunk_units`) compares one student and one teacher
*chunk distribution* per valid chunk. `unit_rows` lists the logit rows each unit reads for a chunk
form (`"start"`, `"chain"`, `"mean_log"`; `losses/uld.py` defines them), `unit_log_dists` builds the
chunk distributions from those rows, and `run_units` processes a few units at a time: it gathers
their logit rows, computes the per-unit loss and its gradient on that small slice (by hand for the
`"start"` form, with autograd on the slice for the other forms), and writes the slice's gradient
into one logits-sized buffer, attached to the loss with `chunked.attach_grad`. Peak extra memory is
a few `[n, V]` temporaries whatever the number of units; the teacher is a constant. `prepare` holds
the input checks these losses share.

Only the units' rows are read, so nothing at masked positions can change the loss, the metrics or
the gradient (exactly 0 there). A read row whose maximum is not finite (NaN, +inf, all -inf) makes
the loss and the metrics NaN without a host sync (`checks.nonfinite` / `checks.poison`);
`check_inputs=True` names the first such (sample, position) instead (`checks.check_finite_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xtoken_core.errors import LossInputError
from xtoken_loss.checks import check_finite_rows, nonfinite
from xtoken_loss.chunked import (
    compute_dtype,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    unit_result,
)
from xtoken_loss.sorted_l1 import Workspace
from xtoken_loss.teacher_outputs import as_teacher_outputs
from xtoken_loss.units import ChunkUnits, check_chunk_ids, chunk_units, get_key

# --------------------------------------------------------------------------------------------------
# Units and chunk distributions


@dataclass(frozen=True, eq=False)
class UnitRows:
    """For each unit u (U of them), the logit rows of one side: `rows[unit == u]`, ordered, with
    `unit` non-decreasing. `targets[r]` is the token row r predicts (chain form only)."""

    rows: torch.Tensor  # [N] flat row indices b * L + p
    unit: torch.Tensor  # [N] unit of each row, non-decreasing
    num_units: int
    targets: torch.Tensor | None = None  # [N]

    def bounds(self, starts: list[int]) -> list[int]:
        """Row offsets of the unit offsets `starts` (one host sync)."""
        pos = torch.searchsorted(self.unit, torch.as_tensor(starts, dtype=self.unit.dtype, device=self.unit.device))
        return pos.tolist()


def unit_rows(units: ChunkUnits, side: str, form: str, input_ids: torch.Tensor | None) -> UnitRows:
    """The rows each unit reads on `side` ("student" / "teacher") for chunk form `form`."""
    rows = units.student_rows if side == "student" else units.teacher_rows
    if form == "start":
        U = rows.shape[0]
        return UnitRows(rows, torch.arange(U, device=rows.device), U)
    unit = units.student_unit if side == "student" else units.teacher_unit
    U = units.student_count.shape[0]
    targets = None
    if form == "chain":
        if input_ids is None:
            raise LossInputError(f"chunk_form='chain' needs the {side}'s input_ids in the batch")
        targets = input_ids.reshape(-1)[rows + 1]  # row p predicts token p + 1 (same sample: p < L - 1)
    return UnitRows(rows, unit, U, targets)


def unit_log_dists(z: torch.Tensor, unit: torch.Tensor, n_units: int, form: str, temperature: float,
                   targets: torch.Tensor | None = None) -> torch.Tensor:
    """`[n_units, V]` log chunk distributions from logit rows `z [r, V]` (rows of units 0..n_units-1,
    `unit [r]` non-decreasing). Differentiable; `z` should already be in the compute dtype."""
    lp = torch.log_softmax(z / temperature, dim=1)  # [r, V]
    if form == "start":
        return lp
    if form == "mean_log":
        counts = torch.bincount(unit, minlength=n_units).to(lp.dtype)
        out = torch.zeros(n_units, lp.shape[1], dtype=lp.dtype, device=lp.device)
        return out.index_add(0, unit, lp) / counts.clamp_min(1)[:, None]
    # chain: first row's distribution + the log-probabilities of the later rows' actual tokens
    first = torch.ones_like(unit, dtype=torch.bool)
    first[1:] = unit[1:] != unit[:-1]
    tok = lp.gather(1, targets[:, None]).squeeze(1)  # [r]
    extra = torch.zeros(n_units, dtype=lp.dtype, device=lp.device)
    extra = extra.index_add(0, unit, torch.where(first, torch.zeros_like(tok), tok))
    return lp[first] + extra[:, None]


# --------------------------------------------------------------------------------------------------
# The chunked autograd runner


def run_units(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    units: ChunkUnits,
    batch: dict,
    teacher_index: int,
    unit_fn,
    *,
    form: str,
    temperature: float,
    normalizer,
    position_chunk_size: int | None,
    metric_names: tuple[str, ...],
    row_fn=None,
):
    """Sum `unit_fn(log_q_student [n, V_s], log_p_teacher [n, V_t]) -> (loss [n], {name: [n]})` over
    the units, n at a time, with the student gradient computed per group. Returns
    `(loss, metrics)` with the CONTRACTS §5 conventions (sum / normalizer; metric means per unit).

    For the `"start"` form, `row_fn(z_s [n, V_s], z_t [n, V_t], want_grad, max_s [n], max_t [n]) -> (loss
    [n], d loss / d z_s [n, V_s] or None, metrics)`, when given, replaces `unit_fn`: it gets the units'
    logit rows (copies in the compute dtype, not yet divided by the temperature, which it may
    overwrite) and their maxima, and returns the gradient with respect to them, written by hand (no
    autograd graph).

    Only the units' rows are read (gathered), so nothing at other positions can change the result,
    and their gradient is exactly 0. A read row whose maximum is not finite (NaN or +inf in it, or
    all -inf) makes the loss and the metrics NaN (`checks.poison`, no host sync)."""
    B, Ls, Vs = student_logits.shape
    _, Lt, Vt = teacher_logits.shape
    dev = student_logits.device
    cdt = compute_dtype(student_logits.dtype)
    norm = resolve_normalizer(normalizer, units.num_units, cdt)
    ids_s = batch.get("input_ids") if form == "chain" else None
    ids_t = batch.get(f"teacher_{teacher_index}_input_ids") if form == "chain" else None
    if ids_s is not None:
        ids_s = get_key(batch, "input_ids", (B, Ls)).to(dev)
    if ids_t is not None:
        ids_t = get_key(batch, f"teacher_{teacher_index}_input_ids", (B, Lt)).to(dev)
    s_side = unit_rows(units, "student", form, ids_s)
    t_side = unit_rows(units, "teacher", form, ids_t)
    U = s_side.num_units
    n = rows_per_chunk(position_chunk_size, max(Vs, Vt))
    starts = list(range(0, U, n)) + [U]
    sb = s_side.bounds(starts) if form != "start" else starts
    tb = t_side.bounds(starts) if form != "start" else starts
    zs_flat = student_logits.reshape(B * Ls, Vs)
    zt_flat = teacher_logits.reshape(B * Lt, Vt)
    want_grad = needs_grad(student_logits)
    hand = form == "start" and row_fn is not None
    grad = None
    if want_grad and hand:  # every unit row is written whole; the others are zeroed once
        grad = torch.empty_like(zs_flat)
        other = torch.ones(B * Ls, dtype=torch.bool, device=dev)
        other[s_side.rows] = False
        grad.index_fill_(0, other.nonzero().squeeze(1), 0.0)
    elif want_grad:
        grad = torch.zeros_like(zs_flat)
    total = torch.zeros((), dtype=cdt, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    sums = {k: torch.zeros((), dtype=cdt, device=dev) for k in metric_names}
    work = Workspace()
    for g in range(len(starts) - 1):
        u0, u1 = starts[g], starts[g + 1]
        s0, s1, t0, t1 = sb[g], sb[g + 1], tb[g], tb[g + 1]
        rows = s_side.rows[s0:s1]
        with torch.no_grad():
            if hand:  # reused buffers: the row functions work in place on these copies
                zt = _gather(zt_flat, t_side.rows[t0:t1], work.get("zt", (t1 - t0, Vt), cdt, dev))
                zs = _gather(zs_flat, rows, work.get("zs", (s1 - s0, Vs), cdt, dev))
            else:
                zt = zt_flat[t_side.rows[t0:t1]].to(cdt)
                zs = zs_flat.detach()[rows].to(cdt)
            mx_t, mx_s = zt.amax(dim=1), zs.amax(dim=1)
            bad |= nonfinite(mx_t) | nonfinite(mx_s)
        if hand:
            with torch.no_grad():
                loss_u, gz, extra = row_fn(zs, zt, want_grad, mx_s, mx_t)
                if want_grad:
                    grad.index_copy_(0, rows, gz.div_(norm).to(grad.dtype))
                total += loss_u.sum()
                for k in metric_names:
                    sums[k] += extra[k].sum()
            del zs, zt, gz
            continue
        with torch.no_grad():
            t_tg = t_side.targets[t0:t1] if t_side.targets is not None else None
            log_p = unit_log_dists(zt, t_side.unit[t0:t1] - u0, u1 - u0, form, temperature, t_tg)
            del zt
        z = zs.requires_grad_(want_grad)
        s_tg = s_side.targets[s0:s1] if s_side.targets is not None else None
        with torch.enable_grad() if want_grad else torch.no_grad():
            log_q = unit_log_dists(z, s_side.unit[s0:s1] - u0, u1 - u0, form, temperature, s_tg)
            loss_u, extra = unit_fn(log_q, log_p)
            group_total = loss_u.sum()
        if want_grad:
            (gz,) = torch.autograd.grad(group_total, z)
            grad.index_add_(0, rows, (gz / norm).to(grad.dtype))
        total += group_total.detach()
        for k in metric_names:
            sums[k] += extra[k].detach().sum()
        del z, zs, log_q, log_p
    return unit_result(student_logits, total, norm, sums, units, bad, grad)


def _gather(src: torch.Tensor, rows: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of `src` into `buf` (the compute dtype)."""
    if src.dtype == buf.dtype:
        return torch.index_select(src, 0, rows, out=buf)
    return buf.copy_(src.index_select(0, rows))


def prepare(student_logits, teacher_outputs, batch, *, loss_name, teacher_index, correct_only, check_inputs,
            form):
    """Shared input checks; returns `(teacher_logits, units)`."""
    zt = as_teacher_outputs(teacher_outputs, loss=loss_name, accepts=("logits",)).logits  # the runner needs logits
    if student_logits.dim() != 3 or zt.dim() != 3:
        raise LossInputError(
            f"{loss_name}: student logits {tuple(student_logits.shape)} and teacher logits {tuple(zt.shape)} must "
            "be [B, T, V]"
        )
    B, Ls, _ = student_logits.shape
    if zt.shape[0] != B:
        raise LossInputError(f"{loss_name}: teacher logits batch size {zt.shape[0]} != student batch size {B}")
    if check_inputs:
        check_chunk_ids(batch, teacher_index)
    mode = "start" if form == "start" else "mean"
    units = chunk_units(batch, teacher_index, B, Ls, zt.shape[1], mode=mode, correct_only=correct_only,
                        device=student_logits.device)
    if check_inputs:  # the rows the loss reads only: padding never raises
        check_finite_rows(loss_name, "student_logits", student_logits, units.student_rows)
        check_finite_rows(loss_name, "teacher logits", zt, units.teacher_rows)
    return zt, units

