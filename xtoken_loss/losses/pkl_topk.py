"""The principled P-KL on top-k teacher outputs (`pkl_loss` and `learned_pkl_loss` with a top-k teacher;
docs/losses.md, "Top-k teacher outputs").

Per valid chunk u (its start rows on both sides), with L_u the teacher ids listed at u's teacher row:
- outcomes: the listed ids that W reaches and that lie in the batch's column set S (chosen as in the
  full-logit form: each reachable column's score is its largest listed log-probability over the
  units, max-reduced over the process group, the `top_k_columns` best), plus one rest outcome;
- teacher: its listed log-probabilities renormalised over the reachable listed ids plus its rest
  (`rest_logprob`: the mass outside the listed ids, all counted as reachable, since its split is
  unknown); listed reachable ids outside S join the rest, listed unreachable ids are dropped;
- student: `log a_j = logsumexp over W's entries (v, j) of log p_v + log W_vj` for each outcome id j,
  and the rest `logsumexp` over every other entry of W (its mapped mass on every other column): a
  sum of its own terms, never `1 - listed mass`, so it is exact, >= 0 and never NaN from rounding;
  both renormalised over the mapped mass;
- `KL_u` between the two (forward or reverse), summed and divided by the normaliser.
With K = the full teacher vocabulary (rest -inf) this is the full-logit P-KL exactly.

Per group of units only the student rows W maps onto one of the group's outcome columns ("touched"
rows, a few thousand) are read entry by entry (all their entries: each goes to its outcome slot or to
the rest); every other mapped row lies wholly in the rest and adds `log p_v + log (row weight sum)` to
its log-sum-exp, one pass over the row. So a group costs about one log-softmax of its student rows,
not a pass over W's E entries. The gradient comes from autograd on each group's student rows (and W's
log-weights for the learned P-KL), through the chain `sum_j g_j log a_j` with `g = d KL / d log a`
(`chunked.log_divergence`).
"""

from __future__ import annotations

import torch

from xtoken_loss.batch_tokenizers import check_batch_tokenizers
from xtoken_loss.checks import check_chunk_inputs
from xtoken_loss.chunked import compute_dtype, log_divergence, resolve_normalizer, unit_result
from xtoken_loss.projection import as_projection, reduce_column_scores, top_columns
from xtoken_loss.teacher_outputs import TeacherOutputs
from xtoken_loss.topk import (
    ANY_ID,
    NEG_INF,
    check_read_rows,
    check_topk_batch,
    check_topk_ids,
    masked_logsumexp,
    refuse_topk_options,
    run_topk_units,
    unit_teacher,
)
from xtoken_loss.units import check_chunk_ids, chunk_units


