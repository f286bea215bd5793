"""Same-vocabulary KL distillation (loss kind `"kl"`): per next-token position, teacher and student
share the tokenizer, so their distributions are compared directly.

Teacher outputs (CONTRACTS §3): full logits `[B, T, V_t]` (V_t <= the student's width; a narrower
teacher is padded with -inf), or a dict with per-position top-k `topk_logprobs [B, T, k]`
(log-probabilities over the full teacher vocabulary) and `topk_indices [B, T, k]` (distinct per
position; -1 marks an empty slot), optionally with `rest_logprob [B, T]` (the log of the teacher's mass
outside the listed tokens: used as the rest outcome when given, else `1 - sum exp(topk_logprobs)`).

With top-k teacher outputs the two distributions are compared on the k listed tokens plus, by
default, one *rest* outcome holding everything else (`tail="bucket"`): a true KL between two
coarsened distributions, >= 0, zero only when they agree on the listed tokens and the rest. The
alternative `tail="renormalize"` compares the two distributions conditioned on the listed tokens
(both renormalised over them); it is the only form that supports a temperature other than 1 with
top-k inputs, because the teacher's rest mass at another temperature is not recoverable.
"""

from __future__ import annotations

from typing import Literal

import torch

from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.checks import check_finite_rows, check_key, check_logits, check_normalizer, check_real_ids, poison
from xtoken_loss.chunked import (
    attach_grad,
    check_options,
    compute_dtype,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    softmax_rows,
)
from xtoken_loss.modules import LossModule
from xtoken_loss.teacher_outputs import as_teacher_outputs
from xtoken_loss.units import next_token_mask, next_token_targets

TEACHER_FORMS = ("logits", "topk")


@config
class KLOptions(Config):
    """Options of `kl_loss` / `KLLoss` (module doc)."""

    error_type = LossOptionError

    temperature: float = option(1.0, help="softmax temperature of both models", gt=0)
    direction: Literal["forward", "reverse"] = option("forward", help="'forward' KL(teacher || student) or "
                                                      "'reverse' KL(student || teacher)")
    tail: Literal["bucket", "renormalize"] = option("bucket", help="top-k teachers: one rest outcome ('bucket') or "
                                                    "both renormalised over the listed tokens ('renormalize')")
    position_chunk_size: int | None = option(None, help="rows per step (None: automatic from the width)", min=1)
    check_inputs: bool = option(False, help="check the inputs for NaN/inf and top-k indices (syncs)")
    ce_weight: float = option(0.0, help="also add ce_weight x the student's next-token CE, computed in the same pass "
                              "(full teacher logits, forward, temperature 1)", min=0)

    def check(self) -> None:
        if self.ce_weight and (self.direction != "forward" or self.temperature != 1.0):
            raise self.fail(f"ce_weight={self.ce_weight}: the CE is fused into the forward KL at temperature 1 only "
                            f"(direction={self.direction!r}, temperature={self.temperature}); compute ce_loss apart")


