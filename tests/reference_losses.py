"""Float64 dense references for every `xtoken_loss` loss, shared by the tests and the benchmarks.

One reference per loss (CE, same-vocab KL, P-KL, ULD, H-KL / GOLD hybrid, ALM; the learned-W P-KL is
`reference_pkl` with the learned W made dense; P-KL, ULD and the hybrids on top-k teacher outputs:
`reference_pkl_topk`, `reference_uld_topk`, `reference_hybrid_topk`), written to be obviously right rather than fast: a
dense W `[V_s, V_t]`, explicit Python loops over samples, chunks, positions and common pairs,
autograd for gradients. They read the CONTRACTS §2 batch themselves (they do not reuse
`xtoken_loss.units`), so the library is checked against an independent reading of the formulas in
docs/losses.md. Each reference returns its unit count beside the loss, so tests take expected
counts from here, not from the library.

Also here: `synthetic_batch`, a small hand-built CONTRACTS §2 batch with a random chunk structure
(1:1, 1:n, n:1, one-sided and not-correct chunks, padding, a dropped sample), and `real_problem` /
`real_problem_with_exact_map`, real llama3 x qwen3 batches restricted to a small vocabulary.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------
# batch reading


def _real(batch, key, b, p, length):
    tm = batch.get(key)
    return bool(tm[b, p]) if tm is not None else p < length


def _kept(batch, b):
    sm = batch.get("sample_mask")
    return True if sm is None else bool(sm[b])


def next_token_valid(batch, b, p, length, prefix=""):
    """Position p predicts a real token: p and p + 1 are real and the sample is kept."""
    key = f"{prefix}token_mask"
    return (
        p + 1 < length
        and _kept(batch, b)
        and _real(batch, key, b, p, length)
        and _real(batch, key, b, p + 1, length)
    )


def _kl(P, Q, direction):
    """KL between two probability vectors with 0 log 0 = 0 (P, Q float64, same length)."""
    A, Bv = (P, Q) if direction == "forward" else (Q, P)
    pos = A > 0
    one = torch.ones_like(A)
    a_safe, b_safe = torch.where(pos, A, one), torch.where(pos, Bv, one)  # no 0 * log 0 in the graph
    return torch.where(pos, A * (torch.log(a_safe) - torch.log(b_safe)), torch.zeros_like(A)).sum()


def _top_columns(scores, k):
    """Columns with score > -inf, the k highest, ties to the lower id, returned ascending."""
    import numpy as np

    sc = scores.detach().to(torch.float64).numpy()
    cand = np.nonzero(sc > -np.inf)[0]
    order = cand[np.lexsort((cand, -sc[cand]))]  # by score descending, then id ascending
    if k is not None:
        order = order[:k]
    return sorted(int(j) for j in order)


def chunk_units(batch, i, Ls, Lt, *, correct_only=True, starts=False):
    """Valid chunks as `(b, c, student positions, teacher positions)`: positions p whose next token
    is in chunk c; chunks with an empty side are skipped. With `starts`, only chunks whose first
    listed position on each side is the chunk start (token p itself outside c: a chunk that begins
    at position 0 has no start position)."""
    out = []
    B = batch[f"alignment_{i}_pair_valid"].shape[0]
    for b in range(B):
        for c in range(batch[f"alignment_{i}_pair_valid"].shape[1]):
            if not bool(batch[f"alignment_{i}_pair_valid"][b, c]) or not _kept(batch, b):
                continue
            if correct_only and not bool(batch[f"alignment_{i}_pair_is_correct"][b, c]):
                continue
            sp = _positions(batch, f"alignment_{i}_student_chunk_id", "", b, c, Ls)
            tp = _positions(batch, f"alignment_{i}_teacher_chunk_id", f"teacher_{i}_", b, c, Lt)
            if sp and tp:
                if starts and (int(batch[f"alignment_{i}_student_chunk_id"][b, sp[0]]) == c
                               or int(batch[f"alignment_{i}_teacher_chunk_id"][b, tp[0]]) == c):
                    continue
                out.append((b, c, sp, tp))
    return out


def _positions(batch, key, prefix, b, c, length):
    cid = batch[key][b]
    return [p for p in range(length - 1) if next_token_valid(batch, b, p, length, prefix) and int(cid[p + 1]) == c]


def chunk_log_dist(z, b, positions, form, T, ids=None):
    """The chunk's log distribution from logits `z [B, L, V]` (float64): `start`, `mean_log`, `chain`."""
    if form == "start":
        return torch.log_softmax(z[b, positions[0]] / T, dim=0)
    if form == "mean_log":
        return torch.stack([torch.log_softmax(z[b, p] / T, dim=0) for p in positions]).mean(dim=0)
    out = torch.log_softmax(z[b, positions[0]] / T, dim=0)
    for p in positions[1:]:
        out = out + torch.log_softmax(z[b, p] / T, dim=0)[int(ids[b, p + 1])]
    return out



# ---------------------------------------------------------------------------------------------
# CE


def reference_ce(student_logits, batch, *, normalizer=None):
    """Sum over next-token positions of -log softmax(z_p)[input_ids[p + 1]], / normalizer."""
    z = student_logits.to(torch.float64)
    B, L, V = z.shape
    ids = batch["input_ids"]
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for p in range(L):
            if next_token_valid(batch, b, p, L):
                total = total - torch.log_softmax(z[b, p], dim=0)[int(ids[b, p + 1])]
                count += 1
    norm = normalizer if normalizer is not None else max(count, 1)
    return total / norm, count


# ---------------------------------------------------------------------------------------------
# same-vocab KL


