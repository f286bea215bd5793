"""Float64 transcription of NeMo-RL's published X-Token losses, the target of `public=True`.

Written from the published semantics (`nemo_rl/algorithms/loss/loss_functions.py`
`CrossTokenizerDistillationLossFn._compute_p_kl` / `_compute_gold`, `nemo_rl/algorithms/x_token/
loss_utils.py` `chunk_average_log_probs`, `valid_chunk_mask`, `select_teacher_topk_indices`,
`build_exact_token_map`, and the defaults of `examples/configs/xtoken_off_policy_distillation.yaml`),
as dense `[B, C, V]` tensor code in NeMo-RL's own order of operations, reading the CONTRACTS §2 batch
directly (not through `xtoken_loss.units`). Single rank, no tensor or context parallelism.

The published steps transcribed here:
- chunk ids are shifted to the next token (position p gets the chunk of token p + 1, the last
  position -1); a chunk's distribution is `sum over its positions / (count + 1e-10)`;
- a chunk counts when it has positions on both sides, `pair_valid`, and its sample is kept
  (`sample_mask`); with `exact_token_match_only` (P-KL only, default false) also `pair_is_correct`;
- the loss is `sum over counted chunks / their number` (the published count is global over the
  ranks; pass it as `normalizer`), times `T^2`;
- teacher logits wider than the projection's teacher vocabulary are cut to it first;
- P-KL: `importance = max over every (b, t) of the raw teacher logits`, `S = topk(importance,
  min(vocab_topk, V_t))` sorted; student `softmax(z / T) @ W[:, S]` averaged per chunk, then
  `Q / (sum Q + 1e-10)`, `log(. + 1e-10)`; teacher `log_softmax(z_t[S] / T)` averaged per chunk;
  `kl_div(log Q, L, log_target=True)` summed over S (reverse: `kl_div(L, log Q)`);
- GOLD: `log_softmax` of the full vocabularies averaged per chunk; `kl_div` on the common pairs
  (forward `exp(b) (b - a)`, reverse `exp(a) (a - b)`); uncommon entries `exp`'d, sorted descending,
  cut to `min(|U_s|, |U_t|, uncommon_topk)`, L1; `loss = (KL + L1) * T^2`;
- exact-token map (`nemo_exact_map`): strict (GOLD) `top weight == 1.0 and indices[:, 1] == -1`,
  lowest student id per teacher id; relaxed (`xtoken_loss`, H-KL) `top weight >= 0.6`, the largest
  weight per teacher id, ties to the lowest student id; weights compared in float32.

Where the published code is undefined or gives NaN (an empty chunk's 0 / 0 never reaches the loss
here; `-inf` logits there turn the one-hot `bmm` into NaN), the transcription sums the chunk's
positions explicitly instead; on finite inputs the two are the same. Ties in the column choice go to
the lower id (`torch.topk` leaves them unspecified).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-10
DEFAULTS = {"temperature": 1.0, "vocab_topk": 8192, "uncommon_topk": 8192, "reverse_kl": False,
            "exact_token_match_only": False}


def _shift_next(chunk_id: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(chunk_id, -1)
    out[:, :-1] = chunk_id[:, 1:]
    return out


def chunk_average(x: torch.Tensor, chunk_id: torch.Tensor, max_chunks: int):
    """`([B, C, V] sum over positions of chunk c / (count + 1e-10), [B, C] counts)`; `chunk_id`
    already shifted, -1 = no chunk."""
    B, _, V = x.shape
    rows, sizes = [], torch.zeros(B, max_chunks, dtype=x.dtype)
    for b in range(B):
        for c in range(max_chunks):
            pos = (chunk_id[b] == c).nonzero().squeeze(1)
            sizes[b, c] = pos.numel()
            rows.append(x[b, pos].sum(dim=0) if pos.numel() else torch.zeros(V, dtype=x.dtype))
    return torch.stack(rows).view(B, max_chunks, V) / (sizes[..., None] + EPS), sizes


def _valid(batch, i, s_sizes, t_sizes, exact_token_match_only):
    pair_valid = batch[f"alignment_{i}_pair_valid"].bool()
    if exact_token_match_only:
        pair_valid = pair_valid & batch[f"alignment_{i}_pair_is_correct"].bool()
    valid = (s_sizes > 0) & (t_sizes > 0) & pair_valid
    sm = batch.get("sample_mask")
    if sm is not None:
        valid = valid & sm.bool()[:, None]
    return valid


def _chunk_ids(batch, i):
    return (_shift_next(batch[f"alignment_{i}_student_chunk_id"]),
            _shift_next(batch[f"alignment_{i}_teacher_chunk_id"]))


def nemo_pkl(student_logits, teacher_logits, batch, W, *, teacher_index=0, temperature=1.0, vocab_topk=8192,
             reverse_kl=False, exact_token_match_only=False, columns=None, normalizer=None):
    """The published P-KL with the dense projection `W [R, V_t]` (V_t: the projection's teacher
    vocabulary). Returns `(loss, number of counted chunks, S)`. `columns` fixes S (not published)."""
    i = teacher_index
    zs = student_logits.to(torch.float64)
    zt = teacher_logits.to(torch.float64)
    T = float(temperature)
    Vt = W.shape[1]
    if zt.shape[-1] > Vt:
        zt = zt[..., :Vt]  # padded lm_head columns are no tokens
    if W.shape[0] < zs.shape[-1]:  # student ids past the projection's rows map nowhere (published: an error)
        W = torch.cat([W, torch.zeros(zs.shape[-1] - W.shape[0], Vt, dtype=W.dtype)])
    probs = torch.softmax(zs / T, dim=-1)
    if columns is None:
        importance = zt.reshape(-1, Vt).max(dim=0).values
        k = min(vocab_topk, Vt)
        S = torch.sort(torch.sort(importance, descending=True, stable=True).indices[:k]).values
    else:
        S = torch.unique(torch.as_tensor(columns, dtype=torch.int64))
        S = S[(S >= 0) & (S < Vt)]
    projected = probs @ W.to(torch.float64)[:, S]  # [B, T_s, k]
    target_log_probs = torch.log_softmax(zt[..., S] / T, dim=-1)  # [B, T_t, k]
    cid_s, cid_t = _chunk_ids(batch, i)
    C = batch[f"alignment_{i}_pair_valid"].shape[1]
    proj_chunks, s_sizes = chunk_average(projected, cid_s, C)
    tgt_log_chunks, t_sizes = chunk_average(target_log_probs, cid_t, C)
    proj_chunks = proj_chunks / (proj_chunks.sum(dim=-1, keepdim=True) + EPS)
    proj_log_chunks = (proj_chunks + EPS).log()
    valid = _valid(batch, i, s_sizes, t_sizes, exact_token_match_only)
    if reverse_kl:
        per_chunk = F.kl_div(tgt_log_chunks, proj_log_chunks, reduction="none", log_target=True).sum(dim=-1)
    else:
        per_chunk = F.kl_div(proj_log_chunks, tgt_log_chunks, reduction="none", log_target=True).sum(dim=-1)
    count = int(valid.sum())
    denom = normalizer if normalizer is not None else max(count, 1)
    loss = per_chunk[valid].sum() / denom * (T * T)
    return loss, count, S.tolist()


def nemo_exact_map(indices, likelihoods, teacher_vocab_size, *, xtoken_loss=False, threshold=0.6):
    """The published common / uncommon partition from the dense top-k projection, row by row.
    Returns `(common_student, common_teacher, uncommon_student, uncommon_teacher)` (lists; common
    pairs sorted by student id)."""
    idx = torch.as_tensor(indices).long()
    w = torch.as_tensor(likelihoods).float()  # published: likelihoods.float()
    V_s = idx.shape[0]
    best = {}  # teacher id -> (weight, student id)
    for s in range(V_s):
        vals, order = torch.sort(w[s], descending=True)
        top = vals[0]
        if xtoken_loss:
            ok = bool(top >= torch.tensor(threshold, dtype=torch.float32))
        else:
            ok = bool(top == 1.0) and (idx.shape[1] < 2 or int(idx[s, 1]) == -1)
        if not ok:
            continue
        t = int(idx[s, order[0]])
        if not 0 <= t < teacher_vocab_size:
            continue
        p = float(top)
        if t not in best:
            best[t] = (p, s)
        elif xtoken_loss and (p > best[t][0] or (p == best[t][0] and s < best[t][1])):
            best[t] = (p, s)
        elif not xtoken_loss and s < best[t][1]:
            best[t] = (p, s)
    pairs = sorted((s, t) for t, (_p, s) in best.items())
    cs, ct = [s for s, _ in pairs], [t for _, t in pairs]
    us = [v for v in range(V_s) if v not in set(cs)]
    ut = [v for v in range(teacher_vocab_size) if v not in set(ct)]
    return cs, ct, us, ut


def nemo_gold(student_logits, teacher_logits, batch, common, *, student_vocab_size=None, teacher_vocab_size=None,
              teacher_index=0, temperature=1.0, uncommon_topk=8192, reverse_kl=False, normalizer=None,
              common_weight=1.0, uncommon_weight=1.0, exact_token_match_only=False):
    """The published gold-loss path (GOLD, and H-KL with the relaxed map) on the common pairs
    `common = (student ids, teacher ids)`; uncommon ids are the rest of `[0, student_vocab_size)` and
    `[0, teacher_vocab_size)` (None: the logits' widths; the teacher logits are cut to it). Returns
    `(loss, number of counted chunks)`. `common_weight` / `uncommon_weight` (1 when published) weigh
    the two terms; `exact_token_match_only` (not published for this path) filters correct chunks."""
    i = teacher_index
    zs = student_logits.to(torch.float64)
    zt = teacher_logits.to(torch.float64)
    T = float(temperature)
    v_t = teacher_vocab_size or zt.shape[-1]
    v_s = student_vocab_size or zs.shape[-1]
    if zt.shape[-1] > v_t:
        zt = zt[..., :v_t]
    common_s = torch.as_tensor(list(common[0]), dtype=torch.int64)
    common_t = torch.as_tensor(list(common[1]), dtype=torch.int64)
    uncommon_s = torch.tensor([v for v in range(v_s) if v not in set(common_s.tolist())], dtype=torch.int64)
    uncommon_t = torch.tensor([v for v in range(v_t) if v not in set(common_t.tolist())], dtype=torch.int64)
    student_log_probs = torch.log_softmax(zs / T, dim=-1)
    teacher_log_probs = torch.log_softmax(zt / T, dim=-1)
    cid_s, cid_t = _chunk_ids(batch, i)
    C = batch[f"alignment_{i}_pair_valid"].shape[1]
    student_chunks, s_sizes = chunk_average(student_log_probs, cid_s, C)
    teacher_chunks, t_sizes = chunk_average(teacher_log_probs, cid_t, C)
    valid = _valid(batch, i, s_sizes, t_sizes, exact_token_match_only)
    count = int(valid.sum())
    denom = normalizer if normalizer is not None else max(count, 1)

    kl_common = torch.zeros((), dtype=torch.float64)
    if common_s.numel():
        sc, tc = student_chunks[:, :, common_s], teacher_chunks[:, :, common_t]
        if reverse_kl:
            kl = F.kl_div(tc, sc, reduction="none", log_target=True)
        else:
            kl = F.kl_div(sc, tc, reduction="none", log_target=True)
        kl_common = kl.sum(dim=-1)[valid].sum() / denom

    l1_uncommon = torch.zeros((), dtype=torch.float64)
    su = student_chunks[:, :, uncommon_s][valid]  # [N_valid, |U_s|]
    tu = teacher_chunks[:, :, uncommon_t][valid]
    max_uncommon = min(su.shape[-1], tu.shape[-1], uncommon_topk)
    if su.shape[0] > 0 and max_uncommon > 0:
        s_sorted = su.exp().sort(dim=-1, descending=True).values[:, :max_uncommon]
        t_sorted = tu.exp().sort(dim=-1, descending=True).values[:, :max_uncommon]
        l1_uncommon = F.l1_loss(s_sorted, t_sorted, reduction="none").sum(dim=-1).sum() / denom
    loss = (common_weight * kl_common + uncommon_weight * l1_uncommon) * (T * T)
    return loss, count