def kl_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    normalizer=None,
    temperature: float = 1.0,
    direction: str = "forward",
    tail: str = "bucket",
    position_chunk_size: int | None = None,
    check_inputs: bool = False,
    ce_weight: float = 0.0,
):
    """Same-vocab KD: `sum over valid positions of T^2 KL / normalizer`.

    `direction="forward"` is KL(teacher || student), `"reverse"` KL(student || teacher). Valid
    positions are next-token positions (see `units.next_token_mask`; `token_mask` is required).
    Returns `(loss, metrics)`; metrics: `kl` (mean KL per valid position, without the T^2 factor).
    A NaN / +inf in a row the loss reads gives a NaN loss (docs/losses.md, "Robustness").

    `ce_weight > 0` (full teacher logits, forward, T = 1) returns `(KL_sum + ce_weight * CE_sum) /
    normalizer` instead, CE being the student's next-token cross-entropy (`ce_loss`) over the same
    positions: one pass computes the student's softmax for both, so KD + CE costs about what KD
    alone does. Metrics then also hold `ce` (mean CE per valid position) and the two normalised
    terms `kl_term` (`KL_sum / normalizer`) and `ce_term` (`CE_sum / normalizer`, unweighted).
    """
    check_options(KLOptions, temperature=temperature, direction=direction, tail=tail,
                  position_chunk_size=position_chunk_size, check_inputs=check_inputs, ce_weight=ce_weight)
    T = float(temperature)
    check_logits("kl", "student_logits", student_logits)
    check_normalizer("kl", normalizer)
    B, L, V = student_logits.shape
    teacher = as_teacher_outputs(teacher_outputs, loss="kl", accepts=TEACHER_FORMS)
    form = teacher.form
    t_main, t_idx = (teacher.logits, None) if form == "logits" else (teacher.topk_logprobs, teacher.topk_indices)
    if t_main.shape[:2] != (B, L):
        raise LossInputError(
            f"kl: teacher outputs have shape {tuple(t_main.shape)}, expected [B={B}, T={L}, ...] like the student "
            "logits"
        )
    if form == "logits" and t_main.shape[2] > V:
        raise LossInputError(
            f"kl: teacher logits are {t_main.shape[2]} wide, the student's {V}; a same-vocab teacher must not be wider "
            "(slice its logits to the shared vocabulary)"
        )
    if form == "topk" and tail == "bucket" and T != 1.0:
        raise LossOptionError(
            "temperature != 1 with top-k teacher log-probs needs tail='renormalize': the teacher's mass outside "
            "its top-k at another temperature is unknown"
        )
    if ce_weight and form != "logits":
        raise LossOptionError("kl: ce_weight needs full teacher logits (a top-k teacher: compute ce_loss apart)")
    check_key("kl", batch, "token_mask", (B, L), " (which positions are real)")
    bad = check_real_ids("kl", batch, "input_ids", "token_mask", V, "the student logits", required=bool(ce_weight))

    dev = student_logits.device
    cdt = compute_dtype(student_logits.dtype)
    valid = next_token_mask(batch, B, L, "", dev).flatten()  # [N]
    if form == "topk":
        bad = _or(bad, _check_topk_indices(t_idx, valid.view(B, L), V))
    if check_inputs:
        rows = valid.nonzero().squeeze(1)
        check_finite_rows("kl", "student_logits", student_logits, rows)
        if form == "logits":
            check_finite_rows("kl", "teacher logits", t_main, rows)
        else:  # a row of only empty slots (-inf everywhere) is allowed
            listed = (t_main.reshape(B * L, -1)[rows] != float("-inf")).any(dim=1)
            check_finite_rows("kl", "topk_logprobs", t_main, rows[listed])
            if teacher.rest_logprob is not None:  # -inf is a legitimate rest (the listed ids hold all the mass)
                r = teacher.rest_logprob.reshape(-1)[rows]
                hit = (torch.isnan(r) | (r == float("inf"))).nonzero()
                if hit.numel():
                    at = int(rows[hit[0, 0]])
                    raise LossInputError(f"kl: rest_logprob holds NaN or +inf at sample {at // L}, position {at % L} "
                                         "(a position the loss reads)")
    num_units = valid.sum()
    norm = resolve_normalizer(normalizer, num_units, cdt)
    zs = student_logits.reshape(B * L, V)
    zt = t_main.reshape(B * L, t_main.shape[2])
    idx = t_idx.reshape(B * L, -1) if t_idx is not None else None
    rest = teacher.rest_logprob.reshape(B * L) if form == "topk" and teacher.rest_logprob is not None else None
    want_grad = needs_grad(student_logits)
    # full logits write every row of the gradient (padding rows with 0); top-k rows add into zeros
    alloc = torch.empty_like if form == "logits" else torch.zeros_like
    grad = alloc(student_logits).view(B * L, V) if want_grad else None
    direct = want_grad and grad.dtype == cdt  # write p straight into the gradient buffer
    n = rows_per_chunk(position_chunk_size, V)
    scale = T / norm
    ce_total = None
    if form == "logits":
        target = next_token_targets(batch, valid.view(B, L), V) if ce_weight else None
        total, ce_total, bad = _full_logits(zs, zt, valid, grad, direct, T, direction, scale, n, bad,
                                            target, float(ce_weight))
    else:
        total = torch.zeros((), dtype=cdt, device=dev)
        buf = None if direct else torch.empty(min(n, B * L), V, dtype=cdt, device=dev)
        with torch.no_grad():
            for r0 in range(0, B * L, n):
                r1 = min(r0 + n, B * L)
                w = valid[r0:r1]
                out = grad[r0:r1] if direct else buf[: r1 - r0]
                loss_row, coef, row_bad = _topk_rows(zs[r0:r1], zt[r0:r1], idx[r0:r1], T, direction, tail, out,
                                                     None if rest is None else rest[r0:r1])
                bad = _or(bad, (w & row_bad).any())
                total += torch.where(w, loss_row, torch.zeros_like(loss_row)).sum()
                if want_grad:
                    coef(out, scale)  # out becomes the gradient rows
                    out.masked_fill_(~w[:, None], 0.0)  # padding: exactly 0, whatever its logits hold
                    if not direct:
                        grad[r0:r1] = out
    total = poison(total, bad)
    loss = total * (T * T) / norm
    count = num_units.to(cdt).clamp_min(1)
    metrics = {"kl": (total / count).detach()}
    if ce_total is not None:
        ce_total = poison(ce_total, bad)
        metrics.update(ce=(ce_total / count).detach(), kl_term=loss.detach(), ce_term=(ce_total / norm).detach())
        loss = loss + ce_weight * ce_total / norm
    return attach_grad(student_logits, loss, grad.view(B, L, V) if want_grad else None), metrics