def pkl_topk_sums(student_logits: torch.Tensor, teacher: TeacherOutputs, batch: dict, *, loss: str, e_rows, e_cols,
                  log_w, reach: torch.Tensor, teacher_index: int, normalizer, direction: str, top_k_columns,
                  columns, correct_only: bool, process_group, check_inputs: bool):
    """The top-k P-KL's pieces (module doc). `e_rows`, `e_cols` `[E]`: W's non-empty entries (student
    row, teacher column), `log_w [E]` their log-weights (a leaf that may require a gradient: the learned
    P-KL); `reach [V_t]`: the reachable columns. Returns `(total, norm, units, grad or None, grad of
    log_w or None, metric sums, bad)`."""
    B, Ls, Vs = student_logits.shape
    Lt, Vt = teacher.length, reach.shape[0]
    dev = student_logits.device
    cdt = compute_dtype(student_logits.dtype)
    if check_inputs:
        check_chunk_ids(batch, teacher_index)
    units = chunk_units(batch, teacher_index, B, Ls, Lt, mode="start", correct_only=correct_only, device=dev)
    if check_inputs:
        check_read_rows(loss, student_logits, teacher, units)
    norm = resolve_normalizer(normalizer, units.num_units, cdt)
    trows = units.teacher_rows
    flag = check_topk_ids(loss, teacher.topk_indices, trows, ANY_ID, "the teacher vocabulary")
    with torch.no_grad():
        tr = unit_teacher(teacher, trows, cdt)
        # listed and reachable (ids past the projection's teacher width, like logits wider than it, are not)
        ok = tr.listed & (tr.ids < Vt)
        ids = torch.where(ok, tr.ids, torch.zeros_like(tr.ids))
        ok &= reach[ids]
        if columns is None:
            scores = torch.full((Vt,), NEG_INF, dtype=cdt, device=dev)
            scores.scatter_reduce_(0, ids[ok], tr.raw[ok], "amax")
            cols = top_columns(reduce_column_scores(scores, process_group), top_k_columns)
        else:
            cols = torch.as_tensor(columns, dtype=torch.int64, device=dev)
            cols = torch.unique(cols[(cols >= 0) & (cols < Vt)])
            cols = cols[reach[cols]]
        in_cols = torch.zeros(Vt + 1, dtype=torch.bool, device=dev)
        in_cols[cols] = True
        in_s = ok & in_cols[ids]
        lp_ok = torch.where(ok, tr.log_p, torch.full_like(tr.log_p, NEG_INF))
        log_reach = torch.logaddexp(lp_ok.logsumexp(dim=1), tr.log_rest)  # the reachable mass (rest included)
        lr = torch.where(torch.isfinite(log_reach), log_reach, torch.zeros_like(log_reach))
        lp_s = torch.where(in_s, tr.log_p - lr[:, None], torch.full_like(tr.log_p, NEG_INF))
        lp_out = torch.where(ok & ~in_s, tr.log_p, torch.full_like(tr.log_p, NEG_INF)).logsumexp(dim=1)
        lp_rest = torch.logaddexp(tr.log_rest, lp_out) - lr
        log_p = torch.cat([lp_s, lp_rest[:, None]], dim=1)  # [U, K + 1], normalised
        bad = tr.bad | (log_reach == NEG_INF).any()  # no reachable teacher mass: the KL is undefined
        if flag is not None:
            bad = bad | flag
    K = tr.ids.shape[1]
    wmap = _EntryIndex(e_rows, e_cols, Vs, Vt)
    slot_vals = torch.arange(K, device=dev).expand_as(ids)
    # each row's log weight sum (-inf on unmapped rows); recomputed per group when W is learned (its graph)
    fixed_row = None if log_w.requires_grad else _segment_logsumexp(log_w.to(cdt)[None], e_rows[None], Vs)

    def unit_fn(log_q, u0, u1):
        n = u1 - u0
        with torch.no_grad():
            # the group's outcome columns, the entries of W's rows that reach one of them ("touched" rows:
            # all their entries), and each unit's outcome slot of those entries (K: the rest)
            sel = in_s[u0:u1]
            cols_g = torch.unique(ids[u0:u1][sel])
            h = wmap.entries_of_rows(torch.unique(e_rows[wmap.entries_of_cols(cols_g)]))
            upos = torch.full((Vt,), -1, dtype=torch.int64, device=dev)
            upos[cols_g] = torch.arange(cols_g.shape[0], device=dev)
            table = torch.full((n, cols_g.shape[0] + 1), K, dtype=torch.int64, device=dev)
            table.scatter_(1, torch.where(sel, upos[ids[u0:u1]], cols_g.shape[0]), slot_vals[u0:u1])
            pos = upos[e_cols[h]]
            slot_h = torch.where(pos >= 0, table.index_select(1, pos.clamp(min=0)), K)  # [n, H]
            untouched = torch.ones(Vs, dtype=torch.bool, device=dev)
            untouched[e_rows[h]] = False
        lw = log_w.to(log_q.dtype)
        t = log_q.index_select(1, e_rows[h]) + lw[h]  # log p_v + log W_vj on the touched rows' entries
        log_a = _segment_logsumexp(t, slot_h, K + 1)  # [n, K + 1]; slot K: their entries in the rest
        # every other mapped row lies wholly in the rest: log p_v + log (its row's weight sum)
        log_row = _segment_logsumexp(lw[None], e_rows[None], Vs) if fixed_row is None else fixed_row  # [1, V_s]
        rest_far = masked_logsumexp(log_q + log_row, untouched[None].expand(n, -1))
        both = torch.stack([log_a[:, K], rest_far], dim=1)
        log_a = torch.cat([log_a[:, :K], masked_logsumexp(both, torch.isfinite(both.detach()))[:, None]], dim=1)
        with torch.no_grad():
            kl, _, g = log_divergence(log_a.detach(), log_p[u0:u1], direction)
            live = torch.isfinite(log_a.detach())
            g = torch.where(live, g, torch.zeros_like(g))
        chain = (torch.where(live, log_a, torch.zeros_like(log_a)) * g).sum(dim=1)
        value = kl + (chain - chain.detach())  # the KL's value, the chain rule's gradient
        with torch.no_grad():
            extra = {"kl": kl, "teacher_mass_in_columns": torch.exp(lp_s[u0:u1]).sum(dim=1),
                     "teacher_reachable_mass": torch.exp(log_reach[u0:u1]),
                     "student_mapped_mass": torch.exp(log_a.detach().logsumexp(dim=1))}
        return value, extra, torch.zeros((), dtype=torch.bool, device=dev)

    total, grad, sums, bad_s, g_params = run_topk_units(
        student_logits, units, norm, unit_fn,
        ("kl", "teacher_mass_in_columns", "teacher_reachable_mass", "student_mapped_mass"),
        width=Vs, params=(log_w,))
    return total, norm, units, grad, g_params[0], sums, bad | bad_s


