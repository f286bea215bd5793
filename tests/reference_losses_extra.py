"""Float64 dense references for the issue-6 losses (ULD, H-KL / GOLD hybrid, ALM, learned-W P-KL),
shared by the tests and `benchmarks/bench_losses_extra.py`.

Written to be obviously right rather than fast: explicit loops over samples, chunks and common pairs,
autograd for gradients. They read the CONTRACTS §2 batch themselves (through the batch-reading helpers
of `reference_losses.py`, not `xtoken_loss.units`).
"""

from __future__ import annotations

import math

import torch

from reference_losses import _kept, _kl, next_token_valid  # the shared batch-reading pieces


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


def _sorted_l1(a, b, cut=None):
    """L1 between two vectors sorted descending (the shorter zero-padded); `cut`: largest entries only."""
    a = torch.sort(a, descending=True).values
    b = torch.sort(b, descending=True).values
    if cut is not None:
        a, b = a[:cut], b[:cut]
    n = max(a.shape[0], b.shape[0])
    a = torch.cat([a, torch.zeros(n - a.shape[0], dtype=a.dtype)])
    b = torch.cat([b, torch.zeros(n - b.shape[0], dtype=b.dtype)])
    total = torch.zeros((), dtype=torch.float64)
    for j in range(n):
        total = total + (a[j] - b[j]).abs()
    return total


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
                     public=False, common_weight=1.0, uncommon_weight=1.0, tail_cut=None, correct_only=True,
                     normalizer=None, chunk_form=None):
    """KL on the common pairs `common = (student ids, teacher ids)` + sorted L1 on the rest.
    principled: chunk starts, renormalised KL, full sort; public: mean of log-probs, raw partial KL,
    sorted tails cut to min(|U_s|, |U_t|, tail_cut or 8192)."""
    i = teacher_index
    zs, zt = student_logits.to(torch.float64), teacher_logits.to(torch.float64)
    Vs, Vt = zs.shape[2], zt.shape[2]
    T = float(temperature)
    s_ids, t_ids = [int(x) for x in common[0]], [int(x) for x in common[1]]
    m = len(s_ids)
    u_s = [v for v in range(Vs) if v not in set(s_ids)]
    u_t = [v for v in range(Vt) if v not in set(t_ids)]
    form = chunk_form or ("mean_log" if public else "start")
    cut = tail_cut if tail_cut is not None else (8192 if public else None)
    if cut is not None:
        cut = min(len(u_s), len(u_t), cut)
    units = chunk_units(batch, i, zs.shape[1], zt.shape[1], correct_only=correct_only, starts=form == "start")
    total = torch.zeros((), dtype=torch.float64)
    for b, _c, sp, tp in units:
        lq = chunk_log_dist(zs, b, sp, form, T)
        lp = chunk_log_dist(zt, b, tp, form, T)
        kl = torch.zeros((), dtype=torch.float64)
        if public:
            for j in range(m):
                pj = torch.exp(lp[t_ids[j]])
                if pj > 0:
                    kl = kl + pj * (lp[t_ids[j]] - lq[s_ids[j]])
        elif m:
            P = torch.exp(lp[t_ids])
            Q = torch.exp(lq[s_ids])
            if P.sum() > 0:
                kl = _kl(P / P.sum(), Q / Q.sum(), "forward")
        l1 = _sorted_l1(torch.exp(lq[u_s]), torch.exp(lp[u_t]), cut)
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


def is_close(a, b, tol=1e-6):
    """`reference_losses.is_close` for tensors that may require grad."""
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# ---------------------------------------------------------------------------------------------
# A restricted, remapped real problem for the hybrid losses: as `reference_losses.real_problem`
# (llama3 student, qwen3 teacher, the collator's alignment, the builder's W; same tokenizers and
# projection, loaded once) plus the exact-match map GOLD needs, read from the artifact's `row_kind`.


def real_problem(num_texts=3, max_chars=160, extra_ids=120, seed=0):
    """`(batch, indices, weights, exact_map, Vs, Vt)` on restricted, remapped vocabularies: the ids
    that occur, every W neighbour and exact partner of a kept student id, and `extra_ids` random ids
    per side. `exact_map [Vs]`: the remapped teacher id of each exact row, -1 elsewhere."""
    key = (num_texts, max_chars, extra_ids, seed)
    if key in _CACHE:
        return _CACHE[key]
    from xtoken_align.projection.artifacts import ROW_EXACT
    from xtoken_align.batch.collate import collate

    from reference_losses import heldout_texts, real_tokenizers, restrict_problem

    s_tok, t_tok, proj = real_tokenizers()
    texts = [t + " 12345 tokens." for t in heldout_texts(num_texts, max_chars)]  # Qwen splits digits
    batch = dict(collate(texts, s_tok, [t_tok]))
    batch, r_idx, r_w, s_sel, t_map = restrict_problem(batch, proj, t_tok.vocab_size, extra_ids, seed)
    exact = torch.as_tensor(proj.row_kind).to(torch.int64) == ROW_EXACT
    ex_r = torch.where(exact, torch.as_tensor(proj.indices)[:, 0], -1)[s_sel]
    ex_r = torch.where(ex_r >= 0, t_map[ex_r.clamp(min=0)], -1)
    out = (batch, r_idx, r_w, ex_r, int(s_sel.numel()), int((t_map >= 0).sum()))
    _CACHE[key] = out
    return out


_CACHE: dict = {}