def reference_kl(student_logits, teacher_outputs, batch, *, temperature=1.0, direction="forward",
                 tail="bucket", normalizer=None):
    z = student_logits.to(torch.float64)
    B, L, V = z.shape
    T = float(temperature)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for p in range(L):
            if not next_token_valid(batch, b, p, L):
                continue
            count += 1
            q = torch.softmax(z[b, p] / T, dim=0)
            if isinstance(teacher_outputs, torch.Tensor):
                zt = teacher_outputs[b, p].to(torch.float64)
                if zt.shape[0] < V:
                    zt = torch.cat([zt, torch.full((V - zt.shape[0],), float("-inf"), dtype=torch.float64)])
                P = torch.softmax(zt / T, dim=0)
                total = total + _kl(P, q, direction)
                continue
            lp = teacher_outputs["topk_logprobs"][b, p].to(torch.float64)
            idx = teacher_outputs["topk_indices"][b, p]
            keep = [j for j in range(idx.shape[0]) if int(idx[j]) >= 0 and lp[j] > float("-inf")]
            if not keep:
                continue
            ids = [int(idx[j]) for j in keep]
            lps = torch.stack([lp[j] for j in keep])
            qs = q[ids]
            if tail == "bucket":
                Ps = torch.exp(lps)
                Pvec = torch.cat([Ps, (1 - Ps.sum()).clamp_min(0).reshape(1)])
                unlisted = torch.ones(V, dtype=torch.bool)
                unlisted[ids] = False
                Qvec = torch.cat([qs, q[unlisted].sum().reshape(1)])  # summed directly: no 1 - sum cancellation
            else:
                Pvec = torch.softmax(lps / T, dim=0)
                Qvec = qs / qs.sum()
            total = total + _kl(Pvec, Qvec, direction)
    norm = normalizer if normalizer is not None else max(count, 1)
    return T * T * total / norm, count


# ---------------------------------------------------------------------------------------------
# P-KL


def dense_projection(indices, weights, student_width, teacher_width):
    """Dense float64 W `[student_width, teacher_width]` from the sparse artifact tensors."""
    W = torch.zeros(student_width, teacher_width, dtype=torch.float64)
    for v in range(min(indices.shape[0], student_width)):
        for k in range(indices.shape[1]):
            j = int(indices[v, k])
            if j >= 0:
                W[v, j] += float(weights[v, k])
    return W


def sparse_projection(indices, weights, student_width, teacher_width):
    """W `[student_width, teacher_width]` as a float64 sparse COO tensor, for full-width vocabularies
    (llama3 x qwen3: a dense float64 W would take 156 GB). `reference_pkl` accepts either."""
    idx = torch.as_tensor(indices)[:student_width].to(torch.int64)
    w = torch.as_tensor(weights)[:student_width].to(torch.float64)
    keep = (idx >= 0) & (w > 0)
    rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)[keep]
    return torch.sparse_coo_tensor(torch.stack([rows, idx[keep]]), w[keep], (student_width, teacher_width),
                                   check_invariants=True).coalesce()


def _lse(x, dim=0):
    """logsumexp with a finite gradient where every entry is -inf (value -inf, gradient 0); -inf when
    there is no entry."""
    if x.shape[dim] == 0:
        return torch.full(x.shape[:dim] + x.shape[dim + 1:], float("-inf"), dtype=x.dtype)
    m = x.detach().amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(x - m).sum(dim=dim)
    return torch.where(s > 0, torch.log(torch.where(s > 0, s, torch.ones_like(s))) + m.squeeze(dim),
                       torch.full_like(s, float("-inf")))


def log_project(log_p, W):
    """`log (p W)` for a student log-distribution `log_p [V_s]` (float64), in log space: column j is
    `logsumexp_v(log p_v + log W_vj)` (-inf where nothing reaches it), so a tiny projected mass keeps
    its precision. W dense `[V_s, V_t]` or sparse COO (`sparse_projection`)."""
    if W.is_sparse:
        (rows, cols), vals = W.indices(), W.values()
        t = log_p[rows] + torch.log(vals)
        m = torch.full((W.shape[1],), float("-inf"), dtype=t.dtype).scatter_reduce(0, cols, t.detach(), "amax")
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = torch.zeros(W.shape[1], dtype=t.dtype).index_add(0, cols, torch.exp(t - m[cols]))
        return torch.where(s > 0, torch.log(torch.where(s > 0, s, torch.ones_like(s))) + m,
                           torch.full_like(s, float("-inf")))
    log_w = torch.where(W > 0, torch.log(torch.where(W > 0, W, torch.ones_like(W))), float("-inf"))
    return _lse(log_p[:, None] + log_w, dim=0)


def _kl_log(log_P, log_Q, direction):
    """KL between two distributions given as log-probabilities (float64), 0 log 0 = 0, computed
    from the logs (no probability is logged)."""
    log_A, log_B = (log_P, log_Q) if direction == "forward" else (log_Q, log_P)
    pos = log_A > float("-inf")
    zero = torch.zeros_like(log_A)
    la, lb = torch.where(pos, log_A, zero), torch.where(pos, log_B, zero)  # no -inf * 0 in the graph
    return torch.where(pos, torch.exp(la) * (la - lb), zero).sum()


def _chunk_positions(batch, i, b, c, length, side):
    """Next-token positions p of `side` whose next token is in chunk c (all, and chunk starts)."""
    cid = batch[f"alignment_{i}_{side}_chunk_id"][b]
    prefix = "" if side == "student" else f"teacher_{i}_"
    allp, starts = [], []
    for p in range(length - 1):
        if next_token_valid(batch, b, p, length, prefix) and int(cid[p + 1]) == c:
            allp.append(p)
            if int(cid[p]) != c:
                starts.append(p)
    return allp, starts


