"""Student next-token cross-entropy (loss kind `"ce"`).

The logit at position p is scored on token p+1 (`input_ids[:, p + 1]`) at every next-token position
(tokens p and p+1 real, sample kept). `teacher_outputs` is ignored (pass None); the argument keeps
the CONTRACTS §5 signature.
"""

from __future__ import annotations

import torch

from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossInputError, LossOptionError
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
from xtoken_loss.units import check_finite, get_key, next_token_mask

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

    Returns `(loss, metrics)`; metrics: `ce` (mean nats per valid position).
    """
    check_options(CEOptions, position_chunk_size=position_chunk_size, check_inputs=check_inputs)
    if batch is None:
        raise LossInputError("ce_loss needs the batch (input_ids, token_mask, sample_mask)")
    if student_logits.dim() != 3:
        raise LossInputError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    B, L, V = student_logits.shape
    ids = get_key(batch, "input_ids", (B, L)).to(student_logits.device)
    if check_inputs:
        check_finite("student_logits", student_logits)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise LossInputError(f"input_ids must lie in [0, {V - 1}] (the student logits width)")
    dev = student_logits.device
    cdt = compute_dtype(student_logits.dtype)
    valid = next_token_mask(batch, B, L, "", dev)
    target = torch.zeros_like(ids)
    target[:, :-1] = ids[:, 1:]
    target = torch.where(valid, target, torch.zeros_like(target)).flatten()  # [N]
    valid = valid.flatten()
    num_units = valid.sum()
    norm = resolve_normalizer(normalizer, num_units, cdt)
    zs = student_logits.reshape(B * L, V)
    want_grad = needs_grad(student_logits)
    grad = torch.zeros_like(student_logits).view(B * L, V) if want_grad else None
    direct = want_grad and grad.dtype == cdt
    n = rows_per_chunk(position_chunk_size, V)
    total = torch.zeros((), dtype=cdt, device=dev)
    with torch.no_grad():
        for r0 in range(0, B * L, n):
            r1 = min(r0 + n, B * L)
            w, t = valid[r0:r1], target[r0:r1]
            z = zs[r0:r1]
            p, lse = softmax_rows(z, 1.0, out=grad[r0:r1] if direct else None)
            loss_row = lse - z.gather(1, t[:, None]).squeeze(1).to(cdt)
            total += torch.where(w, loss_row, torch.zeros_like(loss_row)).sum()
            if want_grad:
                scale = torch.where(w, 1.0 / norm, torch.zeros((), dtype=cdt, device=dev))
                p.scatter_add_(1, t[:, None], -torch.ones_like(loss_row)[:, None])
                p.mul_(scale[:, None])
                if not direct:
                    grad[r0:r1] = p
    loss = total / norm
    metrics = {"ce": (total / num_units.to(cdt).clamp_min(1)).detach()}
    return attach_grad(student_logits, loss, grad.view(B, L, V) if want_grad else None), metrics


class CELoss(LossModule):
    """`ce_loss` (next-token cross-entropy); `teacher_outputs` is ignored."""

    function = staticmethod(ce_loss)
    options_type = CEOptions

    def __init__(self, *, position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(position_chunk_size=position_chunk_size, check_inputs=check_inputs)
