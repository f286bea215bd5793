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
Public (`public=True`): NeMo-RL's published P-KL, its defaults included (`losses/public.py`)
- Chunk distributions averaged over every position whose next token is in the chunk: the student's
  projected probabilities arithmetically (then renormalised over S, `log(Q / (sum Q + eps) + eps)`),
  the teacher's log-softmax over S only (a geometric mean, not renormalised), so the "KL" can be
  negative. Every valid chunk counts, correct or not (`correct_only=None`).
- S: top `top_k_columns` columns by raw teacher logit over *all* positions, padding included, of the
  teacher logits cut to the projection's teacher vocabulary.

Both: sum over valid chunks of `T^2 * KL`, divided by `normalizer` (default: the number of valid
chunks). Teacher outputs are treated as constants (no gradient). Top-k teacher outputs (with
`rest_logprob`, CONTRACTS §3) take the principled form at T = 1 in `losses/pkl_topk.py`.

Numerics (principled form; docs/losses.md, "Numerics"): log space throughout. The student's masses
on S are per-column logsumexps over W's entries (`projection.log_slot_masses`), its rest and mapped
masses shifted sums that fall back to logsumexp on the rare rows where those underflow, the teacher's
normalisers and column scores log-probabilities; the KL and its gradient are formed from the logs
(the gradient through each row's share `p_v W_vj / a_j <= 1` of an outcome), so finite float32 / bf16
logits of any spread give a finite loss and gradient. Only chunk-start rows are read: anything at
other rows changes nothing and gets gradient 0; a NaN / +inf (or all -inf) row that is read makes the
loss NaN (no sync), or a `LossInputError` naming it with `check_inputs=True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.batch_tokenizers import check_batch_tokenizers
from xtoken_loss.checks import check_chunk_inputs, check_finite_rows, nonfinite
from xtoken_loss.chunked import (
    DEFAULT_CHUNK_ELEMENTS,
    check_options,
    compute_dtype,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    shift_rows,
    unit_result,
)
from xtoken_loss.losses.pkl_topk import pkl_topk_loss
from xtoken_loss.losses.public import public_pkl
from xtoken_loss.modules import LossModule
from xtoken_loss.projection import (
    as_projection,
    log_slot_masses,
    reduce_column_scores,
    restrict_projection,
    top_columns,
)
from xtoken_loss.teacher_outputs import TOPK_REST_KEYS, as_teacher_outputs
from xtoken_loss.units import check_chunk_ids, chunk_units

DEFAULT_TOP_K_COLUMNS = 8192
TEACHER_FORMS = ("logits", "topk")  # top-k: the pair + rest_logprob (losses/pkl_topk.py)


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

    correct_only: bool | None = option(None, help="count only chunks whose pair is correct (pair_is_correct); None: "
                                       "yes, except with public=True (NeMo-RL counts every valid chunk)")
    public: bool = option(False, help="NeMo-RL's published P-KL, its defaults included (docs/losses.md)")
    public_eps: float = option(1e-10, help="public form: the eps of log(Q / (sum Q + eps) + eps)", gt=0)

    @property
    def only_correct(self) -> bool:
        """`correct_only` resolved: its value, else True (principled) / False (public)."""
        return (not self.public) if self.correct_only is None else self.correct_only

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
    correct_only: bool | None = None,
    process_group=None,
    position_chunk_size: int | None = None,
    public_eps: float = 1e-10,
    check_inputs: bool = False,
):
    """P-KL of teacher `teacher_index` (module doc). Returns `(loss, metrics)`.

    `projection`: a `Projection` (see `load_projection`), an artifact directory, or
    `(indices, weights)`. `top_k_columns=None` uses every reachable teacher column (exact, slower);
    `columns` fixes the teacher column set instead of choosing it. `direction="reverse"` gives
    KL(student || teacher). `correct_only` (None: True, with `public=True` False) counts only the
    chunks whose pair is correct. Metrics (means over valid chunks): `kl` (without
    T^2), `teacher_mass_in_columns`; principled form also `teacher_reachable_mass` and
    `student_mapped_mass`.
    """
    o = check_options(PKLOptions, teacher_index=teacher_index, temperature=temperature, direction=direction,
                      top_k_columns=top_k_columns, public=public, correct_only=correct_only,
                      position_chunk_size=position_chunk_size, public_eps=public_eps, check_inputs=check_inputs)
    correct_only = o.only_correct
    T = float(temperature)
    teacher = as_teacher_outputs(teacher_outputs, loss="pkl", accepts=TEACHER_FORMS, needs=TOPK_REST_KEYS)
    if teacher.form == "topk":
        return pkl_topk_loss(student_logits, teacher, batch, projection=projection, teacher_index=teacher_index,
                             normalizer=normalizer, temperature=temperature, direction=direction,
                             top_k_columns=top_k_columns, columns=columns, public=public, correct_only=correct_only,
                             process_group=process_group, check_inputs=check_inputs)
    zt = teacher.logits
    proj = as_projection(projection, student_logits.device)
    check_batch_tokenizers(proj, batch, teacher_index, loss="pkl")  # a batch for other tokenizers: say so first
    normalizer = check_chunk_inputs("pkl", student_logits, zt, batch, teacher_index, normalizer,
                                    correct_only=correct_only)
    if public:
        return public_pkl(student_logits, zt, batch, projection=proj, teacher_index=teacher_index,
                          normalizer=normalizer, temperature=temperature, direction=direction,
                          top_k_columns=top_k_columns, columns=columns, correct_only=correct_only,
                          process_group=process_group, position_chunk_size=position_chunk_size, eps=public_eps,
                          check_inputs=check_inputs)
    if student_logits.dim() != 3 or zt.dim() != 3:
        raise LossInputError(
            f"pkl: student logits {tuple(student_logits.shape)} and teacher logits {tuple(zt.shape)} must be [B, T, V]"
        )
    B, Ls, Vs = student_logits.shape
    if zt.shape[0] != B:
        raise LossInputError(f"pkl: teacher logits batch size {zt.shape[0]} != student batch size {B}")
    Lt, Vt = zt.shape[1], zt.shape[2]
    dev = student_logits.device
    proj.check_widths(Vs, Vt)
    if check_inputs:
        check_chunk_ids(batch, teacher_index)
    units = chunk_units(batch, teacher_index, B, Ls, Lt, mode="start", correct_only=correct_only, device=dev)
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
        total, grad, metrics, bad = _principled(*args, top_k_columns, columns, process_group, direction)
    return unit_result(student_logits, total * (T * T), norm, metrics, units, bad, grad)


def _principled(zs_flat, zt_flat, units, proj, norm, T, n, want_grad, cdt, top_k, columns, group, direction):
    """One comparison per chunk start, in log space (docs/losses.md, "Numerics"). The teacher rows are
    read once (normalisers, reachable mass, column scores), then the student rows once, computing loss
    and gradient together and writing the gradient rows in place; the rare rows whose masses a shifted
    exponential cannot hold are recomputed exactly afterwards. Returns `(total, grad, metrics, bad)`,
    `bad` a `[]` bool: some row the loss reads is not finite."""
    dev = zs_flat.device
    Ns, Vs = zs_flat.shape
    Nt, Vt = zt_flat.shape
    srows, trows = units.student_rows, units.teacher_rows
    U = srows.shape[0]
    reach = proj.reachable_columns(Vt)  # [V_t]
    t_is_unit = torch.zeros(Nt, dtype=torch.bool, device=dev)
    t_is_unit[trows] = True
    floor = _log_floor(cdt, max(Vs, Vt))
    low = math.log(torch.finfo(cdt).tiny) + 1.0  # exp of less may be denormal: lifted to ~tiny, within `floor`

    # Teacher pass: log-normaliser, log reachable mass and each column's best log-probability over the
    # chunk-start rows. A slice's other rows are never read (overwritten, not multiplied: NaN * 0 = NaN).
    lse_all = torch.zeros(Nt, dtype=cdt, device=dev)
    log_reach_all = torch.zeros(Nt, dtype=cdt, device=dev)
    max_all = torch.zeros(Nt, dtype=cdt, device=dev)
    scores = torch.full((Vt,), float("-inf"), dtype=cdt, device=dev)
    reach_w = reach.to(cdt)
    slices = _slices_with_rows(t_is_unit, n)
    tbuf = torch.empty(min(n, Nt), Vt, dtype=cdt, device=dev) if slices else None
    for r0, r1, others in slices:
        z = zt_flat[r0:r1]
        out, mx = shift_rows(z, T, tbuf[: r1 - r0])
        e = out.clamp_min_(low).exp_()  # no denormals (slow on CPUs): adds < V tiny, within `floor`
        safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        log_s = e.sum(dim=1).log_()
        lse_all[r0:r1] = safe / T + log_s
        log_reach_all[r0:r1] = safe / T + torch.log(e @ reach_w)
        max_all[r0:r1] = mx
        if columns is None:
            lp = torch.sub(z, (safe + T * log_s)[:, None], out=e)  # log-probabilities (z - m) / T - log s
            if T != 1.0:
                lp.div_(T)
            for a, b in others:
                lp[a:b].fill_(float("-inf"))
            torch.maximum(scores, lp.amax(dim=0), out=scores)
    tbuf = None
    max_u = max_all[trows]
    bad = nonfinite(max_u)
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
    teacher = _teacher_units(zt_flat, trows, lse_all[trows], log_reach_all[trows], torch.isfinite(max_u), cols,
                             reach, rest_empty, T, n, cdt, direction, floor)

    # Student pass.
    side = _StudentSide(
        entry_rows=restr.entry_rows, entry_slots=restr.entry_slots, log_entry_w=torch.log(restr.entry_weights),
        k=k, rest_w=restr.rest_weights, log_rest_w=torch.log(restr.rest_weights), odd=restr.odd_rows,
        r_odd=restr.rest_weights[restr.odd_rows], rest_empty=rest_empty, T=T,
        scale=(T / norm) if want_grad else None, direction=direction, floor=floor, low=low,
    )
    unit_of = torch.full((Ns,), -1, dtype=torch.int64, device=dev)
    unit_of[srows] = torch.arange(U, device=dev)
    grad = torch.empty_like(zs_flat) if want_grad else None
    direct = want_grad and grad.dtype == cdt
    zero = torch.zeros((), dtype=cdt, device=dev)
    total, m_in, m_mapped = zero.clone(), zero.clone(), zero.clone()
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
        lp, p, lp_rest, mass_in = teacher.log_p(zt_flat, uid)
        kl, mapped, flag, mx = _student_rows(zs_flat[r0:r1], buf, lp, p, lp_rest, side, exact=False)
        bad = bad | nonfinite(torch.where(w, mx, zero))
        redo[r0:r1] = w & flag & torch.isfinite(mx)
        keep = w & ~flag
        total += torch.where(keep, kl, zero).sum()
        m_in += torch.where(keep, mass_in, zero).sum()
        m_mapped += torch.where(keep, mapped, zero).sum()
        if want_grad:
            for a, b in others:
                buf[a:b].zero_()
            if not direct:
                grad[r0:r1] = buf
    # Rows whose rest or mapped mass a shifted exponential cannot hold: exactly, in log space.
    rows = redo.nonzero().squeeze(1)
    for i0 in range(0, rows.shape[0], n):
        r = rows[i0 : i0 + n]
        buf = torch.empty(r.shape[0], Vs, dtype=cdt, device=dev)
        lp, p, lp_rest, mass_in = teacher.log_p(zt_flat, unit_of[r])
        kl, mapped, _, _ = _student_rows(zs_flat[r], buf, lp, p, lp_rest, side, exact=True)
        total += kl.sum()
        m_in += mass_in.sum()
        m_mapped += mapped.sum()
        if want_grad:
            grad.index_copy_(0, r, buf.to(grad.dtype))
    metrics = {
        "kl": total.clone(),
        "teacher_mass_in_columns": m_in,
        "teacher_reachable_mass": torch.exp(teacher.log_norm - teacher.lse).sum(),
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
# recomputed from its own terms. `1 - mass on S` has an absolute error of about 1e-6, and the reverse
# KL divides by the rest mass; the forward KL only multiplies by it, so there the difference is exact
# enough.
REST_EXACT_BELOW = 0.05


@dataclass
class _TeacherUnits:
    """The teacher per unit (chunk start): `lse` and `log_norm`, the logsumexp of z/T over all and over
    the reachable columns, and (reverse direction) the log rest mass, renormalised."""

    cols: torch.Tensor
    trows: torch.Tensor
    lse: torch.Tensor  # [U]
    log_norm: torch.Tensor  # [U]
    log_rest: torch.Tensor | None  # [U]; None: 1 - mass on S
    rest_empty: bool
    T: float

    def log_p(self, zt_flat, uid):
        """Units `uid`: `(log_p [m, k], p [m, k], log_p_rest [m], mass on S [m])`, renormalised over the
        reachable columns."""
        lp = _gather(zt_flat, self.trows[uid], self.cols).to(self.log_norm.dtype)
        if self.T != 1.0:
            lp.div_(self.T)
        lp.sub_(self.log_norm[uid, None])
        p = torch.exp(lp)
        mass_in = p.sum(dim=1)
        if self.rest_empty:
            lp_rest = torch.full_like(mass_in, float("-inf"))
        elif self.log_rest is None:
            lp_rest = torch.log((1.0 - mass_in).clamp_min(0.0))
        else:
            lp_rest = self.log_rest[uid]
        return lp, p, lp_rest, mass_in


def _gather(z_flat, rows, cols):
    """`z_flat[rows[:, None], cols[None, :]]` (a single flat index where z_flat is contiguous: faster)."""
    if z_flat.is_contiguous():
        return z_flat.view(-1)[rows[:, None] * z_flat.shape[1] + cols[None, :]]
    return z_flat[rows[:, None], cols[None, :]]


def _teacher_units(zt_flat, trows, lse, log_norm, finite, cols, reach, rest_empty, T, n, cdt, direction,
                   floor) -> _TeacherUnits:
    """The teacher side of each unit once S is known. The reachable mass of the rare units where it
    underflowed in the shifted sum is recomputed exactly; in the reverse direction, so is the rest
    mass where `1 - mass on S` is not precise enough (host syncs)."""
    log_norm = log_norm.clone()
    thin = (finite & (log_norm - lse < floor)).nonzero().squeeze(1)
    for i0 in range(0, thin.shape[0], n):
        u = thin[i0 : i0 + n]
        log_norm[u] = _log_masked_sums(zt_flat, trows[u], reach[:, None], T, floor, cdt)[:, 0]
    units = _TeacherUnits(cols, trows, lse, log_norm, None, rest_empty, T)
    if direction != "reverse" or rest_empty:
        return units
    U = trows.shape[0]
    log_rest = torch.empty(U, dtype=cdt, device=zt_flat.device)
    nu = max(1, DEFAULT_CHUNK_ELEMENTS // max(cols.shape[0], 1))
    for u0 in range(0, U, nu):
        log_rest[u0 : u0 + nu] = units.log_p(zt_flat, torch.arange(u0, min(u0 + nu, U), device=trows.device))[2]
    exact = (finite & (log_rest < math.log(REST_EXACT_BELOW))).nonzero().squeeze(1)
    if exact.numel():
        in_s = torch.zeros_like(reach)
        in_s[cols] = True
        rest_cols = (reach & ~in_s)[:, None]
        for i0 in range(0, exact.shape[0], n):
            u = exact[i0 : i0 + n]
            log_rest[u] = _log_masked_sums(zt_flat, trows[u], rest_cols, T, floor, cdt)[:, 0] - log_norm[u]
    units.log_rest = log_rest
    return units


def _log_masked_sums(z_flat, rows, masks, T, floor, cdt):
    """`[m, c]`: `logsumexp` of `z / T` over each of the c column masks (`masks [V, c]` bool) for rows
    `rows` of `z_flat`: sums of exponentials shifted by the row maximum (a mat-vec: sums of positive
    terms, no cancellation), and a masked `logsumexp` for the rows where such a sum underflows."""
    z = z_flat.index_select(0, rows).to(cdt)
    out, mx = shift_rows(z, T, torch.empty_like(z))
    shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)) / T
    sums = out.clamp_min_(math.log(torch.finfo(cdt).tiny) + 1.0).exp_() @ masks.to(cdt)  # no denormals
    log_sums = shift[:, None] + torch.log(sums)
    thin = ((sums < math.exp(floor)) & torch.isfinite(mx)[:, None]).any(dim=1).nonzero().squeeze(1)
    if thin.numel():  # the mass lies entirely 60 nats or more below the row's maximum
        y = z[thin] / T
        log_sums[thin] = torch.stack([torch.logsumexp(torch.where(masks[:, j], y, float("-inf")), dim=1)
                                      for j in range(masks.shape[1])], dim=1)
    return log_sums


@dataclass
class _StudentSide:
    """What every student row of a call shares: W restricted to S (entries in log space), the rest
    weights, and the options."""

    entry_rows: torch.Tensor  # [E]
    entry_slots: torch.Tensor  # [E]
    log_entry_w: torch.Tensor  # [E]
    k: int
    rest_w: torch.Tensor  # [V_s]
    log_rest_w: torch.Tensor  # [V_s]
    odd: torch.Tensor  # [J] rows whose rest weight is not 1
    r_odd: torch.Tensor  # [J]
    rest_empty: bool
    T: float
    scale: torch.Tensor | None  # T / normaliser (None: no gradient)
    direction: str
    floor: float
    low: float


_INF = float("inf")


def _student_rows(z, buf, log_p, p, log_p_rest, side: _StudentSide, exact: bool):
    """Loss and gradient of student rows `z [m, V_s]` against the teacher's `log_p`, `p [m, k]` on S and
    `log_p_rest [m]`, in log space.

    S masses: per-slot logsumexp of `log p + log w` over W's entries (`log_slot_masses`, always exact).
    Rest and mapped masses: with `exact=False` from the exponentials shifted by the row maximum (a sum
    and a mat-vec); rows where they fall below what that holds (`floor`) come back flagged, for an
    `exact=True` pass that takes them by logsumexp too. The KL is formed from the log-masses (log Q =
    log mass - log mapped mass); the gradient is `(T / norm) sum_j g_j share_vj` with `g = d kl / d log
    mass` (Q - P forward, Q (log Q - log P - kl) reverse) and `share_vj = p_v W_vj / mass_j <= 1`, written
    into `buf` (which first holds the shifted logits). `nan_to_num` turns the 0 * inf of outcomes with
    no probability into their true 0 (rows holding NaN are poisoned by the caller). Returns `(kl [m],
    mapped mass [m], flagged [m], raw row max [m])`."""
    out, mx = shift_rows(z, side.T, buf)  # log of the unnormalised probabilities, <= 0
    log_a, u, s = log_slot_masses(out.index_select(1, side.entry_rows).add_(side.log_entry_w), side.entry_slots,
                                  side.k)
    if exact:  # the rest shifted by its own largest term: rest_e = exp(log p_v + log r_v - top) <= 1
        rest_e = out + side.log_rest_w  # [m, V_s]
        top = rest_e.amax(dim=1)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        rest_e.sub_(top[:, None]).exp_()
        log_rest = rest_e.sum(dim=1).log_().add_(top)
        log_tot = torch.exp(out).sum(dim=1).log_()  # the row's largest term is 1: exact
        c = torch.logsumexp(torch.cat([log_a, log_rest[:, None]], dim=1), dim=1)  # the mapped mass
    else:
        e = out.clamp_min_(side.low).exp_()  # no denormals (slow on CPUs): adds < V tiny, within `floor`
        log_tot = e.sum(dim=1).log_()
        log_rest = (e @ side.rest_w).log_()
        c = log_tot  # >= the mapped mass: nothing overflows; the flag catches what would underflow
    q = torch.exp(log_a - c[:, None])  # [m, k]
    q_rest = torch.exp(log_rest - c)
    msum = q.sum(dim=1) + q_rest
    log_mapped = torch.log(msum) + c
    q.div_(msum[:, None])  # Q on S
    q_rest = q_rest / msum
    log_q = log_a.sub_(log_mapped[:, None])
    log_q_rest = log_rest - log_mapped
    p_rest = torch.exp(log_p_rest)
    if side.direction == "forward":
        kl = (p * (log_p - log_q)).nan_to_num_(0.0, _INF, -_INF).sum(dim=1)
        kl = kl + (p_rest * (log_p_rest - log_q_rest)).nan_to_num_(0.0, _INF, -_INF)
        g = q.sub_(p)
        flag = (log_mapped < side.floor) | ((p_rest > 0) & (log_rest < side.floor))
    else:
        ell = log_q.sub_(log_p)
        ell_rest = log_q_rest - log_p_rest
        kl = (q * ell).nan_to_num_(0.0, _INF, -_INF).sum(dim=1) + (q_rest * ell_rest).nan_to_num_(0.0, _INF, -_INF)
        g = q.mul_(ell.sub_(kl[:, None])).nan_to_num_(0.0, _INF, -_INF)
        coef = torch.where(q_rest > 0, ell_rest - kl, torch.zeros_like(kl))  # g_rest / Q_rest
        flag = log_mapped < side.floor
    if side.scale is not None:
        # rest part: p_v r_v (Q_rest - P_rest) / rest mass (forward), p_v r_v g_rest / Q_rest / mapped mass
        if exact:
            if side.direction == "forward":
                coef, log_l = q_rest - p_rest, log_rest
            else:
                log_l = log_mapped
            log_l = torch.where(torch.isfinite(log_l), log_l, torch.zeros_like(log_l))
            torch.mul(rest_e, (coef * side.scale * torch.exp(top - log_l))[:, None], out=out)
        else:
            if side.direction == "forward":  # two terms that cannot overflow on rows not flagged
                alpha = torch.exp(-log_mapped) - torch.exp(log_p_rest - log_rest).nan_to_num_(0.0, _INF, -_INF)
            else:
                alpha = coef * torch.exp(-log_mapped)
            alpha = alpha * side.scale
            e_odd = out.index_select(1, side.odd).mul_(alpha[:, None]).mul_(side.r_odd)
            out.mul_(alpha[:, None])  # right for every row whose rest weight is 1
            out.index_copy_(1, side.odd, e_odd)
        # S part: g_j * (entry's share of slot j)
        per_slot = g.mul_(side.scale).div_(s.clamp_min_(1.0))
        out.index_add_(1, side.entry_rows, u.mul_(per_slot.index_select(1, side.entry_slots)))
    return kl, torch.exp(log_mapped - log_tot), flag, mx


def _slices_with_rows(has_unit: torch.Tensor, n: int):
    """Contiguous row slices `(r0, r1, others)` of at most n rows, skipping slices with no unit row;
    `others` lists the runs `(a, b)` of the slice's local rows that are no unit, which the caller
    must never let contribute (one host sync)."""
    host = has_unit.cpu().tolist()
    out = []
    for r0 in range(0, len(host), n):
        h = host[r0 : r0 + n]
        if not any(h):
            continue
        runs, a = [], None
        for i, x in enumerate(h + [True]):
            if not x and a is None:
                a = i
            elif x and a is not None:
                runs.append((a, i))
                a = None
        out.append((r0, r0 + len(h), runs))
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


class PKLLoss(LossModule):
    """`pkl_loss` with fixed options. `projection`: a `Projection`, an artifact directory, or
    `(indices, weights)`, loaded once and kept as non-persistent buffers (moved by `.to()`)."""

    function = staticmethod(pkl_loss)
    options_type = PKLOptions

    def __init__(self, projection, *, teacher_index: int = 0, temperature: float = 1.0, direction: str = "forward",
                 top_k_columns: int | None = DEFAULT_TOP_K_COLUMNS, columns: torch.Tensor | None = None,
                 public: bool = False, correct_only: bool | None = None, process_group=None,
                 position_chunk_size: int | None = None, public_eps: float = 1e-10, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, direction=direction,
                         top_k_columns=top_k_columns, columns=columns, public=public, correct_only=correct_only,
                         process_group=process_group, position_chunk_size=position_chunk_size,
                         public_eps=public_eps, check_inputs=check_inputs)
        self.register_artifact("projection", as_projection(projection, "cpu"))

    @property
    def projection(self):
        return self.artifact("projection")