def reference_pkl(student_logits, teacher_logits, batch, W, *, teacher_index=0, temperature=1.0,
                  direction="forward", top_k_columns=8192, columns=None, public=False,
                  correct_only=None, normalizer=None):
    """P-KL with W dense `[V_s, V_t]` or sparse COO (`sparse_projection`, full-width vocabularies; the
    principled form only); see docs/losses.md for the two forms. Returns (loss, count, columns).
    The public form is NeMo-RL's, transcribed in `tests/reference_nemo.py` (W's width is the
    projection's teacher vocabulary); `correct_only=None`: True, public False.

    The principled form is computed in log space, as the formulas read: `log q = log (p W)` by
    logsumexp over W's entries, the rest and the normalisers by logsumexp, the KL from the logs; in
    float64 no probability of finite logits underflows before it is logged."""
    if public:
        from tests.reference_nemo import nemo_pkl

        return nemo_pkl(student_logits, teacher_logits, batch, W, teacher_index=teacher_index,
                        temperature=temperature, vocab_topk=1 << 62 if top_k_columns is None else top_k_columns,
                        reverse_kl=direction == "reverse", exact_token_match_only=bool(correct_only),
                        columns=columns, normalizer=normalizer)
    correct_only = True if correct_only is None else correct_only
    i = teacher_index
    zs = student_logits.to(torch.float64)
    zt = teacher_logits.to(torch.float64)
    B, Ls, Vs = zs.shape
    Lt, Vt = zt.shape[1], zt.shape[2]
    T = float(temperature)
    if W.is_sparse:
        if tuple(W.shape) != (Vs, Vt):
            W = torch.sparse_coo_tensor(W.indices(), W.values(), (Vs, Vt), check_invariants=True).coalesce()
        reach = torch.zeros(Vt, dtype=torch.float64).index_add(0, W.indices()[1], W.values()) > 0
    else:
        if W.shape[0] < Vs:
            W = torch.cat([W, torch.zeros(Vs - W.shape[0], W.shape[1], dtype=torch.float64)])
        if W.shape[1] < Vt:
            W = torch.cat([W, torch.zeros(W.shape[0], Vt - W.shape[1], dtype=torch.float64)], dim=1)
        reach = W.sum(dim=0) > 0
    W_log = W if W.is_sparse else W.to_sparse().coalesce()  # same values, cheaper to project
    P_slots = batch[f"alignment_{i}_pair_valid"].shape[1]

    units = []  # (b, student positions, teacher positions)
    for b in range(B):
        for c in range(P_slots):
            if not bool(batch[f"alignment_{i}_pair_valid"][b, c]) or not _kept(batch, b):
                continue
            if correct_only and not bool(batch[f"alignment_{i}_pair_is_correct"][b, c]):
                continue
            _, s_start = _chunk_positions(batch, i, b, c, Ls, "student")
            _, t_start = _chunk_positions(batch, i, b, c, Lt, "teacher")
            if s_start and t_start:
                units.append((b, s_start[:1], t_start[:1]))

    if columns is not None:
        S = sorted({int(j) for j in columns if 0 <= int(j) < Vt and bool(reach[int(j)])})
    else:
        scores = torch.full((Vt,), float("-inf"), dtype=torch.float64)
        for b, _, t_pos in units:
            lp = torch.log_softmax(zt[b, t_pos[0]] / T, dim=0)
            scores = torch.maximum(scores, lp)
        scores = torch.where(reach, scores, torch.full_like(scores, float("-inf")))
        S = _top_columns(scores, top_k_columns)
    in_s = torch.zeros(Vt, dtype=torch.bool)
    in_s[S] = True
    rest = reach & ~in_s
    S_idx = torch.tensor(S, dtype=torch.int64)

    total = torch.zeros((), dtype=torch.float64)
    for b, s_pos, t_pos in units:
        log_q = log_project(torch.log_softmax(zs[b, s_pos[0]] / T, dim=0), W_log)  # [V_t], unnormalised
        log_Q = torch.cat([log_q[S_idx], _lse(log_q[rest]).reshape(1)])
        log_Q = log_Q - _lse(log_Q)  # renormalised over the mapped mass
        lp = torch.log_softmax(zt[b, t_pos[0]] / T, dim=0)
        lp = lp - _lse(lp[reach])  # renormalised over the reachable columns
        log_P = torch.cat([lp[S_idx], _lse(lp[rest]).reshape(1)])
        total = total + _kl_log(log_P, log_Q, direction)
    count = len(units)
    norm = normalizer if normalizer is not None else max(count, 1)
    return T * T * total / norm, count, S


# ---------------------------------------------------------------------------------------------
# ULD


def _sorted_l1(a, b, cut=None):
    """L1 between two vectors sorted descending (the shorter zero-padded); `cut`: largest entries only."""
    a = torch.sort(a, descending=True).values
    b = torch.sort(b, descending=True).values
    if cut is not None:
        a, b = a[:cut], b[:cut]
    n = max(a.shape[0], b.shape[0])
    a = torch.cat([a, torch.zeros(n - a.shape[0], dtype=a.dtype)])
    b = torch.cat([b, torch.zeros(n - b.shape[0], dtype=b.dtype)])
    return (a - b).abs().sum()  # rank by rank