def can_fuse_ce(teacher_outputs, options: dict) -> bool:
    """Whether `kl_loss(..., teacher_outputs, **options, ce_weight=c)` computes the CE in its own pass:
    full teacher logits, forward direction, temperature 1, and no `ce_weight` in `options` already
    (used by `kd_ce_loss` and `MultiTeacherLoss` to decide where the CE goes)."""
    if options.get("direction", "forward") != "forward" or float(options.get("temperature", 1.0)) != 1.0:
        return False
    if options.get("ce_weight"):
        return False
    return as_teacher_outputs(teacher_outputs, loss="kl", accepts=TEACHER_FORMS).form == "logits"


def _or(a, b):
    return b if a is None else a if b is None else a | b


def _check_topk_indices(idx: torch.Tensor, valid: torch.Tensor, V: int):
    """Top-k indices at valid positions must lie in [-1, V) (no sync: on an accelerator a flag)."""
    live = torch.where(valid[..., None], idx, torch.full_like(idx, -1))
    if idx.device.type != "cpu":
        return ((live < -1) | (live >= V)).any()
    if live.numel() and (int(live.min()) < -1 or int(live.max()) >= V):
        raise LossInputError(
            f"kl: topk_indices hold ids in [{int(live.min())}, {int(live.max())}] at valid positions; they must lie in "
            f"[-1, {V - 1}] (-1: empty slot; the student logits are {V} wide)"
        )
    return None


