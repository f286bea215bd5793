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

import torch

from xtoken_loss.chunked import (
    attach_grad,
    check_choice,
    check_temperature,
    coarse_divergence,
    compute_dtype,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    softmax_rows,
)
from xtoken_loss.errors import LossInputError, LossOptionError
from xtoken_loss.projection import (
    as_projection,
    project_probs,
    reduce_column_scores,
    restrict_projection,
    top_columns,
)
from xtoken_loss.units import check_chunk_ids, check_finite, chunk_units

DIRECTIONS = ("forward", "reverse")
DEFAULT_TOP_K_COLUMNS = 8192


def _teacher_logits(teacher_outputs) -> torch.Tensor:
    if isinstance(teacher_outputs, torch.Tensor):
        return teacher_outputs
    if isinstance(teacher_outputs, dict) and teacher_outputs.get("logits") is not None:
        return teacher_outputs["logits"]
    raise LossInputError(
        "pkl: teacher_outputs must be the teacher's full logits [B, T_t, V_t] (a tensor or {'logits': ...}); "
        "per-position top-k teacher outputs are supported by the same-vocab loss 'kl'"
    )


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
    check_choice("direction", direction, DIRECTIONS)
    T = check_temperature(temperature)
    if public and direction != "forward":
        raise LossOptionError("pkl: public=True reproduces the published forward P-KL only; use direction='forward'")
    if top_k_columns is not None and (not isinstance(top_k_columns, int) or top_k_columns < 1):
        raise LossOptionError(f"top_k_columns must be a positive integer or None, got {top_k_columns!r}")
    zt = _teacher_logits(teacher_outputs)
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
        check_finite("student_logits", student_logits)
        check_finite("teacher logits", zt)
        check_chunk_ids(batch, teacher_index)
    units = chunk_units(
        batch, teacher_index, B, Ls, Lt, mode="mean" if public else "start", correct_only=correct_only, device=dev
    )
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
        else:
            total, grad, metrics = _principled(*args, top_k_columns, columns, process_group, direction)
    count = units.num_units.to(cdt).clamp_min(1)
    metrics = {k: (v / count).detach() for k, v in metrics.items()}
    loss = total * (T * T) / norm
    return attach_grad(student_logits, loss, grad.view(B, Ls, Vs) if grad is not None else None), metrics