def reference_uld(student_logits, teacher_logits, batch, *, teacher_index=0, temperature=1.0, form="start",
                  tail_cut=None, correct_only=True, normalizer=None):
    i = teacher_index
    zs, zt = student_logits.to(torch.float64), teacher_logits.to(torch.float64)
    T = float(temperature)
    units = chunk_units(batch, i, zs.shape[1], zt.shape[1], correct_only=correct_only, starts=form == "start")
    total = torch.zeros((), dtype=torch.float64)
    for b, _c, sp, tp in units:
        q = torch.exp(chunk_log_dist(zs, b, sp, form, T, batch.get("input_ids")))
        p = torch.exp(chunk_log_dist(zt, b, tp, form, T, batch.get(f"teacher_{i}_input_ids")))
        total = total + _sorted_l1(q, p, tail_cut)
    norm = normalizer if normalizer is not None else max(len(units), 1)
    return total / norm, len(units)


# ---------------------------------------------------------------------------------------------
# H-KL / GOLD hybrid


def reference_common_by_threshold(W, threshold=0.6):
    """H-KL common pairs from a dense W: rows with max weight >= threshold -> their argmax column
    (lowest column on ties); per teacher column the largest weight wins, ties to the lowest row."""
    best = {}  # teacher id -> (weight, student id)
    for s in range(W.shape[0]):
        row = W[s]
        if float(row.max()) <= 0:
            continue
        w = float(row.max())
        if w < threshold - 1e-6:
            continue
        t = int(torch.nonzero(row == row.max())[0])
        if t not in best or w > best[t][0] or (w == best[t][0] and s < best[t][1]):
            best[t] = (w, s)
    pairs = sorted((s, t) for t, (_w, s) in best.items())
    return [s for s, _ in pairs], [t for _, t in pairs]


def reference_hybrid(student_logits, teacher_logits, batch, common, *, teacher_index=0, temperature=1.0,
                     public=False, common_weight=1.0, uncommon_weight=1.0, tail_cut=None, correct_only=None,
                     normalizer=None, chunk_form=None, direction="forward"):
    """KL on the common pairs `common = (student ids, teacher ids)` + sorted L1 on the rest.
    principled: chunk starts (or `chunk_form`), renormalised KL, full sort; public: NeMo-RL's, as
    transcribed in `tests/reference_nemo.py` (every valid chunk unless `correct_only`)."""
    if public:
        from tests.reference_nemo import nemo_gold

        return nemo_gold(student_logits, teacher_logits, batch, common, teacher_index=teacher_index,
                         temperature=temperature, uncommon_topk=8192 if tail_cut is None else tail_cut,
                         reverse_kl=direction == "reverse", normalizer=normalizer, common_weight=common_weight,
                         uncommon_weight=uncommon_weight, exact_token_match_only=bool(correct_only))
    correct_only = True if correct_only is None else correct_only
    i = teacher_index
    zs, zt = student_logits.to(torch.float64), teacher_logits.to(torch.float64)
    Vs, Vt = zs.shape[2], zt.shape[2]
    T = float(temperature)
    s_ids, t_ids = [int(x) for x in common[0]], [int(x) for x in common[1]]
    m = len(s_ids)
    in_s, in_t = set(s_ids), set(t_ids)
    u_s = [v for v in range(Vs) if v not in in_s]
    u_t = [v for v in range(Vt) if v not in in_t]
    s_ix, t_ix = torch.tensor(s_ids, dtype=torch.int64), torch.tensor(t_ids, dtype=torch.int64)
    us_ix, ut_ix = torch.tensor(u_s, dtype=torch.int64), torch.tensor(u_t, dtype=torch.int64)
    form = chunk_form or "start"
    cut = tail_cut
    if cut is not None:
        cut = min(len(u_s), len(u_t), cut)
    units = chunk_units(batch, i, zs.shape[1], zt.shape[1], correct_only=correct_only, starts=form == "start")
    total = torch.zeros((), dtype=torch.float64)
    for b, _c, sp, tp in units:
        lq = chunk_log_dist(zs, b, sp, form, T, batch.get("input_ids"))
        lp = chunk_log_dist(zt, b, tp, form, T, batch.get(f"teacher_{i}_input_ids"))
        kl = torch.zeros((), dtype=torch.float64)
        if m and bool(torch.isfinite(lp[t_ix]).any()):
            # KL(P / P(C) || Q / Q(C)) from the log-probabilities renormalised over C (exact in float64
            # whatever the spread: no probability is formed before its log)
            lpn = lp[t_ix] - torch.logsumexp(lp[t_ix], dim=0)
            lqn = lq[s_ix] - torch.logsumexp(lq[s_ix], dim=0)
            pn = torch.exp(lpn)
            pos = pn > 0
            kl = torch.where(pos, pn * (torch.where(pos, lpn, 0.0) - torch.where(pos, lqn, 0.0)), 0.0).sum()
        l1 = _sorted_l1(torch.exp(lq[us_ix]), torch.exp(lp[ut_ix]), cut)
        total = total + T * T * common_weight * kl + uncommon_weight * l1
    norm = normalizer if normalizer is not None else max(len(units), 1)
    return total / norm, len(units)


# ---------------------------------------------------------------------------------------------
# ALM


def _binary(lt, ls, tau, divergence, eps=1e-6):
    """Divergence between (p_t, 1 - p_t) and (p_s, 1 - p_s), p = exp(l / tau - eps)."""
    at, as_ = lt / tau - eps, ls / tau - eps
    pt = torch.exp(at)
    l1m_t, l1m_s = torch.log(-torch.expm1(at)), torch.log(-torch.expm1(as_))
    if divergence == "bce":
        return -(pt * as_ + (1 - pt) * l1m_s)
    return pt * (at - as_) + (1 - pt) * (l1m_t - l1m_s)


