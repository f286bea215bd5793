"""Same-vocabulary KL distillation (loss kind `"kl"`): per next-token position, teacher and student
share the tokenizer, so their distributions are compared directly.

Teacher outputs (CONTRACTS §3): full logits `[B, T, V_t]` (V_t <= the student's width; a narrower
teacher is padded with -inf), or a dict with per-position top-k `topk_logprobs [B, T, k]`
(log-probabilities over the full teacher vocabulary) and `topk_indices [B, T, k]` (distinct per
position; -1 marks an empty slot).

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
from xtoken_loss.chunked import (
    attach_grad,
    check_options,
    coarse_divergence,
    compute_dtype,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    softmax_rows,
)
from xtoken_loss.modules import LossModule
from xtoken_loss.teacher_outputs import as_teacher_outputs
from xtoken_loss.units import check_finite, next_token_mask

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
):
    """Same-vocab KD: `sum over valid positions of T^2 KL / normalizer`.

    `direction="forward"` is KL(teacher || student), `"reverse"` KL(student || teacher). Valid
    positions are next-token positions (see `units.next_token_mask`). Returns `(loss, metrics)`;
    metrics: `kl` (mean KL per valid position, without the T^2 factor).
    """
    check_options(KLOptions, temperature=temperature, direction=direction, tail=tail,
                  position_chunk_size=position_chunk_size, check_inputs=check_inputs)
    T = float(temperature)
    if student_logits.dim() != 3:
        raise LossInputError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    B, L, V = student_logits.shape
    teacher = as_teacher_outputs(teacher_outputs, loss="kl", accepts=TEACHER_FORMS)
    form = teacher.form
    t_main, t_idx = (teacher.logits, None) if form == "logits" else (teacher.topk_logprobs, teacher.topk_indices)
    if t_main.shape[:2] != (B, L):
        raise LossInputError(
            f"teacher outputs have shape {tuple(t_main.shape)}, expected [B={B}, T={L}, ...] like the student logits"
        )
    if form == "logits" and t_main.shape[2] > V:
        raise LossInputError(
            f"teacher logits are {t_main.shape[2]} wide, the student's {V}; a same-vocab teacher must not be wider "
            "(slice its logits to the shared vocabulary)"
        )
    if form == "topk" and tail == "bucket" and T != 1.0:
        raise LossOptionError(
            "temperature != 1 with top-k teacher log-probs needs tail='renormalize': the teacher's mass outside "
            "its top-k at another temperature is unknown"
        )
    if check_inputs:
        check_finite("student_logits", student_logits)
        check_finite("teacher logits" if form == "logits" else "topk_logprobs", t_main)
        if form == "topk" and t_idx.numel() and (int(t_idx.max()) >= V or int(t_idx.min()) < -1):
            raise LossInputError(f"topk_indices must lie in [-1, {V - 1}]")

    dev = student_logits.device
    cdt = compute_dtype(student_logits.dtype)
    valid = next_token_mask(batch, B, L, "", dev).flatten()  # [N]
    num_units = valid.sum()
    norm = resolve_normalizer(normalizer, num_units, cdt)
    zs = student_logits.reshape(B * L, V)
    zt = t_main.reshape(B * L, t_main.shape[2])
    idx = t_idx.reshape(B * L, -1) if t_idx is not None else None
    want_grad = needs_grad(student_logits)
    grad = torch.zeros_like(student_logits).view(B * L, V) if want_grad else None
    direct = want_grad and grad.dtype == cdt  # write p straight into the gradient buffer
    n = rows_per_chunk(position_chunk_size, V)
    total = torch.zeros((), dtype=cdt, device=dev)
    with torch.no_grad():
        for r0 in range(0, B * L, n):
            r1 = min(r0 + n, B * L)
            w = valid[r0:r1]
            p, lse_s = softmax_rows(zs[r0:r1], T, out=grad[r0:r1] if direct else None)
            if form == "logits":
                loss_row, coef = _full_rows(zs[r0:r1], zt[r0:r1], p, lse_s, T, direction, V)
            else:
                loss_row, coef = _topk_rows(p, zt[r0:r1], idx[r0:r1], T, direction, tail)
            total += torch.where(w, loss_row, torch.zeros_like(loss_row)).sum()
            if want_grad:
                scale = torch.where(w, T / norm, torch.zeros((), dtype=cdt, device=dev))  # [n]
                coef(p, scale)  # p becomes the gradient rows
                if not direct:
                    grad[r0:r1] = p
    loss = total * (T * T) / norm
    metrics = {"kl": (total / num_units.to(cdt).clamp_min(1)).detach()}
    return attach_grad(student_logits, loss, grad.view(B, L, V) if want_grad else None), metrics


def _full_rows(z, zt, p, lse_s, T, direction, V):
    """Loss rows and the in-place gradient step for full teacher logits."""
    if zt.shape[1] < V:
        zt = torch.nn.functional.pad(zt, (0, V - zt.shape[1]), value=float("-inf"))
    pt, lse_t = softmax_rows(zt, T)
    if direction == "forward":
        diff = torch.where(pt > 0, zt.to(p.dtype) - z.to(p.dtype), torch.zeros_like(pt))
        loss_row = (pt * diff).sum(dim=1) / T - lse_t + lse_s

        def coef(p, scale):
            p.sub_(pt).mul_(scale[:, None])

        return loss_row, coef
    ell = torch.where(p > 0, (z.to(p.dtype) - zt.to(p.dtype)) / T + (lse_t - lse_s)[:, None], torch.zeros_like(p))
    loss_row = (p * ell).sum(dim=1)

    def coef(p, scale):
        ell.sub_(loss_row[:, None])
        p.mul_(ell).mul_(scale[:, None])

    return loss_row, coef


def _topk_rows(p, lp, idx, T, direction, tail):
    idx = idx.to(torch.int64)
    ok = (idx >= 0) & (lp > float("-inf"))
    safe_idx = idx.clamp(min=0)
    lp = lp.to(p.dtype)
    a = p.gather(1, safe_idx) * ok  # [n, k]
    neg_inf = torch.full_like(lp, float("-inf"))
    if tail == "bucket":
        lp_s = torch.where(ok, lp, neg_inf)
        # Both rests are differences of sums near 1: below the rounding floor they are 0, so a
        # top-k that lists the whole vocabulary is the full KL, not +inf from noise.
        floor = lp.shape[1] * torch.finfo(p.dtype).eps
        p_rest = 1.0 - torch.exp(lp_s).sum(dim=1)
        p_rest = torch.where(p_rest > floor, p_rest, torch.zeros_like(p_rest))
        a_rest = p.sum(dim=1) - a.sum(dim=1)
        a_rest = torch.where(a_rest > floor, a_rest, torch.zeros_like(a_rest))
        a_aug = torch.cat([a, a_rest[:, None]], dim=1)
        log_p = torch.cat([lp_s, torch.log(p_rest)[:, None]], dim=1)
    else:
        a_aug = a
        log_p = torch.log_softmax(torch.where(ok, lp / T, neg_inf), dim=1)
        log_p = torch.where(ok, log_p, neg_inf)  # rows with no listed token stay all -inf, not NaN
    loss_row, d_a = coarse_divergence(a_aug, log_p, direction)
    loss_row = torch.where(ok.any(dim=1), loss_row, torch.zeros_like(loss_row))

    def coef(p, scale):
        k = a.shape[1]
        d_s = d_a[:, :k]
        d_rest = d_a[:, k] if tail == "bucket" else torch.zeros_like(loss_row)
        c = (a * d_s).sum(dim=1) + (a_aug[:, k] * d_rest if tail == "bucket" else 0.0)
        d_s = torch.where(ok, d_s, torch.zeros_like(d_s))
        # p * (g - c) with g = d_rest off the listed tokens and d_j on token idx_j
        p.mul_((d_rest - c)[:, None])
        p.scatter_add_(1, safe_idx, a * (d_s - d_rest[:, None]) * ok)
        p.mul_(scale[:, None])

    return loss_row, coef


class KLLoss(LossModule):
    """`kl_loss` (same-vocab KD) with fixed options."""

    function = staticmethod(kl_loss)
    options_type = KLOptions

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward", tail: str = "bucket",
                 position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(temperature=temperature, direction=direction, tail=tail,
                         position_chunk_size=position_chunk_size, check_inputs=check_inputs)
