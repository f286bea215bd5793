"""The public forms (`public=True`): NeMo-RL's X-Token losses, its defaults included, so a user can switch
and see the published numbers (`nemo_rl/algorithms/loss/loss_functions.py` `_compute_p_kl` /
`_compute_gold`, `nemo_rl/algorithms/x_token/loss_utils.py`; docs/losses.md has the formulas).

What the published code does, and this module with it (on finite inputs; the departures are where
it would give NaN, listed in docs/losses.md):
- Teacher logits wider than the projection's teacher vocabulary (Qwen3: 151,936 logits for 151,669
  tokens) are cut to it first (`public_teacher_vocab_size`), on every path.
- Every valid chunk with positions on both sides counts, correct or not (`correct_only=None`
  resolves to False here; NeMo-RL's `exact_token_match_only` defaults to false). A chunk's
  distribution is the mean over its positions (position p belongs to the chunk of token p + 1) of
  the per-position one, the mean taken as `sum / (count + 1e-10)` as published.
- P-KL (`public_pkl`): S = the `top_k_columns` teacher columns with the largest raw logit at any
  row of the teacher logits (padding included), max-reduced over `process_group` when given; the
  student's projected probabilities `p W[:, S]` are averaged, then `Q = Qbar / (sum Qbar + eps)`
  and `log Q' = log(Q + eps)` (eps 1e-10); the teacher side is the mean of `log_softmax(z_t[S] / T)`
  (not renormalised). Forward `sum exp(L) (L - log Q')`, reverse `sum Q' (log Q' - L)`, times T^2.
- GOLD / H-KL (`public_hybrid`): mean of the full log-softmax on each side; the common-set term is
  `sum_j exp(b_j) (b_j - a_j)` (reverse: `sum_j exp(a_j) (a_j - b_j)`), not renormalised; the
  uncommon term is the L1 of the `min(|U_s|, |U_t|, tail_cut)` largest uncommon probabilities of
  each side, sorted; `loss_c = T^2 (KL + L1)`.
- Common sets (`public_common_set`): GOLD takes rows whose top weight is exactly 1.0 (float32) with
  slot 1 empty, the lowest student id winning a teacher id; H-KL rows with top weight >= 0.6
  (float32), the higher weight winning, ties to the lower student id.

Both sum over the valid chunks and divide by `normalizer` (default: their number; NeMo-RL divides by
the count all-reduced over every rank, so pass that count under data parallelism). The gradient is
computed in the forward pass, chunk of rows by chunk of rows, as in the principled forms; rows the
batch masks out are never read (their gradient is exactly 0), except that the P-KL's column choice
reads every teacher row by definition; rows there holding NaN or +inf are left out of the choice.
A non-finite value at a row the loss reads makes the loss NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.batch_tokenizers import check_batch_tokenizers
from xtoken_loss.checks import nonfinite
from xtoken_loss.chunk_runner import prepare
from xtoken_loss.chunked import (
    compute_dtype,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    softmax_rows,
    unit_result,
)
from xtoken_loss.losses.hybrid import CommonSet
from xtoken_loss.projection import (
    Projection,
    as_projection,
    project_probs,
    reduce_column_scores,
    restrict_projection,
    top_columns,
)

CHUNK_MEAN_EPS = 1e-10  # published: a chunk's mean is sum / (count + 1e-10)
PUBLIC_THRESHOLD = 0.6  # published H-KL ("xtoken_loss") common-set threshold
PUBLIC_TAIL_CUT = 8192  # published `uncommon_topk`
PUBLIC_TOP_K_COLUMNS = 8192  # published `vocab_topk`


# --------------------------------------------------------------------------------------------------
# Vocabulary sizes and common sets


def public_teacher_vocab_size(projection: Projection) -> int:
    """The teacher vocabulary the public forms read: the projection's recorded teacher `vocab_size`
    (the tokenizer's, not the model's output width), else its `teacher_width` (for a projection built
    from tensors: the width given, else 1 + its largest teacher id). Teacher logits are cut to it."""
    side = projection.metadata.get("teacher") if isinstance(projection.metadata, dict) else None
    size = side.get("vocab_size") if isinstance(side, dict) else None
    size = int(size) if size else int(projection.teacher_width)
    return max(size, projection.max_index + 1)


@dataclass(frozen=True, eq=False)
class PublicCommonSet(CommonSet):
    """A common set built by the published rule from a projection, with the vocabulary sizes the
    public hybrid then reads: uncommon student ids below `student_vocab_size` (the projection's
    rows), teacher logits cut to `teacher_vocab_size`. None: the logits' widths."""

    student_vocab_size: int | None = None
    teacher_vocab_size: int | None = None

    def to(self, device) -> PublicCommonSet:
        return replace(self, student_ids=self.student_ids.to(device), teacher_ids=self.teacher_ids.to(device))