def reference_alm(student_logits, teacher_outputs, batch, *, teacher_index=0, tau=100.0, divergence="bce",
                  debias_gamma=None, teacher_boundary_tokens=None, student_boundary_tokens=None,
                  correct_only=True, normalizer=None):
    """ALM: per valid chunk, l = sum of the log-probabilities of the chunk's own tokens on each side,
    compared with a binarised divergence at temperature tau. With `debias_gamma`, chunks whose end is
    a boundary with probability < gamma (mass on the boundary tokens at the chunk's last token, on each
    side given) are dropped; a chunk that ends its sample is kept."""
    i = teacher_index
    zs = student_logits.to(torch.float64)
    Ls = zs.shape[1]
    ids_s, ids_t = batch["input_ids"], batch[f"teacher_{i}_input_ids"]
    topk = isinstance(teacher_outputs, dict) and teacher_outputs.get("logits") is None
    if topk:
        tl = teacher_outputs["target_logprob"].to(torch.float64)
        Lt = tl.shape[1]
    else:
        zt = teacher_outputs if isinstance(teacher_outputs, torch.Tensor) else teacher_outputs["logits"]
        zt = zt.to(torch.float64)
        Lt = zt.shape[1]

    def t_logprob(b, p):
        return tl[b, p] if topk else torch.log_softmax(zt[b, p], dim=0)[int(ids_t[b, p + 1])]

    def as_mask(tokens, width):
        t = torch.as_tensor(tokens)
        if t.dtype == torch.bool:
            return torch.cat([t, torch.zeros(max(width - t.shape[0], 0), dtype=torch.bool)])
        m = torch.zeros(width, dtype=torch.bool)
        for v in t.tolist():
            m[v] = True
        return m

    def t_boundary(b, p):
        if topk:
            lp, idx = teacher_outputs["topk_logprobs"][b, p].to(torch.float64), teacher_outputs["topk_indices"][b, p]
            return sum(float(torch.exp(lp[j])) for j in range(idx.shape[0])
                       if int(idx[j]) >= 0 and bool(as_mask(teacher_boundary_tokens, int(idx.max()) + 1)[int(idx[j])]))
        pr = torch.softmax(zt[b, p], dim=0)
        return float(pr[as_mask(teacher_boundary_tokens, pr.shape[0])].sum())

    def s_boundary(b, p):
        pr = torch.softmax(zs[b, p], dim=0)
        return float(pr[as_mask(student_boundary_tokens, pr.shape[0])].sum().detach())

    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for b, _c, sp, tp in chunk_units(batch, i, Ls, Lt, correct_only=correct_only):
        if debias_gamma is not None:
            qs, qt = sp[-1] + 1, tp[-1] + 1  # the chunk's last token: its logit predicts what follows
            keep = True
            if teacher_boundary_tokens is not None and next_token_valid(batch, b, qt, Lt, f"teacher_{i}_"):
                keep &= t_boundary(b, qt) >= debias_gamma
            if student_boundary_tokens is not None and next_token_valid(batch, b, qs, Ls):
                keep &= s_boundary(b, qs) >= debias_gamma
            if not keep:
                continue
        ls = sum(torch.log_softmax(zs[b, p], dim=0)[int(ids_s[b, p + 1])] for p in sp)
        lt = sum(t_logprob(b, p) for p in tp)
        total = total + _binary(lt.detach() if torch.is_tensor(lt) else lt, ls, tau, divergence)
        count += 1
    norm = normalizer if normalizer is not None else max(count, 1)
    return total / norm, count


# ---------------------------------------------------------------------------------------------
# top-k teacher outputs (docs/losses.md, "Top-k teacher outputs"): P-KL, ULD, H-KL / GOLD


def _listed(teacher_outputs, b, p):
    """The teacher at (b, p): `[(id, probability)]` of the listed slots and the rest probability, both
    renormalised over listed + rest (float64)."""
    lp = teacher_outputs["topk_logprobs"][b, p].to(torch.float64)
    idx = teacher_outputs["topk_indices"][b, p]
    slots = [(int(idx[j]), lp[j]) for j in range(idx.shape[0]) if int(idx[j]) >= 0]
    rest = teacher_outputs["rest_logprob"][b, p].to(torch.float64)
    z = sum((torch.exp(v) for _, v in slots), torch.exp(rest))
    return [(j, float(torch.exp(v) / z)) for j, v in slots], float(torch.exp(rest) / z)


def _start_units(batch, i, Ls, Lt, correct_only):
    """`(b, student start, teacher start)` of every valid chunk with a start on both sides."""
    return [(b, sp[0], tp[0]) for b, _c, sp, tp in chunk_units(batch, i, Ls, Lt, correct_only=correct_only,
                                                                starts=True)]