def _principled(zs_flat, zt_flat, units, proj, norm, T, n, want_grad, cdt, top_k, columns, group, direction):
    dev = zs_flat.device
    Vs, Vt = zs_flat.shape[1], zt_flat.shape[1]
    srows, trows = units.student_rows, units.teacher_rows
    U = srows.shape[0]
    reach = proj.reachable_columns(Vt)  # [V_t]
    reach_f = reach.to(cdt)

    # Pass 1 over the teacher's unit rows: normaliser, reachable mass, column scores.
    lse_t = torch.empty(U, dtype=cdt, device=dev)
    mass_r = torch.empty(U, dtype=cdt, device=dev)
    scores = torch.zeros(Vt, dtype=cdt, device=dev)  # max teacher probability per column
    for u0 in range(0, U, n):
        u1 = min(u0 + n, U)
        z = zt_flat.index_select(0, trows[u0:u1])
        pt, lse = softmax_rows(z, T, out=z if z.dtype == cdt else None)
        lse_t[u0:u1] = lse
        mass_r[u0:u1] = pt @ reach_f
        if columns is None:
            torch.maximum(scores, pt.amax(dim=0), out=scores)
        del z, pt
    if columns is not None:
        cols = torch.as_tensor(columns, dtype=torch.int64, device=dev)
        cols = torch.unique(cols[(cols >= 0) & (cols < Vt)])
        cols = cols[reach[cols]]
    else:
        log_scores = torch.where(reach & (scores > 0), torch.log(scores), torch.full_like(scores, float("-inf")))
        log_scores = reduce_column_scores(log_scores, group)
        cols = top_columns(log_scores, top_k)
    restr = restrict_projection(proj, cols, Vs, Vt, cdt)
    rest_empty = cols.shape[0] == int(reach.sum())
    log_mass_r = torch.log(mass_r)

    grad = torch.zeros_like(zs_flat) if want_grad else None
    total = torch.zeros((), dtype=cdt, device=dev)
    m_kl = torch.zeros((), dtype=cdt, device=dev)
    m_in = torch.zeros((), dtype=cdt, device=dev)
    m_mapped = torch.zeros((), dtype=cdt, device=dev)
    for u0 in range(0, U, n):
        u1 = min(u0 + n, U)
        z = zs_flat.index_select(0, srows[u0:u1])
        p, _ = softmax_rows(z, T, out=z if z.dtype == cdt else None)  # [n, V_s]
        a, rest, pe = project_probs(p, restr)  # [n, k], [n], [n, E]
        # Teacher log-probabilities on S and the rest, renormalised over the reachable columns.
        zt_s = zt_flat[trows[u0:u1, None], cols[None, :]].to(cdt)  # [n, k]
        log_p_s = zt_s / T - (lse_t[u0:u1] + log_mass_r[u0:u1])[:, None]
        p_s_sum = torch.exp(log_p_s).sum(dim=1)
        if rest_empty:  # S holds every reachable column: no rest outcome (exactly 0, not rounding noise)
            log_p_rest = torch.full_like(p_s_sum, float("-inf"))
        else:
            p_rest = 1.0 - p_s_sum  # below the rounding floor of that difference it is 0
            floor = cols.shape[0] * torch.finfo(cdt).eps
            log_p_rest = torch.log(torch.where(p_rest > floor, p_rest, torch.zeros_like(p_rest)))
        a_aug = torch.cat([a, rest[:, None]], dim=1)
        log_p = torch.cat([log_p_s, log_p_rest[:, None]], dim=1)
        kl, d_a = coarse_divergence(a_aug, log_p, direction)  # [n], [n, k + 1]
        total += kl.sum()
        m_kl += kl.sum()
        m_in += p_s_sum.sum()
        m_mapped += a_aug.sum()
        if want_grad:
            d_s, d_rest = d_a[:, :-1], d_a[:, -1]
            c = (a_aug * d_a).sum(dim=1)  # <p, g>
            h = torch.outer(d_rest, restr.rest_weights)  # [n, V_s]
            h.sub_(c[:, None]).mul_(p)
            h.index_add_(1, restr.entry_rows, pe * d_s[:, restr.entry_slots])
            h.mul_(T / norm)
            grad.index_copy_(0, srows[u0:u1], h.to(grad.dtype))
            del h
        del z, p, pe
    metrics = {
        "kl": m_kl,
        "teacher_mass_in_columns": m_in,
        "teacher_reachable_mass": torch.exp(log_mass_r).sum(),
        "student_mapped_mass": m_mapped,
    }
    return total, grad, metrics


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
    log_pt = lsum / units.teacher_count.to(cdt)[:, None]  # [U, k]

    # Student: projected probabilities summed over the chunk's positions (pass 1, no gradient).
    sr, su = units.student_rows, units.student_unit
    qsum = torch.zeros(U, k, dtype=cdt, device=dev)
    for r0 in range(0, sr.shape[0], n):
        z = zs_flat.index_select(0, sr[r0 : r0 + n])
        p, _ = softmax_rows(z, T, out=z if z.dtype == cdt else None)
        a, _, _ = project_probs(p, restr)
        qsum.index_add_(0, su[r0 : r0 + n], a)
        del z, p
    zsum = qsum.sum(dim=1, keepdim=True)
    q = qsum / torch.where(zsum > 0, zsum, torch.ones_like(zsum))
    unclamped = q > eps
    log_q = torch.log(torch.where(unclamped, q, torch.full_like(q, eps)))
    pt = torch.exp(log_pt)
    kl = (pt * (log_pt - log_q)).sum(dim=1)  # [U]
    total = kl.sum()
    metrics = {"kl": total.clone(), "teacher_mass_in_columns": pt.sum()}
    if not want_grad:
        return total, None, metrics

    # d loss / d qsum (T^2 / norm included), then pass 2: recompute p and push the gradient back.
    pu = torch.where(unclamped, pt, torch.zeros_like(pt))
    d_q = (T * T / norm) * (pu.sum(dim=1, keepdim=True) / torch.where(zsum > 0, zsum, torch.ones_like(zsum))
                            - torch.where(unclamped, pt / torch.where(unclamped, qsum, torch.ones_like(qsum)), torch.zeros_like(pt)))
    grad = torch.zeros_like(zs_flat)
    for r0 in range(0, sr.shape[0], n):
        rows = sr[r0 : r0 + n]
        z = zs_flat.index_select(0, rows)
        p, _ = softmax_rows(z, T, out=z if z.dtype == cdt else None)
        a, _, pe = project_probs(p, restr)
        d = d_q[su[r0 : r0 + n]]  # [n, k]
        c = (a * d).sum(dim=1)
        h = p.mul_(-c[:, None])
        h.index_add_(1, restr.entry_rows, pe * d[:, restr.entry_slots])
        h.div_(T)
        grad.index_copy_(0, rows, h.to(grad.dtype))
        del z, p, pe
    return total, grad, metrics