def _full_logits(zs, zt, valid, grad, direct, T, direction, scale, n, bad, target=None, ce_weight=0.0):
    """Full teacher logits: the summed loss over the valid rows of `zs [N, V]` / `zt [N, V_t]`, the
    gradient rows written into `grad [N, V]` (None: no gradient), and the bad-input flag. With
    `target [N]` (next-token ids; forward, T = 1) also the summed CE over the valid rows, its
    gradient `ce_weight * scale * (q - onehot)` added into the same rows: returns `(total, ce_total
    or None, bad)`.

    Each chunk runs a few in-place passes over reusable buffers (`_fast_rows`): log-softmax of both
    sides, then the KL as a row dot product. A row whose fast loss is NaN (a NaN / +inf / all -inf
    input; in the reverse direction also 0 * inf, a student probability 0 against a teacher -inf
    logit) is computed again, with its gradient, by the guarded form `_full_rows` (0 for such
    entries, NaN for bad inputs), after the loop: one device sync, and more work only when some
    valid row needs it."""
    N, V = zs.shape
    cdt = compute_dtype(zs.dtype)
    dev = zs.device
    if zt.shape[1] < V and direction == "reverse":  # the student's mass on padded columns: +inf KL
        zt = torch.nn.functional.pad(zt, (0, V - zt.shape[1]), value=float("-inf"))
    Vt = zt.shape[1]
    m = min(n, N)
    bufs = _Buffers(m, V, Vt, cdt, dev)
    g_buf = None if direct or grad is None else torch.empty(m, V, dtype=cdt, device=dev)
    rows_loss = torch.zeros(N, dtype=cdt, device=dev)
    rows_ce = torch.zeros(N, dtype=cdt, device=dev) if target is not None else None
    on_cpu = dev.type == "cpu"
    with torch.no_grad():
        for r0 in range(0, N, n):
            r1 = min(r0 + n, N)
            w = valid[r0:r1]
            if on_cpu and not bool(w.any()):  # all padding: nothing to compute (no sync on the CPU)
                if grad is not None:
                    grad[r0:r1] = 0.0
                continue
            g = grad[r0:r1] if direct else (g_buf[: r1 - r0] if grad is not None else bufs.g(r1 - r0))
            t = None if target is None else target[r0:r1]
            rows_loss[r0:r1], ce_rows = _fast_rows(zs[r0:r1], zt[r0:r1], g, bufs, T, direction, scale,
                                                   grad is not None, t, ce_weight)
            if ce_rows is not None:
                rows_ce[r0:r1] = ce_rows
            if grad is not None:
                if on_cpu:
                    if not bool(w.all()):
                        g[~w] = 0.0  # padding: exactly 0, whatever its logits hold
                else:
                    g.masked_fill_(~w[:, None], 0.0)
                if not direct:
                    grad[r0:r1] = g
        fix = valid & torch.isnan(rows_loss)
        if rows_ce is not None:
            fix |= valid & torch.isnan(rows_ce)
        if bool(fix.any()):
            rows = fix.nonzero().squeeze(1)
            for k0 in range(0, rows.numel(), n):
                r = rows[k0:k0 + n]
                z, t = zs[r], zt[r]
                p, lse_s = softmax_rows(z, T)
                loss_row, coef, row_bad = _full_rows(z, t, p, lse_s, T, direction, V)
                rows_loss[r] = loss_row
                bad = _or(bad, row_bad.any())
                q_ce = None
                if rows_ce is not None:  # CE = lse - z[target]; gradient ce_weight * scale * (q - onehot)
                    tr = target[r]
                    rows_ce[r] = lse_s - z.gather(1, tr[:, None]).squeeze(1).to(lse_s.dtype)
                    if grad is not None:
                        q_ce = p.clone().mul_(ce_weight * scale)
                        q_ce.scatter_add_(1, tr[:, None], (torch.zeros_like(lse_s) - ce_weight * scale)[:, None])
                if grad is not None:
                    coef(p, scale)
                    if q_ce is not None:
                        p.add_(q_ce)
                    grad[r] = p.to(grad.dtype)
    total = torch.where(valid, rows_loss, torch.zeros_like(rows_loss)).sum()
    ce_total = None if rows_ce is None else torch.where(valid, rows_ce, torch.zeros_like(rows_ce)).sum()
    return total, ce_total, bad


class _Buffers:
    """Per-call `[n, V]` work buffers of `_fast_rows`, allocated once and reused by every chunk
    (fresh large allocations per chunk cost page faults on the CPU)."""

    def __init__(self, n, V, Vt, cdt, dev):
        self.shape, self.cdt, self.dev = (n, V), cdt, dev
        self.a = torch.empty(n, Vt, dtype=cdt, device=dev)  # teacher log-probabilities, then differences
        self.p = torch.empty(n, Vt, dtype=cdt, device=dev)  # teacher probabilities / products
        self._x = self._g = None

    def x(self, rows):  # scaled or converted inputs (temperature != 1, low-precision logits)
        if self._x is None:
            self._x = torch.empty(self.shape, dtype=self.cdt, device=self.dev)
        return self._x[:rows]

    def g(self, rows):  # the student rows when no gradient is wanted
        if self._g is None:
            self._g = torch.empty(self.shape, dtype=self.cdt, device=self.dev)
        return self._g[:rows]


def _log_softmax_into(z, T, out, bufs):
    """`out = log_softmax(z / T)` row-wise in `out`'s dtype (a NaN row for NaN, +inf or all -inf input)."""
    if T != 1.0 or z.dtype != out.dtype:
        x = bufs.x(z.shape[0])[:, : z.shape[1]]
        torch.div(z, T, out=x) if T != 1.0 else x.copy_(z)
        z = x
    return torch.log_softmax(z, 1, out=out)