def reference_pkl_topk(student_logits, teacher_outputs, batch, W, *, teacher_index=0, direction="forward",
                       top_k_columns=8192, columns=None, correct_only=True, normalizer=None):
    """The principled P-KL on top-k teacher outputs (`topk_logprobs`, `topk_indices`, `rest_logprob`)
    with a dense W `[V_s, V_t]`: per chunk start, the outcomes are the listed ids W reaches that lie in
    S (scores: the largest listed log-probability over the units) plus one rest; the teacher is
    renormalised over its reachable listed mass plus its rest, the student over its mapped mass.
    Returns (loss, count, S)."""
    zs = student_logits.to(torch.float64)
    B, Ls, Vs = zs.shape
    Lt = teacher_outputs["topk_logprobs"].shape[1]
    Vt = W.shape[1]
    if W.shape[0] < Vs:
        W = torch.cat([W, torch.zeros(Vs - W.shape[0], Vt, dtype=torch.float64)])
    reach = W.sum(dim=0) > 0
    units = _start_units(batch, teacher_index, Ls, Lt, correct_only)
    if columns is not None:
        S = sorted({int(j) for j in columns if 0 <= int(j) < Vt and bool(reach[int(j)])})
    else:
        scores = torch.full((Vt,), float("-inf"), dtype=torch.float64)
        for b, _sp, tp in units:
            lp, idx = teacher_outputs["topk_logprobs"][b, tp], teacher_outputs["topk_indices"][b, tp]
            for j in range(idx.shape[0]):
                t = int(idx[j])
                if 0 <= t < Vt and bool(reach[t]):
                    scores[t] = max(float(scores[t]), float(lp[j]))
        S = _top_columns(scores, top_k_columns)
    in_s = set(S)
    total = torch.zeros((), dtype=torch.float64)
    for b, sp, tp in units:
        listed, rest = _listed(teacher_outputs, b, tp)
        listed = [(j, pj) for j, pj in listed if j < Vt and bool(reach[j])]  # unreachable listed ids: dropped
        out = [j for j, _ in listed if j in in_s]
        z_r = sum(pj for _, pj in listed) + rest
        P = [pj / z_r for j, pj in listed if j in in_s]
        P.append((rest + sum(pj for j, pj in listed if j not in in_s)) / z_r)
        q = torch.softmax(zs[b, sp], dim=0) @ W  # [V_t], the projected student
        others = reach.clone()
        others[out] = False
        Q = torch.cat([q[out], q[others].sum().reshape(1)])
        total = total + _kl(torch.tensor(P, dtype=torch.float64), Q / Q.sum(), direction)
    norm = normalizer if normalizer is not None else max(len(units), 1)
    return total / norm, len(units), S


def _student_top(q, count, exclude=()):
    """The student's `count` largest entries of `q` outside `exclude`, sorted, zero-padded to `count`,
    and their ids."""
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[list(exclude)] = False
    ids = keep.nonzero().squeeze(1)
    vals, order = torch.sort(q[ids], descending=True)
    top, top_ids = vals[:count], ids[order[:count]].tolist()
    return torch.cat([top, torch.zeros(count - top.shape[0], dtype=q.dtype)]), top_ids


def reference_uld_topk(student_logits, teacher_outputs, batch, *, teacher_index=0, correct_only=True,
                       normalizer=None):
    """ULD on top-k teacher outputs: per chunk start, the teacher's k_u listed probabilities sorted plus
    its rest against the student's k_u largest probabilities sorted plus the sum of all its others."""
    zs = student_logits.to(torch.float64)
    Ls = zs.shape[1]
    Lt = teacher_outputs["topk_logprobs"].shape[1]
    units = _start_units(batch, teacher_index, Ls, Lt, correct_only)
    total = torch.zeros((), dtype=torch.float64)
    for b, sp, tp in units:
        listed, rest = _listed(teacher_outputs, b, tp)
        t = torch.sort(torch.tensor([pj for _, pj in listed], dtype=torch.float64), descending=True).values
        q = torch.softmax(zs[b, sp], dim=0)
        s_top, top_ids = _student_top(q, len(listed))
        others = torch.ones(q.shape[0], dtype=torch.bool)
        others[top_ids] = False
        total = total + (s_top - t).abs().sum() + (q[others].sum() - rest).abs()
    norm = normalizer if normalizer is not None else max(len(units), 1)
    return total / norm, len(units)


def reference_hybrid_topk(student_logits, teacher_outputs, batch, common, *, teacher_index=0, common_weight=1.0,
                          uncommon_weight=1.0, correct_only=True, normalizer=None):
    """H-KL / GOLD on top-k teacher outputs with `common = (student ids, teacher ids)`: per chunk start,
    the KL on the listed common pairs (both sides renormalised over them) plus the sorted L1 of the
    teacher's listed uncommon probabilities and rest against the student's as many largest uncommon
    probabilities and the sum of all its other entries."""
    zs = student_logits.to(torch.float64)
    Ls = zs.shape[1]
    Lt = teacher_outputs["topk_logprobs"].shape[1]
    t2s = {int(t): int(s_) for s_, t in zip(common[0], common[1])}
    common_s = set(t2s.values())
    units = _start_units(batch, teacher_index, Ls, Lt, correct_only)
    total = torch.zeros((), dtype=torch.float64)
    for b, sp, tp in units:
        listed, rest = _listed(teacher_outputs, b, tp)
        pairs = [(t2s[j], pj) for j, pj in listed if j in t2s]
        unc = [pj for j, pj in listed if j not in t2s]
        q = torch.softmax(zs[b, sp], dim=0)
        kl = torch.zeros((), dtype=torch.float64)
        mass = sum(pj for _, pj in pairs)
        if pairs and mass > 0:
            P = torch.tensor([pj / mass for _, pj in pairs], dtype=torch.float64)
            Qc = q[[s_ for s_, _ in pairs]]
            kl = _kl(P, Qc / Qc.sum(), "forward")
        t = torch.sort(torch.tensor(unc, dtype=torch.float64), descending=True).values
        s_top, top_ids = _student_top(q, len(unc), exclude=common_s)
        others = torch.ones(q.shape[0], dtype=torch.bool)
        others[top_ids + [s_ for s_, _ in pairs]] = False
        l1 = (s_top - t).abs().sum() + (q[others].sum() - rest).abs()
        total = total + common_weight * kl + uncommon_weight * l1
    norm = normalizer if normalizer is not None else max(len(units), 1)
    return total / norm, len(units)