class _EntryIndex:
    """W's entries `(e_rows, e_cols)` indexed by row and by column: the entries of a set of rows or of
    columns without scanning all E of them (`[E]` arrays, sorted once)."""

    def __init__(self, e_rows: torch.Tensor, e_cols: torch.Tensor, Vs: int, Vt: int):
        self.by_row = torch.argsort(e_rows, stable=True)
        self.row_count = torch.bincount(e_rows, minlength=Vs)
        self.row_start = torch.cumsum(self.row_count, 0) - self.row_count
        self.by_col = torch.argsort(e_cols, stable=True)
        self.col_count = torch.bincount(e_cols, minlength=Vt)
        self.col_start = torch.cumsum(self.col_count, 0) - self.col_count

    @staticmethod
    def _ranges(order, start, count, keys):
        c = count[keys]
        first = torch.repeat_interleave(start[keys] - torch.cumsum(c, 0) + c, c)
        return order[first + torch.arange(first.shape[0], device=order.device)]

    def entries_of_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._ranges(self.by_row, self.row_start, self.row_count, rows)

    def entries_of_cols(self, cols: torch.Tensor) -> torch.Tensor:
        return self._ranges(self.by_col, self.col_start, self.col_count, cols)


def _segment_logsumexp(t: torch.Tensor, slots: torch.Tensor, m: int) -> torch.Tensor:
    """`out[i, j] = logsumexp over e with slots[i, e] == j of t[i, e]` (`[n, m]`, -inf where a slot has
    no finite term), each slot shifted by its own largest term; differentiable with finite gradients."""
    n = t.shape[0]
    with torch.no_grad():
        top = torch.full((n, m), torch.finfo(t.dtype).min, dtype=t.dtype, device=t.device)
        top.scatter_reduce_(1, slots, t.detach(), "amax")
    u = torch.exp(t - top.gather(1, slots))
    s = torch.zeros(n, m, dtype=t.dtype, device=t.device).scatter_add(1, slots, u)
    pos = s > 0
    return torch.where(pos, torch.log(torch.where(pos, s, torch.ones_like(s))) + top, torch.full_like(s, NEG_INF))


def projection_entries(indices: torch.Tensor, filled: torch.Tensor, student_width: int):
    """`(e_rows, e_cols, flat)` of W's non-empty entries (`filled [R, K]`) on rows below
    `student_width` (`flat`: their positions in `indices.reshape(-1)`, to pick their log-weights)."""
    rows = min(indices.shape[0], student_width)
    keep = torch.zeros_like(filled, dtype=torch.bool)
    keep[:rows] = filled[:rows] & (indices[:rows] >= 0)
    flat = keep.reshape(-1).nonzero().squeeze(1)
    return flat // indices.shape[1], indices.reshape(-1)[flat], flat


def pkl_topk_loss(student_logits, teacher: TeacherOutputs, batch: dict, *, projection, teacher_index: int,
                  normalizer, temperature: float, direction: str, top_k_columns, columns, public: bool,
                  correct_only: bool, process_group, check_inputs: bool):
    """`pkl_loss` with a top-k teacher (module doc). Returns `(loss, metrics)`."""
    refuse_topk_options("pkl", temperature=temperature, public=public)
    proj = as_projection(projection, student_logits.device)
    check_batch_tokenizers(proj, batch, teacher_index, loss="pkl")
    normalizer = check_chunk_inputs("pkl", student_logits, None, batch, teacher_index, normalizer,
                                    correct_only=correct_only)
    B, _, Vs = student_logits.shape
    check_topk_batch("pkl", teacher, batch, teacher_index, B)
    Vt = proj.teacher_width
    proj.check_widths(Vs, Vt)
    cdt = compute_dtype(student_logits.dtype)
    e_rows, e_cols, flat = projection_entries(proj.indices, proj.weights > 0, Vs)
    log_w = torch.log(proj.weights.reshape(-1)[flat].to(cdt))
    total, norm, units, grad, _, sums, bad = pkl_topk_sums(
        student_logits, teacher, batch, loss="pkl", e_rows=e_rows, e_cols=e_cols, log_w=log_w,
        reach=proj.reachable_columns(Vt), teacher_index=teacher_index, normalizer=normalizer, direction=direction,
        top_k_columns=top_k_columns, columns=columns, correct_only=correct_only, process_group=process_group,
        check_inputs=check_inputs)
    return unit_result(student_logits, total, norm, sums, units, bad, grad)