def _fast_rows(z, zt, g, bufs, T, direction, scale, want_grad, target=None, ce_weight=0.0):
    """One chunk of full-logits KL rows: returns the loss rows `[n]` (KL, without T^2) and the CE
    rows `[n]` (None without `target`) and, with `want_grad`, writes the gradient rows
    `scale * d KL / d (z / T)` (plus `ce_weight * scale * d CE / d z` with `target`) into `g [n, V]`.
    NaN rows are redone by `_full_rows` (see `_full_logits`).

    The fused log-softmax sums its exponentials in one running sum per row, off by up to ~1e-5
    relative at a 128k width; the row sums of the exponentiated results (`s_q`, `s_p`, summed
    pairwise) are that error, and the formulas below divide it out: with `log q' = log q + log s_q`,
    `KL = sum p' (log p' - log q') / s_p - log s_p + log s_q`."""
    rows, Vt = zt.shape
    a, pbuf = bufs.a[:rows], bufs.p[:rows]
    _log_softmax_into(z, T, g, bufs)  # g = log q' (student)
    _log_softmax_into(zt, T, a, bufs)  # a = log p' (teacher)
    gs = g[:, :Vt]  # a narrower teacher's missing columns have p = 0: no loss, gradient q
    if direction == "forward":
        # an entry p * (log p - log q) is NaN only as 0 * inf or 0 * NaN (p = 0 against a -inf
        # log-probability on either side), whose true contribution is 0, so the row sum skips NaN;
        # a NaN / +inf / all -inf input row is all NaN after the log-softmax, caught by its first entry
        broken = torch.isnan(a[:, 0] + gs[:, 0])
        torch.exp(a, out=pbuf)  # p'
        s_p = pbuf.sum(dim=1)
        a.sub_(gs)  # log p' - log q'
        dot = a.mul_(pbuf).nansum(dim=1)
        lq_t = None if target is None else g.gather(1, target[:, None]).squeeze(1)  # log q'[target]
        g.exp_()  # q'
        s_q = g.sum(dim=1)
        log_s_q = torch.log(s_q)
        loss_row = dot / s_p - torch.log(s_p) + log_s_q
        loss_row = torch.where(broken, torch.full_like(loss_row, float("nan")), loss_row)
        ce_row = None if target is None else log_s_q - lq_t  # -log q[target] (NaN on a broken row)
        if want_grad:  # scale (q - p) = q' scale / s_q - p' scale / s_p; CE adds ce_weight scale (q - onehot)
            g.mul_((scale * (1.0 + ce_weight) / s_q)[:, None])
            gs.addcmul_(pbuf, (scale / s_p)[:, None], value=-1.0)
            if target is not None:
                g.scatter_add_(1, target[:, None], (torch.zeros_like(s_q) - ce_weight * scale)[:, None])
        return loss_row, ce_row
    # reverse: KL(q || p) = sum q (log q - log p) = sum q' (log q' - log p') / s_q - log s_q + log s_p;
    # gradient q (log q - log p - KL) = q' / s_q (log q' - log p' - k), k = KL + log s_q - log s_p
    s_p = torch.exp(a, out=pbuf).sum(dim=1)
    torch.sub(gs, a, out=a)  # log q' - log p'
    g.exp_()  # q'
    s_q = g.sum(dim=1)
    k = torch.mul(g, a, out=pbuf).sum(dim=1) / s_q
    loss_row = k - torch.log(s_q) + torch.log(s_p)
    if want_grad:
        a.sub_(k[:, None])
        g.mul_(a).mul_((scale / s_q)[:, None])
    return loss_row, None


