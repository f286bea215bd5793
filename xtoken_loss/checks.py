"""Input checks and NaN honesty shared by every loss (docs/losses.md, "Robustness").

Two tiers:
- **Always** (no device-to-host sync): dtypes, shapes, batch keys, the normaliser when it is a
  Python number or a CPU tensor, widths against Python ints. Raise `LossInputError` / one line.
- **`check_inputs=True`** (syncs, scans values): `check_finite_rows` names the tensor and the first
  offending `(sample, position)` among the rows the loss reads.

NaN honesty without a sync: a row a loss reads whose maximum is not finite (a NaN anywhere in the
row, a +inf, or a row that is all -inf) marks the loss as poisoned; `poison` then returns NaN
instead of the finite number the arithmetic would give. Rows the batch masks out are never read
(their gradient is exactly 0), so nothing there can matter.
"""

from __future__ import annotations

import torch

from xtoken_core.errors import LossInputError


def check_logits(loss: str, name: str, logits: torch.Tensor, dims: int = 3) -> None:
    """Raise unless `logits` is a floating-point tensor with `dims` dimensions (no sync)."""
    if not isinstance(logits, torch.Tensor):
        raise LossInputError(f"{loss}: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise LossInputError(
            f"{loss}: {name} must be floating point (float32, bfloat16, float16 or float64), got {logits.dtype}"
        )
    if logits.dim() != dims:
        raise LossInputError(f"{loss}: {name} must have {dims} dimensions [B, T, V], got shape {tuple(logits.shape)}")


def check_normalizer(loss: str, normalizer) -> None:
    """Raise unless `normalizer` is None or > 0. Tensors on an accelerator are not read (that would
    sync); a non-positive one there gives a non-finite loss instead of a silent number."""
    if normalizer is None:
        return
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise LossInputError(f"{loss}: normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        if normalizer.device.type != "cpu":
            return
        value = normalizer.item()
    else:
        value = normalizer
    try:
        ok = float(value) > 0
    except (TypeError, ValueError):
        raise LossInputError(f"{loss}: normalizer must be a positive number, got {normalizer!r}") from None
    if not ok:
        raise LossInputError(
            f"{loss}: normalizer must be > 0, got {value!r} (pass None to divide by the local unit count)"
        )


def nonfinite(row_max: torch.Tensor) -> torch.Tensor:
    """`[]` bool tensor: some read row's maximum is NaN or +-inf (no sync)."""
    return ~torch.isfinite(row_max).all()


def poison(value: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """`value`, or NaN where `bad` (a bool tensor broadcastable to it) is true (no sync)."""
    if bad is None:
        return value
    return torch.where(bad, torch.full_like(value, float("nan")), value)


def check_finite_rows(loss: str, name: str, logits: torch.Tensor, rows: torch.Tensor) -> None:
    """Raise if a row `rows` (flat indices `b * T + p` into `logits [B, T, V]`) of the ones the loss
    reads holds NaN or +inf, or is all -inf, naming `name` and the first such `(b, p)` (syncs;
    `check_inputs=True` only). -inf entries elsewhere (masked vocabulary entries) are allowed."""
    B, T, V = logits.shape
    rows = torch.unique(rows.to(torch.int64))
    if rows.numel() == 0:
        return
    flat = logits.detach().reshape(B * T, V)
    bad = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    step = max(1, (1 << 22) // max(V, 1))
    for r0 in range(0, rows.shape[0], step):
        z = flat[rows[r0 : r0 + step]]
        bad[r0 : r0 + step] = torch.isnan(z).any(dim=1) | (z == float("inf")).any(dim=1) | ~torch.isfinite(
            z.amax(dim=1)
        )
    hit = bad.nonzero()
    if hit.numel():
        r = int(rows[hit[0, 0]])
        z = flat[r]
        what = "NaN" if bool(torch.isnan(z).any()) else "+inf" if bool((z == float("inf")).any()) else "only -inf"
        raise LossInputError(
            f"{loss}: {name} holds {what} at sample {r // T}, position {r % T} (a position the loss reads); "
            "check the model's forward pass (mixed-precision overflow, a bad batch)"
        )


def check_ids_fit(loss: str, ids: torch.Tensor | None, key: str, width: int, what: str) -> torch.Tensor | None:
    """Every id in `ids` (batch key `key`; negative ids are padding) must be below `width`, the width of
    `what`. On the CPU the ids are read and a `LossInputError` names the largest; on an accelerator
    (reading would sync) the answer comes back as a `[]` bool "out of range" tensor for `poison`,
    and the caller clamps the ids it gathers with (`ids.clamp(max=width - 1)`). Returns None when
    checked (or nothing to check)."""
    if ids is None or ids.numel() == 0:
        return None
    if ids.device.type != "cpu":
        return ids.max() >= width
    top = int(ids.max())
    if top >= width:
        raise LossInputError(
            f"{loss}: batch[{key!r}] holds token id {top}, but {what} is only {width} wide; the logits must "
            "cover the tokenizer the batch was built with"
        )
    return None
