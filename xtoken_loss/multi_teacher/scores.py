"""Per-teacher quality scores on a batch, for dynamic teacher weights and teacher selection.

Each score is measured on the teacher's own tokens at temperature 1, at the teacher's *next-token
positions* (position p predicts token p+1; tokens p and p+1 real, sample kept; `units.next_token_mask`):
- `"ce"`: mean next-token cross-entropy in nats, `-log p(token p+1)`.
- `"entropy"`: mean entropy of the next-token distribution in nats.
- `"max_prob"`: mean probability of the most likely next token.
- `"bpb"`: bits per byte, `sum of -log p / ln 2 / sum of text bytes`, over the positions whose
  next token covers at least one text byte (`token_bytes`, or `teacher_{i}_token_bytes`). Tokens
  that are not text (BOS/EOS, template scaffolding, zero bytes) are left out of both sums, so teachers
  with different tokenizers are compared on the same text.

Every score is a ratio `sum / count` (count: positions, or bytes for `"bpb"`). Sums and counts are
kept per sequence (`[B]`), so per-sequence variants need no extra pass, and a batch score is
`sum over sequences / count over sequences`. Under data parallelism the *sums and counts* are
all-reduced, never the means (`reduce_sums`), so every rank gets the value the concatenated global
batch would give.

Top-k teacher outputs (CONTRACTS §3): `"ce"` and `"bpb"` read `target_logprob`; `"max_prob"` is
exact (the top-1 token is listed); `"entropy"` is the entropy of the coarsened distribution (the k
listed tokens plus one outcome for the rest: `exp(rest_logprob)` when given, else `1 - sum exp(lp)`),
a lower bound of the true entropy.

Also here: `projection_accuracy_counts`, how often the projected student's most likely teacher token
is the teacher's (a per-teacher metric, reduced the same way: hits and counts).
"""

from __future__ import annotations

import math

import torch

from xtoken_core.errors import LossInputError
from xtoken_loss.batch_tokenizers import check_batch_tokenizers
from xtoken_loss.chunked import check_choice, compute_dtype, rows_per_chunk, softmax_rows
from xtoken_loss.projection import Projection, restrict_projection
from xtoken_loss.teacher_outputs import as_teacher_outputs
from xtoken_loss.units import chunk_units, get_key, next_token_mask

SCORES = ("ce", "entropy", "max_prob", "bpb")
LOWER_IS_BETTER = ("ce", "entropy", "bpb")
TEACHER_FORMS = ("logits", "topk")  # scores and projection accuracy


def teacher_inputs(batch: dict, teacher_index: int | None, batch_size: int, length: int):
    """`(prefix, target ids [B, T], token_bytes key)` of a teacher: the student's keys for a same-vocab
    teacher (`teacher_index=None`), the `teacher_{i}_` keys for a cross-tokenizer one."""
    if teacher_index is None:
        prefix = ""
    else:
        prefix = f"teacher_{teacher_index}_"
    ids = get_key(batch, f"{prefix}input_ids", (batch_size, length))
    return prefix, ids, f"{prefix}token_bytes"


