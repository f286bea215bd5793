"""P-KL (loss kind `"pkl"`): cross-tokenizer KD through the sparse projection W (student -> teacher).

Student probabilities are projected into the teacher vocabulary, `q = softmax(z_s / T) W`, and compared
with the teacher's `softmax(z_t / T)` per aligned chunk, on a batch-wide set S of teacher columns.
Two forms (docs/losses.md has the formulas and the reasons):

Principled (default, `public=False`)
- One comparison per valid chunk, at the chunk *start*: the student logit just before the chunk's
  first student token and the teacher logit just before its first teacher token. Both models have
  read exactly the same text there, so their next-token distributions are comparable.
- Both distributions live on the teacher columns W can reach (the projection's image): the teacher is
  renormalised over them, the student over its mapped mass (rows W maps). They are compared on S plus
  one *rest* outcome (the reachable columns outside S), so the value is a true KL between two
  distributions: >= 0, and 0 exactly when they agree on S and on the rest.
- S: the `top_k_columns` reachable columns with the highest teacher log-probability at any counted
  position (padding never counts), max-reduced over `process_group` so every rank picks the same S.
Public (`public=True`, reproduces the published P-KL)
- Chunk distributions averaged over every position whose next token is in the chunk: the student's
  projected probabilities arithmetically (then renormalised over S), the teacher's log-softmax over S
  only (a geometric mean, not renormalised), so the "KL" can be negative.
- S: top `top_k_columns` columns by raw teacher logit over *all* positions, padding included.
- log Q clamped at `public_eps` where the projected student mass on a column is zero.

Both: sum over valid chunks of `T^2 * KL`, divided by `normalizer` (default: the number of valid
chunks). Teacher outputs are treated as constants (no gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.checks import check_finite_rows, nonfinite, poison
from xtoken_loss.chunked import (
    DEFAULT_CHUNK_ELEMENTS,
    attach_grad,
    check_options,
    compute_dtype,
    gather_rows,
    log_divergence,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    shift_rows,
    softmax_rows,
)
from xtoken_loss.modules import LossModule
from xtoken_loss.projection import (
    as_projection,
    log_slot_masses,
    project_probs,
    reduce_column_scores,
    restrict_projection,
    top_columns,
)
from xtoken_loss.teacher_outputs import as_teacher_outputs
from xtoken_loss.units import check_chunk_ids, chunk_units

DEFAULT_TOP_K_COLUMNS = 8192
TEACHER_FORMS = ("logits",)


@config
class PrincipledPKLOptions(Config):
    """The options of the principled P-KL (shared with the learned-W P-KL, `learned_pkl.py`)."""

    error_type = LossOptionError

    teacher_index: int = option(0, help="which teacher's batch keys (teacher_{i}_*, alignment_{i}_*) to read", min=0)
    temperature: float = option(1.0, help="softmax temperature of both models", gt=0)
    direction: Literal["forward", "reverse"] = option("forward", help="'forward' KL(teacher || student) or "
                                                      "'reverse' KL(student || teacher)")
    top_k_columns: int | None = option(DEFAULT_TOP_K_COLUMNS, help="teacher columns compared (None: every "
                                       "reachable column)", min=1)
    correct_only: bool = option(True, help="count only chunks whose pair is correct (pair_is_correct)")
    position_chunk_size: int | None = option(None, help="rows per step (None: automatic from the width)", min=1)
    check_inputs: bool = option(False, help="check the inputs for NaN/inf and bad chunk ids (syncs)")

    @property
    def unit_mode(self) -> str:
        """`units.chunk_units` mode: one unit per chunk start."""
        return "start"


@config
class PKLOptions(PrincipledPKLOptions):
    """Options of `pkl_loss` / `PKLLoss` (module doc); the projection and `columns` are passed beside."""

    public: bool = option(False, help="reproduce the published P-KL (chunk means, raw-logit column choice)")
    public_eps: float = option(1e-10, help="public form: clamp of the projected student probability", gt=0)

    def check(self) -> None:
        if self.public and self.direction != "forward":
            raise self.fail("pkl: public=True reproduces the published forward P-KL only; use direction='forward'")

    @property
    def unit_mode(self) -> str:
        """`units.chunk_units` mode: chunk starts (principled) or every position of the chunk (public)."""
        return "mean" if self.public else "start"


def pkl_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    projection,
    teacher_index: int = 0,
    normalizer=None,
    temperature: float = 1.0,
    direction: str = "forward",
    top_k_columns: int | None = DEFAULT_TOP_K_COLUMNS,
    columns: torch.Tensor | None = None,
    public: bool = False,
    correct_only: bool = True,
    process_group=None,
    position_chunk_size: int | None = None,
    public_eps: float = 1e-10,
    check_inputs: bool = False,
):
    """P-KL of teacher `teacher_index` (module doc). Returns `(loss, metrics)`.

    `projection`: a `Projection` (see `load_projection`), an artifact directory, or
    `(indices, weights)`. `top_k_columns=None` uses every reachable teacher column (exact, slower);
    `columns` fixes the teacher column set instead of choosing it. `direction="reverse"` gives
    KL(student || teacher) (principled form only). Metrics (means over valid chunks): `kl` (without
    T^2), `teacher_mass_in_columns`; principled form also `teacher_reachable_mass` and
    `student_mapped_mass`.
    """
    check_options(PKLOptions, teacher_index=teacher_index, temperature=temperature, direction=direction,
                  top_k_columns=top_k_columns, public=public, correct_only=correct_only,
                  position_chunk_size=position_chunk_size, public_eps=public_eps, check_inputs=check_inputs)
    T = float(temperature)
    zt = as_teacher_outputs(teacher_outputs, loss="pkl", accepts=TEACHER_FORMS).logits
    if student_logits.dim() != 3 or zt.dim() != 3:
        raise LossInputError(
            f"pkl: student logits {tuple(student_logits.shape)} and teacher logits {tuple(zt.shape)} must be [B, T, V]"
        )
    B, Ls, Vs = student_logits.shape
    if zt.shape[0] != B:
        raise LossInputError(f"pkl: teacher logits batch size {zt.shape[0]} != student batch size {B}")
    Lt, Vt = zt.shape[1], zt.shape[2]
    dev = student_logits.device
    proj = as_projection(projection, dev)
    proj.check_widths(Vs, Vt)
    if check_inputs:
        check_chunk_ids(batch, teacher_index)
    units = chunk_units(
        batch, teacher_index, B, Ls, Lt, mode="mean" if public else "start", correct_only=correct_only, device=dev
    )
    if check_inputs:  # the rows the loss reads only: padding never raises
        check_finite_rows("pkl", "student_logits", student_logits, units.student_rows)
        check_finite_rows("pkl", "teacher logits", zt, units.teacher_rows)
    cdt = compute_dtype(student_logits.dtype)
    norm = resolve_normalizer(normalizer, units.num_units, cdt)
    zs_flat = student_logits.reshape(B * Ls, Vs)
    zt_flat = zt.reshape(B * Lt, Vt)
    n = rows_per_chunk(position_chunk_size, max(Vs, Vt))
    want_grad = needs_grad(student_logits)
    args = (zs_flat, zt_flat, units, proj, norm, T, n, want_grad, cdt)
    with torch.no_grad():
        if public:
            total, grad, metrics = _public(*args, top_k_columns, columns, process_group, public_eps)
            bad = None
        else:
            total, grad, metrics, bad = _principled(*args, top_k_columns, columns, process_group, direction)
    count = units.num_units.to(cdt).clamp_min(1)
    metrics = {k: poison(v / count, bad).detach() for k, v in metrics.items()}
    loss = poison(total * (T * T) / norm, bad)
    return attach_grad(student_logits, loss, grad.view(B, Ls, Vs) if grad is not None else None), metrics


def _principled(zs_flat, zt_flat, units, proj, norm, T, n, want_grad, cdt, top_k, columns, group, direction):
    """One comparison per chunk start, in log space (docs/losses.md, "Numerics"). The teacher rows are
    read once (normalisers, reachable mass, column scores), then the student rows once, computing loss
    and gradient together and writing the gradient rows in place; rows whose masses a shifted
    exponential cannot represent are recomputed exactly afterwards. Returns `(total, grad, metrics,
    bad)`, `bad` a `[]` bool: some row the loss reads is not finite."""
    dev = zs_flat.device
    Ns, Vs = zs_flat.shape
    Nt, Vt = zt_flat.shape
    srows, trows = units.student_rows, units.teacher_rows
    U = srows.shape[0]
    reach = proj.reachable_columns(Vt)  # [V_t]
    t_is_unit = torch.zeros(Nt, dtype=torch.bool, device=dev)
    t_is_unit[trows] = True
    floor = _log_floor(cdt, max(Vs, Vt))

    # Teacher pass: log-normaliser, log reachable mass and each column's best log-probability over the
    # chunk-start rows; other rows of a slice are never read (index_fill, not a multiply: NaN * 0 = NaN).
    lse_all = torch.zeros(Nt, dtype=cdt, device=dev)
    log_reach_all = torch.zeros(Nt, dtype=cdt, device=dev)
    max_all = torch.zeros(Nt, dtype=cdt, device=dev)
    thin_all = torch.zeros(Nt, dtype=torch.bool, device=dev)  # reachable mass underflowed: recompute
    scores = torch.full((Vt,), float("-inf"), dtype=cdt, device=dev)
    sums_t = torch.stack([torch.ones(Vt, dtype=cdt, device=dev), reach.to(cdt)], dim=1)  # [V_t, 2]
    slices = _slices_with_rows(t_is_unit, n)
    if slices:
        m0 = min(n, Nt)
        tbuf = torch.empty(m0, Vt, dtype=cdt, device=dev)
        ebuf = torch.empty(m0, Vt, dtype=cdt, device=dev)
    for r0, r1, others in slices:
        out, mx = shift_rows(zt_flat[r0:r1], T, tbuf[: r1 - r0])
        sums = torch.exp(out, out=ebuf[: r1 - r0]) @ sums_t  # [m, 2]: total and reachable mass
        shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)) / T
        log_s = torch.log(sums[:, 0])
        lse_all[r0:r1] = shift + log_s
        log_reach_all[r0:r1] = shift + torch.log(sums[:, 1])
        max_all[r0:r1] = mx
        thin_all[r0:r1] = sums[:, 1] < math.exp(floor)
        if columns is None:
            lp = out.sub_(log_s[:, None])  # log-probabilities
            if others is not None:
                lp.index_fill_(0, others, float("-inf"))
            torch.maximum(scores, lp.amax(dim=0), out=scores)
    tbuf = ebuf = None
    bad = nonfinite(max_all[trows])
    if columns is not None:
        cols = torch.as_tensor(columns, dtype=torch.int64, device=dev)
        cols = torch.unique(cols[(cols >= 0) & (cols < Vt)])
        cols = cols[reach[cols]]
    else:
        log_scores = torch.where(reach, scores, torch.full_like(scores, float("-inf")))
        cols = top_columns(reduce_column_scores(log_scores, group), top_k)
    restr = restrict_projection(proj, cols, Vs, Vt, cdt)
    k = cols.shape[0]
    rest_empty = k == int(reach.sum())
    teacher = _teacher_units(zt_flat, trows, lse_all, log_reach_all, thin_all & torch.isfinite(max_all),
                             cols, reach, rest_empty, T, n, cdt, direction)

    # Student pass.
    side = _StudentSide(
        entry_rows=restr.entry_rows, entry_slots=restr.entry_slots, log_entry_w=torch.log(restr.entry_weights),
        k=k, sums=torch.stack([torch.ones(Vs, dtype=cdt, device=dev), restr.rest_weights], dim=1),
        log_rest_w=torch.log(restr.rest_weights), odd=restr.odd_rows, r_odd=restr.rest_weights[restr.odd_rows],
        rest_empty=rest_empty, T=T, scale=(T / norm) if want_grad else None, direction=direction, floor=floor,
    )
    unit_of = torch.full((Ns,), -1, dtype=torch.int64, device=dev)
    unit_of[srows] = torch.arange(U, device=dev)
    grad = torch.empty_like(zs_flat) if want_grad else None
    direct = want_grad and grad.dtype == cdt
    zero = torch.zeros((), dtype=cdt, device=dev)
    total, m_mapped = zero.clone(), zero.clone()
    s_slices = _slices_with_rows(unit_of >= 0, n)
    if want_grad:
        _zero_outside(grad, s_slices)
    redo = torch.zeros(Ns, dtype=torch.bool, device=dev)
    sbuf = torch.empty(min(n, Ns), Vs, dtype=cdt, device=dev) if s_slices and not direct else None
    for r0, r1, others in s_slices:
        uid = unit_of[r0:r1]
        w = uid >= 0
        uid = uid.clamp(min=0)
        buf = grad[r0:r1] if direct else sbuf[: r1 - r0]
        kl, mapped, flag, mx = _student_rows(zs_flat[r0:r1], buf, teacher.log_p(zt_flat, uid), side, exact=False)
        bad = bad | nonfinite(torch.where(w, mx, zero))
        redo[r0:r1] = w & flag & torch.isfinite(mx)
        keep = w & ~flag
        total += torch.where(keep, kl, zero).sum()
        m_mapped += torch.where(keep, mapped, zero).sum()
        if want_grad:
            if others is not None:
                buf.index_fill_(0, others, 0.0)
            if not direct:
                grad[r0:r1] = buf
    # Rows whose rest or mapped mass a shifted exponential cannot represent: exactly, in log space.
    rows = redo.nonzero().squeeze(1)
    for i0 in range(0, rows.shape[0], n):
        r = rows[i0 : i0 + n]
        buf = torch.empty(r.shape[0], Vs, dtype=cdt, device=dev)
        kl, mapped, _, _ = _student_rows(zs_flat[r], buf, teacher.log_p(zt_flat, unit_of[r]), side, exact=True)
        total += kl.sum()
        m_mapped += mapped.sum()
        if want_grad:
            grad.index_copy_(0, r, buf.to(grad.dtype))
    metrics = {
        "kl": total.clone(),
        "teacher_mass_in_columns": teacher.mass_in_columns.sum(),
        "teacher_reachable_mass": torch.exp(teacher.log_norm - lse_all[trows]).sum(),
        "student_mapped_mass": m_mapped,
    }
    return total, grad, metrics, bad


def _log_floor(cdt, width: int) -> float:
    """log of the smallest mass, relative to a row's largest term (1 after the shift), that a sum of
    shifted exponentials still holds to working precision: at most `width` terms below `finfo.tiny`
    each are lost (float32, 152k columns: exp(-59.6))."""
    fi = torch.finfo(cdt)
    return math.log(width * fi.tiny / fi.eps)


# Reverse direction only: a teacher rest mass (outside S, of the reachable mass) below this is
# recomputed exactly. `1 - sum over S` has an absolute error of about 1e-6, and the reverse KL divides
# by the rest mass; the forward KL only multiplies by it, so there the difference is exact enough.
REST_EXACT_BELOW = 0.05


@dataclass
class _TeacherUnits:
    """Per unit (chunk start): the teacher's log reachable normaliser (`logsumexp` of z/T over the
    reachable columns), its log rest mass (reachable columns outside S, renormalised) and its mass on S."""

    cols: torch.Tensor
    log_norm: torch.Tensor  # [U]
    log_rest: torch.Tensor  # [U]
    mass_in_columns: torch.Tensor  # [U]
    T: float
    trows: torch.Tensor

    def log_p(self, zt_flat, uid):
        """`[m, k + 1]` teacher log-probabilities of units `uid` on S and the rest."""
        t_r = self.trows[uid]
        log_p_s = zt_flat[t_r[:, None], self.cols[None, :]].to(self.log_norm.dtype) / self.T
        return torch.cat([log_p_s - self.log_norm[uid, None], self.log_rest[uid, None]], dim=1)


def _teacher_units(zt_flat, trows, lse_all, log_reach_all, thin_all, cols, reach, rest_empty, T, n, cdt,
                   direction) -> _TeacherUnits:
    """The teacher side of each unit once S is known: mass on S from the gathered logits, the rest as
    `1 - mass on S`, and, for units where that is not precise enough (reachable mass that underflowed
    in the shifted sum, or a small rest in the reverse direction), both exactly by `logsumexp` over
    the reachable / rest columns (one host sync)."""
    dev = zt_flat.device
    U, k = trows.shape[0], cols.shape[0]
    log_norm = log_reach_all[trows].clone()
    mass_in = torch.empty(U, dtype=cdt, device=dev)
    log_rest = torch.full((U,), float("-inf"), dtype=cdt, device=dev)
    nu = max(1, DEFAULT_CHUNK_ELEMENTS // max(k, 1))
    for u0 in range(0, U, nu):
        zs_ = zt_flat[trows[u0 : u0 + nu, None], cols[None, :]].to(cdt) / T
        mass_in[u0 : u0 + nu] = torch.exp(zs_ - log_norm[u0 : u0 + nu, None]).sum(dim=1)
    if not rest_empty:
        torch.log((1.0 - mass_in).clamp_min(0.0), out=log_rest)
    exact = thin_all[trows]
    if direction == "reverse" and not rest_empty:
        exact = exact | (1.0 - mass_in < REST_EXACT_BELOW)
    units = exact.nonzero().squeeze(1)
    if units.numel():
        in_s = torch.zeros_like(reach)
        in_s[cols] = True
        masks = torch.stack([reach] if rest_empty else [reach, reach & ~in_s], dim=1)  # [V_t, 1 or 2]
        floor = _log_floor(cdt, zt_flat.shape[1])
        for i0 in range(0, units.shape[0], n):
            u = units[i0 : i0 + n]
            rows = trows[u]
            log_sums = _log_masked_sums(zt_flat, rows, masks, T, floor, cdt)  # [m, 1 or 2]
            log_norm[u] = log_sums[:, 0]
            mass_in[u] = torch.exp(zt_flat[rows[:, None], cols[None, :]].to(cdt) / T - log_sums[:, :1]).sum(dim=1)
            if not rest_empty:
                log_rest[u] = log_sums[:, 1] - log_sums[:, 0]
    return _TeacherUnits(cols, log_norm, log_rest, mass_in, T, trows)


def _log_masked_sums(z_flat, rows, masks, T, floor, cdt):
    """`[m, c]`: `logsumexp` of `z / T` over each of the c column masks (`masks [V, c]` bool) for rows
    `rows` of `z_flat`: sums of exponentials shifted by the row maximum (a mat-vec: sums of positive
    terms, no cancellation), and a masked `logsumexp` for the rows where such a sum underflows."""
    z = z_flat[rows].to(cdt)
    out, mx = shift_rows(z, T, torch.empty_like(z))
    shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)) / T
    sums = torch.exp(out, out=out) @ masks.to(cdt)
    log_sums = shift[:, None] + torch.log(sums)
    thin = ((sums < math.exp(floor)) & torch.isfinite(mx)[:, None]).any(dim=1).nonzero().squeeze(1)
    for i in thin.tolist():  # rare: the mass lies entirely 60 nats or more below the row's maximum
        y = z[i].to(cdt) / T
        log_sums[i] = torch.stack([torch.logsumexp(torch.where(masks[:, j], y, float("-inf")), dim=0)
                                   for j in range(masks.shape[1])])
    return log_sums


@dataclass
class _StudentSide:
    """What every student row of a call shares: W restricted to S (entries in log space), the rest
    weights, and the options."""

    entry_rows: torch.Tensor  # [E]
    entry_slots: torch.Tensor  # [E]
    log_entry_w: torch.Tensor  # [E]
    k: int
    sums: torch.Tensor  # [V_s, 2]: ones and rest weights
    log_rest_w: torch.Tensor  # [V_s]
    odd: torch.Tensor  # [J] rows whose rest weight is not 1
    r_odd: torch.Tensor  # [J]
    rest_empty: bool
    T: float
    scale: torch.Tensor | None  # T / normaliser (None: no gradient)
    direction: str
    floor: float


def _student_rows(z, buf, log_p, side: _StudentSide, exact: bool):
    """Loss and gradient of student rows `z [m, V_s]` against teacher `log_p [m, k + 1]`, in log space.

    S masses: per-slot logsumexp of `log p + log w` over W's entries (always exact). Rest and mapped
    masses: with `exact=False` from the shifted exponentials (one mat-vec); rows where they fall
    below what that represents (`floor`) are flagged for an `exact=True` pass, which takes the rest by
    `logsumexp` too. The gradient, `(T / norm) * sum_j g_j * share_vj` with `g = d kl / d log mass`
    (`log_divergence`) and `share_vj = p_v W_vj / mass_j` (<= 1), is written into `buf` (which held the
    shifted logits). Returns `(kl [m], mapped mass [m], flagged [m], raw row max [m])`."""
    out, mx = shift_rows(z, side.T, buf)  # log of the unnormalised probabilities, <= 0
    n_rows, E = out.shape[0], side.entry_rows.shape[0]
    log_s_mass, u, s = log_slot_masses(out[:, side.entry_rows] + side.log_entry_w, side.entry_slots, side.k)
    if exact:
        rest_terms = out + side.log_rest_w  # [m, V_s]
        log_tot = torch.logsumexp(out, dim=1)
        log_rest = torch.logsumexp(rest_terms, dim=1)
    else:
        sums = torch.exp(out, out=out) @ side.sums  # out now holds the shifted exponentials
        log_tot = torch.log(sums[:, 0])
        log_rest = torch.log(sums[:, 1])
    kl, log_q, g = log_divergence(torch.cat([log_s_mass, log_rest[:, None]], dim=1), log_p, side.direction)
    log_mapped = torch.logsumexp(torch.cat([log_s_mass, log_rest[:, None]], dim=1), dim=1)
    if side.direction == "forward":
        flag = (log_mapped < side.floor) | ((log_p[:, -1] > float("-inf")) & (log_rest < side.floor))
    else:
        flag = log_mapped < side.floor
    if side.scale is not None:
        # rest part: coef * p_v r_v / L (forward: L = rest mass, coef = g_rest; reverse: L = mapped
        # mass, coef = g_rest / Q_rest, finite also where Q_rest underflows)
        if side.direction == "forward":
            coef, log_l = g[:, -1], log_rest
        else:
            ell = torch.where(log_q[:, -1] > float("-inf"), log_q[:, -1] - log_p[:, -1], torch.zeros_like(kl))
            coef, log_l = ell - kl, log_mapped
        log_l = torch.where(torch.isfinite(log_l), log_l, torch.zeros_like(log_l))
        coef = coef * side.scale
        if exact:
            torch.exp(rest_terms.sub_(log_l[:, None]), out=out).mul_(coef[:, None])
        else:
            if side.direction == "forward":  # (Q_rest - P_rest) / rest mass, as two terms that cannot overflow
                alpha = torch.exp(-log_mapped) - torch.exp(log_p[:, -1] - log_l)
                alpha = alpha * side.scale
            else:
                alpha = coef * torch.exp(-log_l)
            e_odd = out[:, side.odd]
            out.mul_(alpha[:, None])  # right for every row whose rest weight is 1
            out[:, side.odd] = e_odd * (alpha[:, None] * side.r_odd)
        # S part: g_j * (entry's share of slot j)
        per_slot = g[:, :-1] * side.scale / torch.where(s > 0, s, torch.ones_like(s))
        idx = side.entry_slots.expand(n_rows, E)
        out.scatter_add_(1, side.entry_rows.expand(n_rows, E), u * per_slot.gather(1, idx))
    return kl, torch.exp(log_mapped - log_tot), flag, mx


def _slices_with_rows(has_unit: torch.Tensor, n: int) -> list[tuple[int, int, torch.Tensor | None]]:
    """Contiguous row slices of at most n rows, skipping slices with no unit row, each with the local
    indices of its rows that are no unit (None when all are), which the caller must never let
    contribute (one host sync)."""
    host = has_unit.cpu()
    out = []
    for r0 in range(0, host.shape[0], n):
        h = host[r0 : r0 + n]
        if not bool(h.any()):
            continue
        others = (~h).nonzero().squeeze(1)
        out.append((r0, r0 + h.shape[0], others.to(has_unit.device) if others.numel() else None))
    return out


def _zero_outside(grad: torch.Tensor, slices) -> None:
    """Zero the gradient rows no slice will write."""
    r = 0
    for r0, r1, _ in slices:
        if r0 > r:
            grad[r:r0].zero_()
        r = r1
    if r < grad.shape[0]:
        grad[r:].zero_()


def _public(zs_flat, zt_flat, units, proj, norm, T, n, want_grad, cdt, top_k, columns, group, eps):
    dev = zs_flat.device
    Vs, Vt = zs_flat.shape[1], zt_flat.shape[1]
    U = units.student_count.shape[0]
    if columns is not None:
        cols = torch.unique(torch.as_tensor(columns, dtype=torch.int64, device=dev))
    else:
        # Published rule: raw teacher logit, max over every position of the microbatch (padding too).
        scores = torch.full((Vt,), float("-inf"), dtype=cdt, device=dev)
        for r0 in range(0, zt_flat.shape[0], n):
            torch.maximum(scores, zt_flat[r0 : r0 + n].amax(dim=0).to(cdt), out=scores)
        scores = reduce_column_scores(scores, group)
        cols = top_columns(scores, top_k)
    restr = restrict_projection(proj, cols, Vs, Vt, cdt)
    k = cols.shape[0]

    # Teacher: mean over the chunk's positions of the log-softmax over S.
    lsum = torch.zeros(U, k, dtype=cdt, device=dev)
    tr, tu = units.teacher_rows, units.teacher_unit
    for r0 in range(0, tr.shape[0], n):
        zt_s = zt_flat[tr[r0 : r0 + n, None], cols[None, :]].to(cdt)
        lsum.index_add_(0, tu[r0 : r0 + n], torch.log_softmax(zt_s / T, dim=1))
    log_pt = lsum.div_(units.teacher_count.to(cdt)[:, None])  # [U, k], in place

    # Student: projected probabilities summed over the chunk's positions (pass 1, no gradient).
    sr, su = units.student_rows, units.student_unit
    qsum = torch.zeros(U, k, dtype=cdt, device=dev)
    sbuf = torch.empty(min(n, sr.shape[0]), Vs, dtype=cdt, device=dev)
    for r0 in range(0, sr.shape[0], n):
        z = gather_rows(zs_flat, sr[r0 : r0 + n], sbuf)
        p, _ = softmax_rows(z, T, out=z)
        a, _, _ = project_probs(p, restr)
        qsum.index_add_(0, su[r0 : r0 + n], a)

    # Chunk-level KL and d loss / d qsum (T^2 / norm included), a block of chunks at a time so the
    # [U, k] temporaries stay bounded; d loss / d qsum overwrites qsum.
    total = torch.zeros((), dtype=cdt, device=dev)
    mass = torch.zeros((), dtype=cdt, device=dev)
    nu = max(1, (1 << 20) // max(k, 1))
    for u0 in range(0, U, nu):
        qs, lp = qsum[u0 : u0 + nu], log_pt[u0 : u0 + nu]
        zsum = qs.sum(dim=1, keepdim=True)
        zsum = torch.where(zsum > 0, zsum, torch.ones_like(zsum))
        q = qs / zsum
        unclamped = q > eps
        log_q = torch.log(torch.where(unclamped, q, torch.full_like(q, eps)))
        pt = torch.exp(lp)
        total += (pt * (lp - log_q)).sum()
        mass += pt.sum()
        if want_grad:
            pu = torch.where(unclamped, pt, torch.zeros_like(pt))
            d = pu.sum(dim=1, keepdim=True) / zsum - pu / torch.where(unclamped, qs, torch.ones_like(qs))
            qs.copy_(d.mul_(T * T / norm))
    metrics = {"kl": total.clone(), "teacher_mass_in_columns": mass}
    if not want_grad:
        return total, None, metrics
    d_q = qsum

    # Pass 2: recompute p and push the gradient back.
    grad = torch.zeros_like(zs_flat)
    for r0 in range(0, sr.shape[0], n):
        rows = sr[r0 : r0 + n]
        z = gather_rows(zs_flat, rows, sbuf)
        p, _ = softmax_rows(z, T, out=z)
        a, _, pe = project_probs(p, restr)
        d = d_q[su[r0 : r0 + n]]  # [n, k]
        c = (a * d).sum(dim=1)
        h = p.mul_(-c[:, None])
        h.scatter_add_(1, restr.entry_rows.expand(h.shape[0], -1), pe * d[:, restr.entry_slots])
        h.div_(T)
        grad.index_copy_(0, rows, h if h.dtype == grad.dtype else h.to(grad.dtype))
    return total, grad, metrics


class PKLLoss(LossModule):
    """`pkl_loss` with fixed options. `projection`: a `Projection`, an artifact directory, or
    `(indices, weights)`, loaded once and kept as non-persistent buffers (moved by `.to()`)."""

    function = staticmethod(pkl_loss)
    options_type = PKLOptions

    def __init__(self, projection, *, teacher_index: int = 0, temperature: float = 1.0, direction: str = "forward",
                 top_k_columns: int | None = DEFAULT_TOP_K_COLUMNS, columns: torch.Tensor | None = None,
                 public: bool = False, correct_only: bool = True, process_group=None,
                 position_chunk_size: int | None = None, public_eps: float = 1e-10, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, direction=direction,
                         top_k_columns=top_k_columns, columns=columns, public=public, correct_only=correct_only,
                         process_group=process_group, position_chunk_size=position_chunk_size,
                         public_eps=public_eps, check_inputs=check_inputs)
        self.register_artifact("projection", as_projection(projection, "cpu"))

    @property
    def projection(self):
        return self.artifact("projection")