def public_common_set(projection, kind: str, threshold: float = PUBLIC_THRESHOLD) -> PublicCommonSet:
    """The published common set of `kind` (`"gold"` or `"hkl"`) from a projection (a `Projection`,
    an artifact directory or `(indices, weights)`), weights compared in float32 as published.

    - `"gold"`: rows whose largest weight is exactly 1.0 and whose slot 1 is empty (-1), paired with
      that weight's teacher id; several rows on one teacher id: the lowest student id wins.
    - `"hkl"`: rows whose largest weight is >= `threshold` (float32); on one teacher id the largest
      weight wins, ties to the lowest student id.
    Teacher ids at or above `public_teacher_vocab_size` are dropped (none in a valid artifact)."""
    proj = projection if isinstance(projection, Projection) else as_projection(projection, "cpu")
    vt = public_teacher_vocab_size(proj)
    idx = proj.indices.cpu()
    w = proj.weights.cpu().to(torch.float32)
    if idx.shape[0] == 0 or idx.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return PublicCommonSet(empty, empty, kind, proj.tokenizers, student_vocab_size=proj.num_rows,
                               teacher_vocab_size=vt)
    top_w, slot = w.max(dim=1)
    partner = idx.gather(1, slot[:, None]).squeeze(1)
    if kind == "gold":
        second_empty = idx[:, 1] == -1 if idx.shape[1] > 1 else torch.ones_like(top_w, dtype=torch.bool)
        cand = (top_w == 1.0) & second_empty
        method = "public: top weight == 1, slot 1 empty"
    elif kind == "hkl":
        cand = top_w >= torch.tensor(float(threshold), dtype=torch.float32)
        method = f"public: top weight >= {threshold:g}"
    else:
        raise LossOptionError(f"public_common_set: kind {kind!r}: valid kinds are 'gold', 'hkl'")
    cand &= (partner >= 0) & (partner < vt)
    rows = cand.nonzero().squeeze(1)
    cs = CommonSet.from_pairs(rows, partner[rows], None if kind == "gold" else top_w[rows], method=method,
                              tokenizers=proj.tokenizers)
    return PublicCommonSet(cs.student_ids, cs.teacher_ids, cs.method, cs.tokenizers,
                           student_vocab_size=proj.num_rows, teacher_vocab_size=vt)


# --------------------------------------------------------------------------------------------------
# P-KL


def public_pkl(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    projection,
    teacher_index: int,
    normalizer,
    temperature: float,
    direction: str,
    top_k_columns: int | None,
    columns,
    correct_only: bool,
    process_group,
    position_chunk_size: int | None,
    eps: float,
    check_inputs: bool,
):
    """The published P-KL (module doc); `pkl_loss(public=True)` calls it. Returns `(loss, metrics)`."""
    zt, units = prepare(student_logits, teacher_outputs, batch, loss_name="pkl", teacher_index=teacher_index,
                        correct_only=correct_only, check_inputs=check_inputs, form="mean_log")
    B, Ls, Vs = student_logits.shape
    Lt, Vt_full = zt.shape[1], zt.shape[2]
    dev = student_logits.device
    proj = as_projection(projection, dev)
    check_batch_tokenizers(proj, batch, teacher_index, loss="pkl")
    proj.check_widths(Vs, Vt_full)
    V = min(Vt_full, public_teacher_vocab_size(proj))  # the teacher columns read
    T = float(temperature)
    cdt = compute_dtype(student_logits.dtype)
    norm = resolve_normalizer(normalizer, units.num_units, cdt)
    zs_flat = student_logits.reshape(B * Ls, Vs)
    zt_flat = zt.reshape(B * Lt, Vt_full)
    n = rows_per_chunk(position_chunk_size, max(Vs, V))
    want_grad = needs_grad(student_logits)
    with torch.no_grad():
        total, grad, metrics, bad = _pkl(zs_flat, zt_flat, V, units, proj, norm, T, n, want_grad, cdt,
                                         top_k_columns, columns, process_group, direction, eps)
    return unit_result(student_logits, total * (T * T), norm, metrics, units, bad, grad)