def _full_rows(z, zt, p, lse_s, T, direction, V):
    """Loss rows, the in-place gradient step and the rows' non-finite flags for full teacher logits,
    guarded entry by entry (a probability 0 contributes exactly 0): the form `_full_logits` falls
    back to for the rows its fast form leaves NaN."""
    if zt.shape[1] < V:
        zt = torch.nn.functional.pad(zt, (0, V - zt.shape[1]), value=float("-inf"))
    pt, lse_t = softmax_rows(zt, T)
    row_bad = ~(torch.isfinite(lse_s) & torch.isfinite(lse_t))  # NaN / +inf / all -inf in a row
    if direction == "forward":
        diff = torch.where(pt > 0, zt.to(p.dtype) - z.to(p.dtype), torch.zeros_like(pt))
        loss_row = (pt * diff).sum(dim=1) / T - lse_t + lse_s

        def coef(p, scale):
            p.sub_(pt).mul_(scale)

        return loss_row, coef, row_bad
    ell = torch.where(p > 0, (z.to(p.dtype) - zt.to(p.dtype)) / T + (lse_t - lse_s)[:, None], torch.zeros_like(p))
    loss_row = (p * ell).sum(dim=1)

    def coef(p, scale):
        ell.sub_(loss_row[:, None])
        p.mul_(ell).mul_(scale)

    return loss_row, coef, row_bad