def topk_outputs(logits, k, *, ids=None, dtype=None):
    """Top-k teacher outputs of `logits [B, T, V]` as CONTRACTS §3 states them: log-softmax over the
    full vocabulary, the k largest with their ids, and `rest_logprob`, the log of the unlisted mass
    computed in float64 before any rounding (-inf when the k ids hold everything); with `ids [B, T]`
    also `target_logprob` (position p: the log-probability of `ids[p + 1]`; 0 at the last position).
    `dtype` rounds the stored log-probabilities (e.g. bfloat16)."""
    lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    if k >= logits.shape[-1]:
        rest = torch.full(vals.shape[:2], float("-inf"), dtype=torch.float64)
    else:
        rest = torch.logsumexp(lp.scatter(-1, idx, float("-inf")), dim=-1)  # the unlisted mass summed directly
    out = {"topk_logprobs": vals, "topk_indices": idx, "rest_logprob": rest}
    if ids is not None:
        target = torch.zeros(ids.shape, dtype=torch.float64)
        target[:, :-1] = lp[:, :-1].gather(2, ids[:, 1:, None].clamp(0, lp.shape[-1] - 1)).squeeze(2)
        out["target_logprob"] = target
    if dtype is not None:
        out = {k_: (v.to(dtype) if v.is_floating_point() else v) for k_, v in out.items()}
    return out


# ---------------------------------------------------------------------------------------------
# hand-built batches


def synthetic_batch(seed, *, batch_size=3, num_chunks=(5, 9), vocab_s=40, vocab_t=50, pad=2,
                    drop_sample=True, teacher_index=0, max_side=3):
    """A random CONTRACTS §2 batch for one cross-tokenizer teacher.

    Each sample is a sequence of chunks with 1..max_side tokens per side (a few one-sided chunks
    and not-correct chunks mixed in); samples differ in length and are right-padded, plus `pad`
    extra padded positions; the last sample is dropped (`sample_mask`) when `drop_sample`.
    """
    g = torch.Generator().manual_seed(seed)

    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    samples = []
    for _ in range(batch_size):
        chunks = []
        for _c in range(rint(*num_chunks)):
            r = float(torch.rand((), generator=g))
            ns, nt = (rint(1, max_side), rint(1, max_side)) if r > 0.15 else ((1, 0) if r > 0.07 else (0, 1))
            if r > 0.5:
                ns, nt = 1, 1
            correct = ns > 0 and nt > 0 and float(torch.rand((), generator=g)) > 0.1
            chunks.append((ns, nt, correct))
        samples.append(chunks)
    Ls = max(sum(c[0] for c in s) for s in samples) + pad
    Lt = max(sum(c[1] for c in s) for s in samples) + pad
    P = max(len(s) for s in samples) + 1
    i = teacher_index
    out = {
        "input_ids": torch.zeros(batch_size, Ls, dtype=torch.int64),
        "token_mask": torch.zeros(batch_size, Ls, dtype=torch.bool),
        "sample_mask": torch.ones(batch_size, dtype=torch.bool),
        f"teacher_{i}_input_ids": torch.zeros(batch_size, Lt, dtype=torch.int64),
        f"teacher_{i}_token_mask": torch.zeros(batch_size, Lt, dtype=torch.bool),
        f"alignment_{i}_student_chunk_id": torch.full((batch_size, Ls), -1, dtype=torch.int64),
        f"alignment_{i}_teacher_chunk_id": torch.full((batch_size, Lt), -1, dtype=torch.int64),
        f"alignment_{i}_pair_valid": torch.zeros(batch_size, P, dtype=torch.bool),
        f"alignment_{i}_pair_is_correct": torch.zeros(batch_size, P, dtype=torch.bool),
        f"alignment_{i}_num_chunks": torch.zeros(batch_size, dtype=torch.int64),
    }
    for b, chunks in enumerate(samples):
        ps = pt = 0
        for c, (ns, nt, correct) in enumerate(chunks):
            out[f"alignment_{i}_student_chunk_id"][b, ps : ps + ns] = c
            out[f"alignment_{i}_teacher_chunk_id"][b, pt : pt + nt] = c
            out[f"alignment_{i}_pair_valid"][b, c] = True
            out[f"alignment_{i}_pair_is_correct"][b, c] = correct
            ps, pt = ps + ns, pt + nt
        out["token_mask"][b, :ps] = True
        out[f"teacher_{i}_token_mask"][b, :pt] = True
        out["input_ids"][b, :ps] = torch.randint(0, vocab_s, (ps,), generator=g)
        out[f"teacher_{i}_input_ids"][b, :pt] = torch.randint(0, vocab_t, (pt,), generator=g)
        out[f"alignment_{i}_num_chunks"][b] = len(chunks)
    if drop_sample and batch_size > 1:
        out["sample_mask"][-1] = False
    return out