def _choose_columns(zt_flat, V, k, n, group, cdt):
    """S: the k columns (of the first V) with the largest raw logit over every teacher row, ascending
    (ties to the lower id; columns that are -inf everywhere never). Rows holding NaN or +inf are
    left out. Returns `(columns, row_max [N] or None)`: the row maxima when some row was left out."""
    dev = zt_flat.device
    N = zt_flat.shape[0]
    scores = torch.full((V,), float("-inf"), dtype=cdt, device=dev)
    for r0 in range(0, N, n):
        torch.maximum(scores, zt_flat[r0 : r0 + n, :V].amax(dim=0).to(cdt), out=scores)
    row_max = None
    if bool((torch.isnan(scores) | (scores == float("inf"))).any()):  # some row holds NaN or +inf
        row_max = torch.empty(N, dtype=cdt, device=dev)
        scores.fill_(float("-inf"))
        for r0 in range(0, N, n):
            z = zt_flat[r0 : r0 + n, :V]
            rm = z.amax(dim=1).to(cdt)
            row_max[r0 : r0 + n] = rm
            skip = torch.isnan(rm) | (rm == float("inf"))
            z = torch.where(skip[:, None], torch.full((), float("-inf"), dtype=z.dtype, device=dev), z)
            torch.maximum(scores, z.amax(dim=0).to(cdt), out=scores)
    scores = reduce_column_scores(scores, group)
    return top_columns(scores, None if k is None else min(k, V)), row_max