def _topk_rows(z, lp, idx, T, direction, tail, out, rest=None):
    """Top-k teacher rows, in log space: the student's log-masses on the listed tokens are
    `z_j / T - lse` and, for the bucket, its rest is the log-sum-exp of the unlisted logits (its own
    maximum as the shift), so neither underflows on confident logits. The teacher's rest is `rest`
    (`rest_logprob [n]`, the teacher then renormalised over listed + rest), else `1 - sum exp(lp)`.
    Fills `out [n, V]` with what `coef` turns into the gradient rows. Returns `(loss [n], coef,
    row_bad [n])`."""
    cdt = out.dtype
    n, V = z.shape
    neg_inf = float("-inf")
    idx = idx.to(torch.int64)
    lp = lp.to(cdt)
    listed = idx >= 0
    row_bad = (listed & (torch.isnan(lp) | (lp == float("inf")))).any(dim=1)
    ok = listed & (lp > neg_inf)
    safe = idx.clamp(0, V - 1)
    zl = torch.where(ok, z.gather(1, safe).to(cdt) / T, torch.full_like(lp, neg_inf))  # [n, k]
    any_ok = ok.any(dim=1)
    if tail == "renormalize":
        row_bad |= ~torch.isfinite(z.amax(dim=1))  # the row is the model's output: NaN anywhere is a broken row
        lq = torch.where(ok, zl - torch.logsumexp(zl, dim=1, keepdim=True), zl)
        lt = torch.where(ok, torch.log_softmax(torch.where(ok, lp / T, zl), dim=1), zl)  # zl: -inf off ok
        q, pt = torch.exp(lq), torch.exp(lt)  # 0 on empty slots
        if direction == "forward":
            loss_row = torch.where(pt > 0, pt * (lt - lq), torch.zeros_like(pt)).sum(dim=1)
            g_l = q * pt.sum(dim=1, keepdim=True) - pt
        else:
            loss_row = torch.where(q > 0, q * (lq - lt), torch.zeros_like(q)).sum(dim=1)
            g_l = torch.where(q > 0, q * (lq - lt - loss_row[:, None]), torch.zeros_like(q))
        loss_row = torch.where(any_ok, loss_row, torch.zeros_like(loss_row))
        g_l = torch.where(ok & any_ok[:, None], g_l, torch.zeros_like(g_l))

        def coef(p, scale):
            p.zero_().scatter_add_(1, safe, g_l * scale)

        return loss_row, coef, row_bad

    # bucket: the listed tokens plus one rest outcome on both sides
    e = out
    e.copy_(z)
    e.scatter_reduce_(1, safe, torch.where(ok, torch.full_like(lp, neg_inf), torch.full_like(lp, float("inf"))),
                      reduce="amin")  # listed entries -inf (an empty slot leaves its column alone)
    mx_raw = e.amax(dim=1)
    row_bad |= ~torch.isfinite(torch.maximum(mx_raw, zl.amax(dim=1)))  # the row's max: NaN, +inf or all -inf
    mx = torch.where(torch.isfinite(mx_raw), mx_raw, torch.zeros_like(mx_raw))
    e.sub_(mx[:, None])
    if T != 1.0:
        e.div_(T)
    e.exp_()  # unlisted numerators exp((z - mx) / T); listed entries 0
    s_r = e.sum(dim=1)
    lr = mx / T + torch.log(s_r)  # log-sum-exp of the unlisted z / T (-inf: no unlisted mass)
    lse = torch.logsumexp(torch.cat([zl, lr[:, None]], dim=1), dim=1)
    la, la_r = zl - lse[:, None], lr - lse  # student log-masses: listed, rest
    # teacher: listed log-probabilities and the rest 1 - sum exp(lp), from log(listed mass) =
    # m + log1p(sum of the others relative to the largest), exact to the inputs' rounding
    lpm = torch.where(ok, lp, torch.full_like(lp, neg_inf))
    if rest is not None:  # the stored rest (exact before rounding); teacher renormalised over listed + rest
        rest = rest.to(cdt)
        row_bad |= torch.isnan(rest) | (rest == float("inf"))
        lt_r = torch.where(torch.isnan(rest), torch.full_like(rest, neg_inf), rest)
        log_z = torch.logaddexp(lpm.logsumexp(dim=1), lt_r)
        row_bad |= ~torch.isfinite(log_z)  # no teacher mass at all (or +inf)
        z0 = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
        lpm, lt_r = lpm - z0[:, None], lt_r - z0
        p_rest = torch.exp(lt_r)
    else:
        m = lpm.amax(dim=1)
        m0 = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        rel = torch.exp(lpm - m0[:, None]).scatter(1, lpm.argmax(dim=1, keepdim=True), 0.0)
        log_listed = m + torch.log1p(rel.sum(dim=1))
        p_rest = (-torch.expm1(log_listed)).clamp_min(0.0)
        # a rest below the rounding noise of that difference is 0 when the student has no unlisted mass
        # (the top-k lists every token it can emit): the full KL, not +inf from noise
        floor = lp.shape[1] * torch.finfo(cdt).eps
        p_rest = torch.where((s_r > 0) | (p_rest > floor), p_rest, torch.zeros_like(p_rest))
        lt_r = torch.log(p_rest)
    pt = torch.exp(lpm)
    a, a_r = torch.exp(la), torch.exp(la_r)
    c_u = torch.exp(mx / T - lse)  # turns an unlisted numerator into its probability
    if direction == "forward":
        loss_row = torch.where(pt > 0, pt * (lpm - la), torch.zeros_like(pt)).sum(dim=1) + torch.where(
            p_rest > 0, p_rest * (lt_r - la_r), torch.zeros_like(p_rest))
        mass = pt.sum(dim=1) + p_rest
        g_l = torch.where(ok, a * mass[:, None] - pt, torch.zeros_like(pt))  # listed: A_j sum P - P_j
        g_u = c_u * mass - torch.where(s_r > 0, p_rest / s_r, torch.zeros_like(s_r))  # unlisted, per numerator
    else:
        loss_row = torch.where(a > 0, a * (la - lpm), torch.zeros_like(a)).sum(dim=1) + torch.where(
            a_r > 0, a_r * (la_r - lt_r), torch.zeros_like(a_r))
        g_l = torch.where(ok & (a > 0), a * (la - lpm - loss_row[:, None]), torch.zeros_like(a))
        g_u = torch.where(s_r > 0, c_u * (la_r - lt_r - loss_row), torch.zeros_like(s_r))

    loss_row = torch.where(any_ok, loss_row, torch.zeros_like(loss_row))  # all mass in the rest on both sides: 0
    g_u = torch.where(any_ok, g_u, torch.zeros_like(g_u))

    def coef(p, scale):
        p.mul_((g_u * scale)[:, None])  # listed entries stay 0
        p.scatter_add_(1, safe, g_l * scale)

    return loss_row, coef, row_bad


class KLLoss(LossModule):
    """`kl_loss` (same-vocab KD) with fixed options."""

    function = staticmethod(kl_loss)
    options_type = KLOptions

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward", tail: str = "bucket",
                 position_chunk_size: int | None = None, check_inputs: bool = False, ce_weight: float = 0.0):
        super().__init__(temperature=temperature, direction=direction, tail=tail,
                         position_chunk_size=position_chunk_size, check_inputs=check_inputs, ce_weight=ce_weight)
