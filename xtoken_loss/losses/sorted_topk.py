"""ULD and the H-KL / GOLD hybrids on top-k teacher outputs (docs/losses.md, "Top-k teacher outputs").

The teacher at each chunk start is known on its listed ids plus one rest outcome (`rest_logprob`),
renormalised to sum to 1 (`topk.unit_teacher`). The student is known everywhere; it is coarsened the
same way, so both sides are compared on outcomes of the same kind:
- ULD: the teacher's listed probabilities sorted (k_u of them, the listed slots of unit u) and its
  rest; the student's k_u largest probabilities sorted and its rest (every other entry, summed):
  `L1 = sum_{r < k_u} |s_r - t_r| + |s_rest - t_rest|`.
- Hybrids: the common pairs whose teacher id is listed (C_L) carry the KL, both sides renormalised
  over C_L; the teacher's listed uncommon probabilities (n_u of them) sorted, against the student's
  n_u largest uncommon probabilities, plus one rest outcome on each side: the teacher's rest, and the
  student's mass everywhere else (its common ids whose partner is not listed, and its uncommon entries
  beyond rank n_u). `loss = common_weight * KL_{C_L} + uncommon_weight * L1`.
With K = the full teacher vocabulary (rest -inf) both equal their full-logit forms exactly: the
student's rest is then its mass beyond the teacher's width, which the full sorted L1 compares with the
teacher's zero padding. Rests are sums of their own terms (a masked log-sum-exp), never `1 - listed`.
Chunk form `"start"` only, temperature 1, no public form (`topk.refuse_topk_options`).
"""

from __future__ import annotations

import torch

from xtoken_loss.checks import check_chunk_inputs
from xtoken_loss.chunked import compute_dtype, resolve_normalizer, unit_result
from xtoken_loss.teacher_outputs import TeacherOutputs
from xtoken_loss.topk import (
    ANY_ID,
    NEG_INF,
    check_read_rows,
    check_topk_batch,
    check_topk_ids,
    masked_logsumexp,
    run_topk_units,
    unit_teacher,
)
from xtoken_loss.units import check_chunk_ids, chunk_units


def _prepare(loss, student_logits, teacher, batch, teacher_index, normalizer, correct_only, check_inputs):
    normalizer = check_chunk_inputs(loss, student_logits, None, batch, teacher_index, normalizer,
                                    correct_only=correct_only)
    B, Ls, _ = student_logits.shape
    Lt = check_topk_batch(loss, teacher, batch, teacher_index, B)
    if check_inputs:
        check_chunk_ids(batch, teacher_index)
    dev = student_logits.device
    units = chunk_units(batch, teacher_index, B, Ls, Lt, mode="start", correct_only=correct_only, device=dev)
    if check_inputs:
        check_read_rows(loss, student_logits, teacher, units)
    cdt = compute_dtype(student_logits.dtype)
    norm = resolve_normalizer(normalizer, units.num_units, cdt)
    flag = check_topk_ids(loss, teacher.topk_indices, units.teacher_rows, ANY_ID, "the teacher vocabulary")
    with torch.no_grad():
        tr = unit_teacher(teacher, units.teacher_rows, cdt)
    bad = tr.bad if flag is None else tr.bad | flag
    return units, norm, tr, bad