def teacher_score_sums(
    teacher_outputs,
    batch: dict,
    *,
    score: str,
    teacher_index: int | None = None,
    position_chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence `(sums [B], counts [B])` float64 of `score` for one teacher (module doc).

    `teacher_index=None`: a same-vocab teacher (student keys); else cross-tokenizer teacher i.
    No gradient flows (scores only steer weights and selection).
    """
    check_choice("score", score, SCORES)
    teacher = as_teacher_outputs(teacher_outputs, loss=f"score {score!r}", accepts=TEACHER_FORMS)
    logits, lp, idx, target_lp = teacher.logits, teacher.topk_logprobs, teacher.topk_indices, teacher.target_logprob
    B, L = teacher.batch_size, teacher.length
    dev = teacher.device
    prefix, ids, bytes_key = teacher_inputs(batch, teacher_index, B, L)
    ids = ids.to(dev)
    valid = next_token_mask(batch, B, L, prefix, dev)  # [B, T]
    target = torch.zeros_like(ids)
    target[:, :-1] = ids[:, 1:]
    target = torch.where(valid, target, torch.zeros_like(target))  # padding ids may exceed the logits width
    weight = valid.to(torch.float64)  # what each position adds to the count
    if score == "bpb":
        tb = get_key(batch, bytes_key, (B, L), required=False)
        if tb is None:
            raise LossInputError(
                f"score 'bpb' needs batch[{bytes_key!r}] (text bytes of each token, CONTRACTS §2); "
                "the xtoken collator emits it"
            )
        nb = torch.zeros(B, L, dtype=torch.float64, device=dev)
        nb[:, :-1] = tb[:, 1:].to(device=dev, dtype=torch.float64)
        weight = torch.where(valid & (nb > 0), nb, torch.zeros_like(nb))
        valid = weight > 0
    with torch.no_grad():
        if logits is not None:
            values = _from_logits(logits, target, valid, score, position_chunk_size)
        else:
            values = _from_topk(lp, idx, target_lp, target, valid, score, prefix, teacher.rest_logprob)
    if score == "bpb":
        values = values / math.log(2.0)
    values = torch.where(valid, values, torch.zeros_like(values))
    if score != "bpb":
        values = values * weight
    return values.sum(dim=1), weight.sum(dim=1)


def _from_logits(logits, target, valid, score, position_chunk_size):
    """Per-position values `[B, T]` float64 (garbage at invalid positions; the caller masks them).
    Rows are read in contiguous chunks (views, no copies); CE needs only a log-sum-exp per row."""
    B, L, V = logits.shape
    z_all = logits.reshape(B * L, V)
    t_all = target.reshape(B * L, 1)
    out = torch.empty(B * L, dtype=torch.float64, device=logits.device)
    cdt = compute_dtype(logits.dtype)
    n = rows_per_chunk(position_chunk_size, V)
    for r0 in range(0, B * L, n):
        z = z_all[r0:r0 + n]
        if score == "entropy":
            p, lse = softmax_rows(z, 1.0)
            val = lse - torch.where(p > 0, p * z.to(cdt), torch.zeros_like(p)).sum(dim=1)
        else:
            lse = torch.logsumexp(z.to(cdt), dim=1)
            if score == "max_prob":
                val = torch.exp(z.amax(dim=1).to(cdt) - lse)
            else:  # ce, bpb
                val = lse - z.gather(1, t_all[r0:r0 + n]).squeeze(1).to(cdt)
        out[r0:r0 + n] = val.to(torch.float64)
    return out.view(B, L)


def _from_topk(lp, idx, target_lp, target, valid, score, prefix, rest_lp=None):
    lp = lp.to(torch.float64)
    ok = (idx >= 0) & (lp > float("-inf"))
    lp_ok = torch.where(ok, lp, torch.full_like(lp, float("-inf")))
    if score in ("ce", "bpb"):
        if target_lp is None:
            raise LossInputError(
                f"score {score!r} from top-k teacher outputs needs 'target_logprob' [B, T] (the log-probability of "
                f"the token that follows, {prefix or 'student '}input_ids[p + 1]); add it to the teacher outputs or "
                "use score 'max_prob'/'entropy'"
            )
        return -target_lp.to(torch.float64)
    if score == "max_prob":
        return torch.exp(lp_ok.max(dim=2).values)
    p = torch.exp(lp_ok)
    ent = -torch.where(ok, p * lp, torch.zeros_like(p)).sum(dim=2)
    if rest_lp is not None:  # the stored rest, exact before rounding
        rest = torch.exp(rest_lp.to(torch.float64))
    else:
        rest = (1.0 - p.sum(dim=2)).clamp_min(0.0)
    return ent - torch.where(rest > 0, rest * torch.log(rest), torch.zeros_like(rest))


def reduce_sums(tensor: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum-all-reduce `tensor` (stacked sums and counts) over `process_group`, in place; no-op without
    a group. Reducing sums and counts, not means, makes every rank's ratio the global batch's."""
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    return tensor


def score_values(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`sums / counts`, NaN where the count is 0 (no position to score)."""
    return torch.where(counts > 0, sums / counts.clamp_min(1e-300), torch.full_like(sums, float("nan")))


def goodness(score: str, values: torch.Tensor) -> torch.Tensor:
    """Higher-is-better form of score values: `-value` for ce/entropy/bpb, `value` for max_prob;
    `-inf` where a value is undefined (NaN), so such a teacher gets no weight and is never selected
    while another teacher has a defined score."""
    g = -values if score in LOWER_IS_BETTER else values
    return torch.where(torch.isnan(g), torch.full_like(g, float("-inf")), g)


# -------------------------------------------------------------------------------------------------
# projection accuracy


def projection_accuracy_counts(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    projection: Projection,
    *,
    teacher_index: int,
    correct_only: bool = True,
    position_chunk_size: int | None = None,
    top_m: int = 16,
    cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(hits, units)` float64: over the valid chunks of teacher `teacher_index`, taken at the chunk
    starts (where both models have read the same text), how many have
    `argmax_j (softmax(z_s) W)_j == argmax_j z_t`.

    The projected student argmax is over every teacher column W reaches, ties to the lower teacher id;
    top-k teacher outputs use the listed token with the highest log-probability. Exact, no gradient.
    `cache` (a dict the caller keeps) holds the sparse W^T between calls.
    """
    dev = student_logits.device
    B, Ls, Vs = student_logits.shape
    check_batch_tokenizers(projection, batch, teacher_index, loss="projection_accuracy")
    teacher = as_teacher_outputs(teacher_outputs, loss="projection_accuracy", accepts=TEACHER_FORMS)
    zt, lp, idx = teacher.logits, teacher.topk_logprobs, teacher.topk_indices
    Lt = teacher.length
    units = chunk_units(batch, teacher_index, B, Ls, Lt, mode="start", correct_only=correct_only, device=dev)
    srows, trows = units.student_rows, units.teacher_rows
    U = srows.shape[0]
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    if U == 0:
        return zero, zero.clone()
    width = projection.max_index + 1
    if zt is not None:
        width = max(width, zt.shape[2])
    cdt = compute_dtype(student_logits.dtype)
    tables = _argmax_tables(projection, Vs, width, cdt, cache)
    step = rows_per_chunk(position_chunk_size, max(Vs, width))
    hits = zero.clone()
    with torch.no_grad():
        zs = student_logits.reshape(B * Ls, Vs)
        for r0 in range(0, U, step):
            r = trows[r0:r0 + step]
            if zt is not None:
                t_arg = zt.reshape(B * Lt, -1)[r].argmax(dim=1)
            else:
                lp_r, idx_r = lp.reshape(B * Lt, -1)[r], idx.reshape(B * Lt, -1)[r]
                lp_r = torch.where(idx_r >= 0, lp_r, torch.full_like(lp_r, float("-inf")))  # empty slots: never
                t_arg = idx_r.gather(1, lp_r.argmax(dim=1, keepdim=True)).squeeze(1)
            s_arg = projected_argmax(zs[srows[r0:r0 + step]], projection, tables, top_m=top_m)
            hits += (s_arg == t_arg.to(torch.int64)).sum().to(torch.float64)
    return hits, torch.tensor(float(U), dtype=torch.float64, device=dev)


def _argmax_tables(projection: Projection, student_width: int, width: int, dtype, cache: dict | None):
    """`(columns [k], W^T restricted to them as a sparse CSR [k, V_s])`, cached per shape and dtype."""
    key = (projection.device, student_width, width, dtype)
    if cache is not None and key in cache:
        return cache[key]
    import warnings

    columns = projection.reachable_columns(width).nonzero().squeeze(1)
    restr = restrict_projection(projection, columns, student_width, width, dtype)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we use only spmm, which is stable
        warnings.simplefilter("ignore", UserWarning)
        wt = torch.sparse_coo_tensor(
            torch.stack([restr.entry_slots, restr.entry_rows]), restr.entry_weights,
            (restr.num_columns, student_width),
        ).coalesce().to_sparse_csr()
    tables = (columns, wt)
    if cache is not None:
        cache[key] = tables
    return tables


def projected_argmax(z: torch.Tensor, projection: Projection, tables, *, top_m: int = 16) -> torch.Tensor:
    """`[n]` the teacher id maximising `(softmax(z) W)_j` for each row of student logits `z [n, V_s]`
    (ties: the lower id; a row W maps nowhere: the lowest reachable id). `tables`: `_argmax_tables`.

    First from the `top_m` most likely student tokens alone: each column's true value lies between its
    partial value and that plus the probability left out, so a row whose best partial column leads
    every other by more than the left-out probability is decided without touching the rest of W (most
    rows of a trained, peaked student). Other rows are projected in full (one sparse mat-mul).
    """
    columns, wt = tables
    cdt = wt.dtype
    zc = z.to(cdt)
    n, V = zc.shape
    m = max(1, min(top_m, V))
    lse = torch.logsumexp(zc, dim=1)  # [n]
    top_z, ids = zc.topk(m, dim=1)  # [n, m]
    vals = torch.exp(top_z - lse[:, None])
    in_rows = ids < projection.num_rows
    safe = torch.where(in_rows, ids, torch.zeros_like(ids))
    idx = projection.indices[safe]  # [n, m, K]
    w = projection.weights[safe].to(cdt) * (in_rows[..., None] & (idx >= 0))
    cols = idx.clamp(min=0).reshape(n, -1)  # [n, m * K]
    contrib = (vals[..., None] * w).reshape(n, -1)
    # sum the contributions per teacher column within each row (columns sorted, segments summed)
    sc, order = cols.sort(dim=1)
    sv = contrib.gather(1, order)
    new = torch.ones_like(sc, dtype=torch.bool)
    new[:, 1:] = sc[:, 1:] != sc[:, :-1]
    seg = new.cumsum(dim=1) - 1
    sums = torch.zeros_like(sv).scatter_add_(1, seg, sv)  # [n, segments], ascending column order
    seg_col = torch.zeros_like(sc).scatter_(1, seg, sc)
    real = torch.zeros_like(sc, dtype=torch.bool).scatter_(1, seg, torch.ones_like(sc, dtype=torch.bool))
    sums = torch.where(real, sums, torch.full_like(sums, -1.0))
    best = sums.argmax(dim=1)  # first maximum: the lowest column
    top1 = sums.gather(1, best[:, None]).squeeze(1)
    second = sums.scatter(1, best[:, None], -1.0).max(dim=1).values.clamp_min(0.0)
    left_out = (1.0 - vals.sum(dim=1)).clamp_min(0.0)
    margin = 1e-9 if cdt == torch.float64 else 1e-5  # rounding of the partial sums
    decided = (top1 > second + left_out + margin) & (top1 > 0)
    out = seg_col.gather(1, best[:, None]).squeeze(1)
    rest = (~decided).nonzero().squeeze(1)
    if rest.numel():
        p = torch.softmax(zc[rest], dim=1)
        q = torch.sparse.mm(wt, p.T.contiguous())  # [k, r]
        out[rest] = columns[q.argmax(dim=0)]
    return out