def _pkl(zs_flat, zt_flat, V, units, proj, norm, T, n, want_grad, cdt, top_k, columns, group, direction, eps):
    dev = zs_flat.device
    Vs = zs_flat.shape[1]
    U = units.student_count.shape[0]
    tr, tu = units.teacher_rows, units.teacher_unit
    sr, su = units.student_rows, units.student_unit
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    if columns is not None:
        cols = torch.as_tensor(columns, dtype=torch.int64, device=dev)
        cols = torch.unique(cols[(cols >= 0) & (cols < V)])
        for r0 in range(0, tr.shape[0], n):  # the rows read hold a NaN / +inf, or are all -inf
            bad |= nonfinite(zt_flat[tr[r0 : r0 + n], :V].amax(dim=1))
    else:
        cols, row_max = _choose_columns(zt_flat, V, top_k, n, group, cdt)
        if row_max is not None:
            rm = row_max[tr]
            bad |= (torch.isnan(rm) | (rm == float("inf"))).any()
    restr = restrict_projection(proj, cols, Vs, zt_flat.shape[1], cdt)
    k = cols.shape[0]

    # Teacher: L = mean over the chunk's positions of log_softmax(z_t[S] / T).
    log_pt = torch.zeros(U, k, dtype=cdt, device=dev)
    for r0 in range(0, tr.shape[0], n):
        z = zt_flat[tr[r0 : r0 + n, None], cols[None, :]].to(cdt) / T
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        bad |= nonfinite(lse)
        log_pt.index_add_(0, tu[r0 : r0 + n], z - lse)
    log_pt.div_(units.teacher_count.to(cdt)[:, None] + CHUNK_MEAN_EPS)

    # Student: projected probabilities summed over the chunk's positions (pass 1).
    qsum = torch.zeros(U, k, dtype=cdt, device=dev)
    for r0 in range(0, sr.shape[0], n):
        z = _rows(zs_flat, sr[r0 : r0 + n], cdt)
        p, lse = softmax_rows(z, T, out=z)
        bad |= nonfinite(lse)
        a, _, _ = project_probs(p, restr)
        qsum.index_add_(0, su[r0 : r0 + n], a)

    # Per chunk, a block of chunks at a time: the KL and d loss / d qsum (T^2 / norm included), which
    # overwrites qsum.
    s_den = units.student_count.to(cdt)[:, None] + CHUNK_MEAN_EPS
    total = torch.zeros((), dtype=cdt, device=dev)
    mass = torch.zeros((), dtype=cdt, device=dev)
    nu = max(1, (1 << 20) // max(k, 1))
    for u0 in range(0, U, nu):
        lp = log_pt[u0 : u0 + nu]
        qbar = qsum[u0 : u0 + nu] / s_den[u0 : u0 + nu]
        zq = qbar.sum(dim=1, keepdim=True) + eps
        qn = qbar / zq
        lq = torch.log(qn + eps)
        pt = torch.exp(lp)
        if direction == "forward":
            terms = torch.where(pt > 0, pt * (lp - lq), torch.zeros_like(pt))  # 0 log 0 = 0
            g = -pt / (qn + eps)  # d KL / d qn
        else:
            terms = (qn + eps) * (lq - lp)
            g = lq - lp + 1.0
        total += terms.sum()
        mass += pt.sum()
        if want_grad:
            d = (g - (g * qn).sum(dim=1, keepdim=True)) / zq  # d KL / d qbar
            qsum[u0 : u0 + nu] = d.div_(s_den[u0 : u0 + nu]).mul_(T * T / norm)
    metrics = {"kl": total.clone(), "teacher_mass_in_columns": mass}
    if not want_grad:
        return total, None, metrics, bad
    d_q = qsum

    # Pass 2: recompute p and push the gradient back through W and the softmax.
    grad = torch.zeros_like(zs_flat)
    for r0 in range(0, sr.shape[0], n):
        rows = sr[r0 : r0 + n]
        z = _rows(zs_flat, rows, cdt)
        p, _ = softmax_rows(z, T, out=z)
        a, _, pe = project_probs(p, restr)
        d = d_q[su[r0 : r0 + n]]  # [n, k]
        c = (a * d).sum(dim=1)
        h = p.mul_(-c[:, None])
        h.scatter_add_(1, restr.entry_rows.expand(h.shape[0], -1), pe * d[:, restr.entry_slots])
        h.div_(T)
        grad.index_copy_(0, rows, h if h.dtype == grad.dtype else h.to(grad.dtype))
    return total, grad, metrics, bad


def _rows(src: torch.Tensor, rows: torch.Tensor, cdt) -> torch.Tensor:
    """Rows `rows` of `src [N, V]` as a new tensor in the compute dtype (advanced indexing: on the CPU
    many times faster than `index_select` for wide rows)."""
    z = src[rows]
    return z if z.dtype == cdt else z.to(cdt)


# --------------------------------------------------------------------------------------------------
# GOLD / H-KL


def public_hybrid(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    common: CommonSet,
    teacher_index: int,
    normalizer,
    temperature: float,
    direction: str,
    common_weight: float,
    uncommon_weight: float,
    tail_cut: int,
    correct_only: bool,
    position_chunk_size: int | None,
    check_inputs: bool,
    loss_name: str,
):
    """The published GOLD / H-KL hybrid (module doc) on the common set `common` (a `CommonSet`; a
    `PublicCommonSet` also says which vocabulary each side reads). Returns `(loss, metrics)`;
    metrics (means per valid chunk): `common_kl` (without T^2), `uncommon_l1`, `teacher_common_mass`,
    `student_common_mass`."""
    zt, units = prepare(student_logits, teacher_outputs, batch, loss_name=loss_name, teacher_index=teacher_index,
                        correct_only=correct_only, check_inputs=check_inputs, form="mean_log")
    B, Ls, Vs = student_logits.shape
    Lt, Vt_full = zt.shape[1], zt.shape[2]
    dev = student_logits.device
    cs = common.to(dev)
    check_batch_tokenizers(cs, batch, teacher_index, loss=loss_name, what="the common set's projection")
    V = min(Vt_full, getattr(cs, "teacher_vocab_size", None) or Vt_full)  # teacher columns read
    Vs_u = min(Vs, getattr(cs, "student_vocab_size", None) or Vs)  # student ids that can be uncommon
    if cs.size and (int(cs.student_ids.max()) >= Vs or int(cs.teacher_ids.max()) >= V):
        raise LossInputError(
            f"{loss_name}: the common set pairs student ids up to {int(cs.student_ids.max())} with teacher ids up to "
            f"{int(cs.teacher_ids.max())}, but the logits are {Vs} and {V} wide; build it for these vocabularies"
        )
    s_ids, t_ids = cs.student_ids, cs.teacher_ids
    keep_s = torch.zeros(Vs, dtype=torch.bool, device=dev)
    keep_s[:Vs_u] = True
    keep_s[s_ids] = False
    keep_t = torch.ones(V, dtype=torch.bool, device=dev)
    keep_t[t_ids] = False
    u_s, u_t = keep_s.nonzero().squeeze(1), keep_t.nonzero().squeeze(1)
    cut = min(u_s.shape[0], u_t.shape[0], int(tail_cut))
    T, wc, wu = float(temperature), float(common_weight), float(uncommon_weight)
    cdt = compute_dtype(student_logits.dtype)
    norm = resolve_normalizer(normalizer, units.num_units, cdt)
    zs_flat = student_logits.reshape(B * Ls, Vs)
    zt_flat = zt.reshape(B * Lt, Vt_full)
    want_grad = needs_grad(student_logits)

    U = units.student_count.shape[0]
    n = rows_per_chunk(position_chunk_size, max(Vs, V))
    starts = list(range(0, U, n)) + [U]
    bounds = torch.as_tensor(starts, dtype=torch.int64, device=dev)
    sb = torch.searchsorted(units.student_unit, bounds).tolist()
    tb = torch.searchsorted(units.teacher_unit, bounds).tolist()
    s_den = units.student_count.to(cdt) + CHUNK_MEAN_EPS
    t_den = units.teacher_count.to(cdt) + CHUNK_MEAN_EPS
    grad = torch.zeros_like(zs_flat) if want_grad else None
    names = ("common_kl", "uncommon_l1", "teacher_common_mass", "student_common_mass")
    sums = {k: torch.zeros((), dtype=cdt, device=dev) for k in names}
    total = torch.zeros((), dtype=cdt, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    with torch.no_grad():
        for g in range(len(starts) - 1):
            u0, u1 = starts[g], starts[g + 1]
            m = u1 - u0
            # teacher: b = mean over the chunk's positions of log_softmax(z_t[:V] / T)
            t_rows = units.teacher_rows[tb[g] : tb[g + 1]]
            z = zt_flat[t_rows, :V].to(cdt) / T
            lse = torch.logsumexp(z, dim=1, keepdim=True)
            bad |= nonfinite(lse)
            b = torch.zeros(m, V, dtype=cdt, device=dev).index_add_(0, units.teacher_unit[tb[g] : tb[g + 1]] - u0,
                                                                     z.sub_(lse))
            b.div_(t_den[u0:u1, None])
            del z
            # student: a = mean of log_softmax(z_s / T); the rows' log-softmax is kept for the backward
            s_rows = units.student_rows[sb[g] : sb[g + 1]]
            s_unit = units.student_unit[sb[g] : sb[g + 1]] - u0
            ls = zs_flat[s_rows].to(cdt) / T
            lse = torch.logsumexp(ls, dim=1, keepdim=True)
            bad |= nonfinite(lse)
            ls.sub_(lse)
            a = torch.zeros(m, Vs, dtype=cdt, device=dev).index_add_(0, s_unit, ls).div_(s_den[u0:u1, None])

            loss_u, extra, d_a = _hybrid_units(a, b, s_ids, t_ids, u_s, u_t, cut, direction, wc, wu, want_grad)
            total += (T * T) * loss_u.sum()
            for k in names:
                sums[k] += extra[k].sum()
            if want_grad:
                # d loss / d z_r = (d_a[u] - softmax_r * sum(d_a[u])) / (T (count_u + eps)), times T^2 / norm
                d_a.mul_(T / norm).div_(s_den[u0:u1, None])
                d = d_a[s_unit]  # [rows, V_s]
                p = ls.exp_()
                d.sub_(p * d.sum(dim=1, keepdim=True))
                grad.index_copy_(0, s_rows, d if d.dtype == grad.dtype else d.to(grad.dtype))
            del a, b, ls
    return unit_result(student_logits, total, norm, sums, units, bad, grad)


def _hybrid_units(a, b, s_ids, t_ids, u_s, u_t, cut, direction, wc, wu, want_grad):
    """Per chunk (rows of `a [m, V_s]`, `b [m, V_t]`, the mean log-probabilities): `wc KL + wu L1`
    (without T^2), the metrics, and its gradient with respect to `a` (None without `want_grad`)."""
    ac, bc = a[:, s_ids], b[:, t_ids]  # [m, C]
    pc, qc = torch.exp(bc), torch.exp(ac)
    if direction == "forward":
        kl = torch.where(pc > 0, pc * (bc - ac), torch.zeros_like(pc)).sum(dim=1)
        g_c = -pc
    else:
        diff = torch.where(qc > 0, ac - bc, torch.zeros_like(qc))
        kl = (qc * diff).sum(dim=1)
        g_c = qc * (diff + 1.0)
    qu = torch.exp(a[:, u_s])  # [m, |U_s|]
    pu = torch.exp(b[:, u_t])  # [m, |U_t|]
    sv, si = torch.topk(qu, cut, dim=1, sorted=True)
    tv = torch.topk(pu, cut, dim=1, sorted=True).values
    l1 = (sv - tv).abs().sum(dim=1)
    extra = {"common_kl": kl, "uncommon_l1": l1, "teacher_common_mass": pc.sum(dim=1),
             "student_common_mass": qc.sum(dim=1)}
    loss = wc * kl + wu * l1
    if not want_grad:
        return loss, extra, None
    d_a = torch.zeros_like(a)
    d_a[:, s_ids] = wc * g_c
    d_a.scatter_(1, u_s[si], wu * torch.sign(sv - tv) * sv)  # d |s - t| / d a = sign * exp(a)
    return loss, extra, d_a