def _drop_mask(n: int, width: int, ids: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """`[n, width]` bool: True at `ids[take]` of each row (the others are sent to a dummy column, so
    repeated writes all write True)."""
    out = torch.zeros(n, width + 1, dtype=torch.bool, device=ids.device)
    out.scatter_(1, torch.where(take, ids, torch.full_like(ids, width)), True)
    return out[:, :width]


def _top_sorted(log_q: torch.Tensor, count: torch.Tensor, k: int):
    """The student's `count[i]` largest probabilities of row i (`log_q [n, V]`, -inf entries never
    chosen first), sorted, zero past `count` and padded to k; and the mask of the entries taken."""
    n, V = log_q.shape
    kk = min(k, V)
    lv, iv = log_q.topk(kk, dim=1)  # differentiable values
    take = (torch.arange(kk, device=log_q.device)[None, :] < count[:, None]) & (lv.detach() > NEG_INF)
    top = torch.where(take, torch.exp(lv), torch.zeros_like(lv))
    if kk < k:
        top = torch.nn.functional.pad(top, (0, k - kk))
    return top, _drop_mask(n, V, iv, take)


def uld_topk_loss(student_logits, teacher: TeacherOutputs, batch: dict, *, teacher_index: int, normalizer,
                  correct_only: bool, check_inputs: bool):
    """`uld_loss` with a top-k teacher (module doc). Returns `(loss, metrics)`."""
    units, norm, tr, bad = _prepare("uld", student_logits, teacher, batch, teacher_index, normalizer, correct_only,
                                    check_inputs)
    K = tr.ids.shape[1]
    with torch.no_grad():
        t_sorted = torch.sort(torch.exp(tr.log_p), dim=1, descending=True).values  # empty slots: 0, last
        t_rest = torch.exp(tr.log_rest)
        count = tr.listed.sum(dim=1)

    def unit_fn(log_q, u0, u1):
        s_top, taken = _top_sorted(log_q, count[u0:u1], K)
        s_rest = torch.exp(masked_logsumexp(log_q, ~taken))
        l1 = (s_top - t_sorted[u0:u1]).abs().sum(dim=1) + (s_rest - t_rest[u0:u1]).abs()
        return l1, {"uld": l1}, bad

    total, grad, sums, bad_s, _ = run_topk_units(student_logits, units, norm, unit_fn, ("uld",),
                                                 width=student_logits.shape[2])
    return unit_result(student_logits, total, norm, sums, units, bad | bad_s, grad)


def hybrid_topk_loss(student_logits, teacher: TeacherOutputs, batch: dict, *, common, teacher_index: int, normalizer,
                     common_weight: float, uncommon_weight: float, correct_only: bool, check_inputs: bool,
                     loss_name: str):
    """`hybrid_loss` (H-KL, GOLD) with a top-k teacher and the common set `common` (a `CommonSet` on
    the student's device). Returns `(loss, metrics)`."""
    units, norm, tr, bad = _prepare(loss_name, student_logits, teacher, batch, teacher_index, normalizer,
                                    correct_only, check_inputs)
    Vs = student_logits.shape[2]
    dev = student_logits.device
    K = tr.ids.shape[1]
    wc, wu = float(common_weight), float(uncommon_weight)
    with torch.no_grad():
        tw = int(common.teacher_ids.max()) + 1 if common.size else 1
        t2s = torch.full((tw,), -1, dtype=torch.int64, device=dev)
        t2s[common.teacher_ids] = common.student_ids
        ids = tr.ids
        partner = torch.where(tr.listed & (ids < tw), t2s[ids.clamp(0, tw - 1)], torch.full_like(ids, -1))
        com = partner >= 0  # listed slots of a common pair (C_L)
        lp_c = torch.where(com, tr.log_p, torch.full_like(tr.log_p, NEG_INF))
        lse_p = lp_c.logsumexp(dim=1)  # log teacher mass on C_L
        has = torch.isfinite(lse_p)
        lpn = torch.where(has[:, None], lp_c - torch.where(has, lse_p, torch.zeros_like(lse_p))[:, None], lp_c)
        pn = torch.exp(lpn)
        unc = tr.listed & ~com
        t_sorted = torch.sort(torch.where(unc, torch.exp(tr.log_p), torch.zeros_like(tr.log_p)), dim=1,
                              descending=True).values
        n_unc = unc.sum(dim=1)
        t_rest = torch.exp(tr.log_rest)
        is_common_s = torch.zeros(Vs, dtype=torch.bool, device=dev)
        is_common_s[common.student_ids] = True
        safe_partner = partner.clamp(min=0)

    def unit_fn(log_q, u0, u1):
        n = u1 - u0
        c = com[u0:u1]
        lq_c = torch.where(c, log_q.gather(1, safe_partner[u0:u1]), torch.full((n, K), NEG_INF, dtype=log_q.dtype,
                                                                                device=dev))
        lse_q = masked_logsumexp(lq_c, c)
        p = pn[u0:u1]
        pos = p > 0
        diff = torch.where(pos, lpn[u0:u1] - (lq_c - lse_q[:, None]), torch.zeros_like(p))
        kl = (p * diff).sum(dim=1)  # 0 where the teacher has no mass on C_L
        lq_u = torch.where(is_common_s[None, :], torch.full_like(log_q, NEG_INF), log_q)
        s_top, taken = _top_sorted(lq_u, n_unc[u0:u1], K)
        keep = ~(taken | _drop_mask(n, Vs, safe_partner[u0:u1], c))
        s_rest = torch.exp(masked_logsumexp(log_q, keep))
        l1 = (s_top - t_sorted[u0:u1]).abs().sum(dim=1) + (s_rest - t_rest[u0:u1]).abs()
        with torch.no_grad():
            extra = {"common_kl": kl, "uncommon_l1": l1, "teacher_common_mass": torch.exp(lse_p[u0:u1]),
                     "student_common_mass": torch.exp(masked_logsumexp(log_q, is_common_s[None, :].expand(n, -1)))}
        return wc * kl + wu * l1, extra, bad

    total, grad, sums, bad_s, _ = run_topk_units(
        student_logits, units, norm, unit_fn,
        ("common_kl", "uncommon_l1", "teacher_common_mass", "student_common_mass"), width=Vs)
    return unit_result(student_logits, total, norm, sums, units, bad | bad_s, grad)