def random_projection(seed, vocab_s, vocab_t, top_k=4, *, empty_rows=2, unreachable=3):
    """A random sparse W: rows sum to 1 with 1..top_k distinct entries, `empty_rows` unmapped rows,
    and the last `unreachable` teacher columns never used."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((vocab_s, top_k), -1, dtype=torch.int64)
    w = torch.zeros(vocab_s, top_k, dtype=torch.float32)
    usable = vocab_t - unreachable
    empty = set(torch.randperm(vocab_s, generator=g)[:empty_rows].tolist())
    for v in range(vocab_s):
        if v in empty:
            continue
        k = int(torch.randint(1, top_k + 1, (1,), generator=g))
        cols = torch.randperm(usable, generator=g)[:k]
        ws = torch.rand(k, generator=g) + 0.05
        idx[v, :k] = cols
        w[v, :k] = ws / ws.sum()
    return idx, w


def random_logits(seed, shape, *, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def is_close(a, b, tol=1e-6):
    """`math.isclose` with rel_tol = abs_tol = tol; a and b are numbers or tensors (also ones that
    require grad)."""
    a, b = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (a, b))
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# ---------------------------------------------------------------------------------------------
# real problems: llama3 student, qwen3 teacher, real text, the collator's alignment and the
# projection builder's W, restricted to a small remapped vocabulary so a dense float64 W fits.

_REAL: dict = {}


def real_tokenizers():
    """(llama3, qwen3) `TokenizerInfo`s and the real llama3 -> qwen3 projection (built once)."""
    if "toks" not in _REAL:
        from xtoken_align import load_tokenizer
        from xtoken_align.projection.builder import build_projection

        s, t = load_tokenizer("llama3"), load_tokenizer("qwen3")
        _REAL["toks"] = (s, t, build_projection(s, t).forward)
    return _REAL["toks"]


def heldout_texts(num_texts, max_chars, *, skip=0):
    import json
    from pathlib import Path

    corpus = Path(__file__).resolve().parent.parent / "data" / "corpus" / "heldout.jsonl"
    texts = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"].strip()
            if len(text) < 40:
                continue
            if skip:
                skip -= 1
                continue
            texts.append(text[:max_chars])
            if len(texts) == num_texts:
                break
    return texts


def restrict_problem(batch, proj, teacher_vocab_size, extra_ids, seed):
    """Restrict a real batch and W to the ids that occur, their W neighbours and `extra_ids` random
    ids per side, remapped to 0..V-1. Returns `(batch, indices, weights, s_sel, t_map)`: W's rows of
    the kept student ids `s_sel` with teacher columns remapped by `t_map` (-1 = dropped); an exact
    sub-matrix, since every neighbour of a kept row is kept."""
    idx, w = torch.as_tensor(proj.indices), torch.as_tensor(proj.weights)
    g = torch.Generator().manual_seed(seed)
    s_used = batch["input_ids"][batch["token_mask"]]
    s_sel = torch.unique(torch.cat([s_used, torch.randint(0, idx.shape[0], (extra_ids,), generator=g)]))
    nb = idx[s_sel]
    t_used = batch["teacher_0_input_ids"][batch["teacher_0_token_mask"]]
    t_width = max(teacher_vocab_size, int(idx.max()) + 1)
    t_sel = torch.unique(torch.cat([t_used, nb[nb >= 0], torch.randint(0, t_width, (extra_ids,), generator=g)]))
    s_map = torch.full((idx.shape[0],), -1, dtype=torch.int64)
    s_map[s_sel] = torch.arange(s_sel.numel())
    t_map = torch.full((t_width,), -1, dtype=torch.int64)
    t_map[t_sel] = torch.arange(t_sel.numel())
    batch["input_ids"] = torch.where(batch["token_mask"], s_map[batch["input_ids"]], 0)
    batch["teacher_0_input_ids"] = torch.where(
        batch["teacher_0_token_mask"], t_map[batch["teacher_0_input_ids"]], 0
    )
    r_idx = torch.where(nb >= 0, t_map[nb.clamp(min=0)], -1)
    r_w = torch.where(r_idx >= 0, w[s_sel], torch.zeros_like(w[s_sel]))
    return batch, r_idx, r_w, s_sel, t_map


def real_problem(num_texts=3, max_chars=200, extra_ids=150, seed=0):
    """A real batch (llama3 student, qwen3 teacher, heldout text, `collate`) and the real W,
    restricted to: the ids that occur, their projection neighbours and `extra_ids` random ids per
    side, remapped to 0..V-1. Returns `(batch, indices, weights, Vs, Vt)`: `indices`/`weights` are
    W's rows of the kept student ids with remapped teacher columns (an exact sub-matrix: every
    neighbour of a kept row is kept)."""
    key = ("plain", num_texts, max_chars, extra_ids, seed)
    if key in _REAL:
        return _REAL[key]
    from xtoken_align.batch.collate import collate

    s_tok, t_tok, proj = real_tokenizers()
    batch = dict(collate(heldout_texts(num_texts, max_chars), s_tok, [t_tok]))
    batch, r_idx, r_w, s_sel, t_map = restrict_problem(batch, proj, t_tok.vocab_size, extra_ids, seed)
    out = (batch, r_idx, r_w, int(s_sel.numel()), int((t_map >= 0).sum()))
    _REAL[key] = out
    return out


def real_problem_with_exact_map(num_texts=3, max_chars=160, extra_ids=120, seed=0):
    """`real_problem` for the hybrid losses (texts end in digits, which Qwen splits), plus the
    exact-match map GOLD needs, read from the artifact's `row_kind`. Returns `(batch, indices,
    weights, exact_map, Vs, Vt)` on restricted, remapped vocabularies: the ids that occur, every W
    neighbour and exact partner of a kept student id, and `extra_ids` random ids per side.
    `exact_map [Vs]`: the remapped teacher id of each exact row, -1 elsewhere."""
    key = ("exact", num_texts, max_chars, extra_ids, seed)
    if key in _REAL:
        return _REAL[key]
    from xtoken_align.batch.collate import collate
    from xtoken_core.artifact_format import ROW_EXACT

    s_tok, t_tok, proj = real_tokenizers()
    texts = [t + " 12345 tokens." for t in heldout_texts(num_texts, max_chars)]  # Qwen splits digits
    batch = dict(collate(texts, s_tok, [t_tok]))
    batch, r_idx, r_w, s_sel, t_map = restrict_problem(batch, proj, t_tok.vocab_size, extra_ids, seed)
    exact = torch.as_tensor(proj.row_kind).to(torch.int64) == ROW_EXACT
    ex_r = torch.where(exact, torch.as_tensor(proj.indices)[:, 0], -1)[s_sel]
    ex_r = torch.where(ex_r >= 0, t_map[ex_r.clamp(min=0)], -1)
    out = (batch, r_idx, r_w, ex_r, int(s_sel.numel()), int((t_map >= 0).sum()))
    _REAL[key] = out
    return out
