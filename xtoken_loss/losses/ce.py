"""Student next-token cross-entropy (loss kind `"ce"`).

The logit at position p is scored on token p+1 (`input_ids[:, p + 1]`) at every next-token position
(tokens p and p+1 real, sample kept). `teacher_outputs` is ignored (pass None); the argument keeps
the CONTRACTS §5 signature.
"""

from __future__ import annotations

import torch

from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.checks import (
    check_finite_rows,
    check_key,
    check_logits,
    check_normalizer,
    check_real_ids,
    nonfinite,
    poison,
)
from xtoken_loss.chunked import (
    attach_grad,
    check_options,
    compute_dtype,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    shift_rows,
)
from xtoken_loss.modules import LossModule
from xtoken_loss.units import next_token_mask, next_token_targets

TEACHER_FORMS = ()  # uses no teacher


@config
class CEOptions(Config):
    """Options of `ce_loss` / `CELoss`."""

    error_type = LossOptionError

    position_chunk_size: int | None = option(None, help="rows per step (None: automatic from the width)", min=1)
    check_inputs: bool = option(False, help="check the logits for NaN/inf and input_ids for range (syncs)")


def ce_loss(
    student_logits: torch.Tensor,
    teacher_outputs=None,
    batch: dict | None = None,
    *,
    normalizer=None,
    position_chunk_size: int | None = None,
    check_inputs: bool = False,
):
    """`sum over next-token positions of -log softmax(z_p)[input_ids[p + 1]] / normalizer`.

    Returns `(loss, metrics)`; metrics: `ce` (mean nats per valid position). `input_ids` and
    `token_mask` are required; a NaN / +inf in a row the loss reads gives a NaN loss.
    """
    check_options(CEOptions, position_chunk_size=position_chunk_size, check_inputs=check_inputs)
    if batch is None:
        raise LossInputError("ce: ce_loss needs the batch (input_ids, token_mask, sample_mask)")
    check_logits("ce", "student_logits", student_logits)
    check_normalizer("ce", normalizer)
    B, L, V = student_logits.shape
    check_key("ce", batch, "token_mask", (B, L), " (which positions are real)")
    bad = check_real_ids("ce", batch, "input_ids", "token_mask", V, "the student logits", required=True)
    dev = student_logits.device
    cdt = compute_dtype(student_logits.dtype)
    valid = next_token_mask(batch, B, L, "", dev)
    target = next_token_targets(batch, valid, V)  # [N]
    valid = valid.flatten()
    if check_inputs:
        check_finite_rows("ce", "student_logits", student_logits, valid.nonzero().squeeze(1))
    num_units = valid.sum()
    norm = resolve_normalizer(normalizer, num_units, cdt)
    zs = student_logits.reshape(B * L, V)
    want_grad = needs_grad(student_logits)
    grad = torch.empty_like(student_logits).view(B * L, V) if want_grad else None  # every row is written
    direct = want_grad and grad.dtype == cdt
    n = rows_per_chunk(position_chunk_size, V)
    total = torch.zeros((), dtype=cdt, device=dev)
    buf = None if direct else torch.empty(min(n, B * L), V, dtype=cdt, device=dev)
    on_cpu = dev.type == "cpu"
    with torch.no_grad():
        for r0 in range(0, B * L, n):
            r1 = min(r0 + n, B * L)
            w, t = valid[r0:r1], target[r0:r1]
            z = zs[r0:r1]
            # e = exp(z - m), then the gradient (e / s - onehot) / norm in one scaling pass
            e, mx = shift_rows(z, 1.0, grad[r0:r1] if direct else buf[: r1 - r0])
            e.exp_()
            s = e.sum(dim=1)
            safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            lse = safe + torch.log(s)  # NaN / +-inf on a NaN, +inf or all -inf row
            bad = nonfinite(torch.where(w, lse, torch.zeros_like(lse))) | (False if bad is None else bad)
            loss_row = lse - z.gather(1, t[:, None]).squeeze(1).to(cdt)
            total += torch.where(w, loss_row, torch.zeros_like(loss_row)).sum()
            if want_grad:
                e.mul_(torch.where(s > 0, 1.0 / (s * norm), torch.zeros_like(s))[:, None])
                e.scatter_add_(1, t[:, None], (torch.zeros_like(s) - 1.0 / norm)[:, None])
                if not on_cpu:
                    e.masked_fill_(~w[:, None], 0.0)  # padding: exactly 0, whatever its logits hold
                elif not bool(w.all()):  # the CPU reads the flag for free: fill only chunks with padding
                    e[~w] = 0.0
                if not direct:
                    grad[r0:r1] = e
    total = poison(total, bad)
    loss = total / norm
    metrics = {"ce": (total / num_units.to(cdt).clamp_min(1)).detach()}
    return attach_grad(student_logits, loss, grad.view(B, L, V) if want_grad else None), metrics


class CELoss(LossModule):
    """`ce_loss` (next-token cross-entropy); `teacher_outputs` is ignored."""

    function = staticmethod(ce_loss)
    options_type = CEOptions

    def __init__(self, *, position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(position_chunk_size=position_chunk_size, check_inputs=check_inputs)
