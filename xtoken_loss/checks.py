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
    if normalizer is None or isinstance(normalizer, DeferredNormalizer):
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
            f"{loss}: batch[{key!r}] holds token id {top}, beyond {what} ({width} wide); the logits must "
            "cover the tokenizer the batch was built with"
        )
    return None


# --------------------------------------------------------------------------------------------------
# Entry checks every loss runs first (always; no device-to-host sync)


class DeferredNormalizer:
    """`normalizer=None` (the loss's own unit count) carrying a `[]` bool "bad input" flag that could
    not be read without a sync (an accelerator batch): `chunked.resolve_normalizer` resolves the count
    and makes it NaN where the flag is set, so the loss and its gradient come out NaN."""

    __slots__ = ("bad",)

    def __init__(self, bad: torch.Tensor):
        self.bad = bad


def with_flag(normalizer, bad: torch.Tensor | None, device=None):
    """`normalizer` carrying the sync-free flag `bad` (None: nothing to carry): a NaN-where-bad
    tensor for a given normalizer, a `DeferredNormalizer` for None."""
    if bad is None:
        return normalizer
    if normalizer is None:
        return DeferredNormalizer(bad)
    if isinstance(normalizer, DeferredNormalizer):
        return DeferredNormalizer(normalizer.bad | bad)
    n = torch.as_tensor(normalizer, device=bad.device)
    n = n if n.dtype.is_floating_point else n.to(torch.float32)
    return poison(n, bad)


def check_key(loss: str, batch, key: str, shape=None, what: str = ""):
    """`batch[key]` (a tensor of `shape`, when given), or a `LossInputError` naming the loss and the key."""
    if not isinstance(batch, dict):
        raise LossInputError(f"{loss}: batch must be a dict of tensors (CONTRACTS §2), got {type(batch).__name__}")
    value = batch.get(key)
    if value is None:
        raise LossInputError(f"{loss}: batch key {key!r} is missing{what} (CONTRACTS §2 lists the batch keys)")
    if not isinstance(value, torch.Tensor):
        raise LossInputError(f"{loss}: batch[{key!r}] must be a tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise LossInputError(f"{loss}: batch[{key!r}] has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


def check_real_ids(loss: str, batch, key: str, mask_key: str, width: int, what: str,
                   *, required: bool = False) -> torch.Tensor | None:
    """Every id of `batch[key]` at a real position (`batch[mask_key]`) lies in `[0, width)`, `width`
    being that of `what`. Padding ids are never read. CPU: raises `LossInputError` naming the key and
    the offending id; accelerator: returns a `[]` bool "out of range" flag for `poison` (the caller
    clamps the ids it gathers with). A missing key raises when `required`, else is not checked."""
    if batch.get(key) is None and not required:
        return None
    mask = check_key(loss, batch, mask_key)
    ids = check_key(loss, batch, key, tuple(mask.shape))
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise LossInputError(f"{loss}: batch[{key!r}] must hold integer token ids, got {ids.dtype}")
    real = mask.to(device=ids.device, dtype=torch.bool)
    if ids.device.type != "cpu":
        return (real & ((ids < 0) | (ids >= width))).any()
    if ids.numel() == 0 or not bool(real.any()):
        return None
    low = int(torch.where(real, ids, torch.zeros_like(ids)).min())
    if low < 0:
        raise LossInputError(f"{loss}: batch[{key!r}] holds token id {low} at a real position ({mask_key} true)")
    return check_ids_fit(loss, torch.where(real, ids, torch.full_like(ids, -1)), key, width, what)


def check_chunk_inputs(loss: str, student_logits, teacher_logits, batch, teacher_index: int, normalizer=None, *,
                       correct_only: bool = True, student_ids: bool = False, teacher_ids: bool = False):
    """The always-on entry checks of a chunk loss (P-KL, H-KL, GOLD, ULD, ALM, learned P-KL): both
    logits floating point and `[B, T, V]` with one batch size (`teacher_logits` None: a top-k teacher,
    checked by its parser), `normalizer` None or > 0, the alignment keys of teacher `teacher_index`
    and both token masks present with the logits' shapes, and the batch's real token ids on each side
    below that side's logits width (`student_ids` / `teacher_ids`: the loss reads them, so they must
    be there). Returns the normalizer to use (carrying, on an accelerator, the sync-free flag of ids
    out of range: `with_flag`)."""
    check_logits(loss, "student_logits", student_logits)
    B, Ls, Vs = student_logits.shape
    if teacher_logits is not None:
        check_logits(loss, "teacher logits", teacher_logits)
        if teacher_logits.shape[0] != B:
            raise LossInputError(
                f"{loss}: teacher logits have batch size {teacher_logits.shape[0]}, the student logits {B}"
            )
    check_normalizer(loss, normalizer)
    i = teacher_index
    check_key(loss, batch, f"alignment_{i}_student_chunk_id", (B, Ls), f" (teacher {i}'s alignment)")
    check_key(loss, batch, "token_mask", (B, Ls), " (which student positions are real)")
    cid_t = check_key(loss, batch, f"alignment_{i}_teacher_chunk_id", None, f" (teacher {i}'s alignment)")
    Lt = cid_t.shape[1] if cid_t.dim() == 2 else -1
    if teacher_logits is not None and cid_t.shape != (B, teacher_logits.shape[1]):
        raise LossInputError(
            f"{loss}: batch['alignment_{i}_teacher_chunk_id'] has shape {tuple(cid_t.shape)}, expected "
            f"{(B, teacher_logits.shape[1])} (the teacher logits' [B, T])"
        )
    check_key(loss, batch, f"teacher_{i}_token_mask", (B, Lt), " (which teacher positions are real)")
    pv = check_key(loss, batch, f"alignment_{i}_pair_valid", None, f" (teacher {i}'s alignment)")
    if pv.dim() != 2 or pv.shape[0] != B:
        raise LossInputError(
            f"{loss}: batch['alignment_{i}_pair_valid'] has shape {tuple(pv.shape)}, expected [B={B}, P]"
        )
    if correct_only:
        check_key(loss, batch, f"alignment_{i}_pair_is_correct", tuple(pv.shape),
                  " (needed with correct_only=True)")
    bad = check_real_ids(loss, batch, "input_ids", "token_mask", Vs, "the student logits", required=student_ids)
    if teacher_logits is not None:
        bad_t = check_real_ids(loss, batch, f"teacher_{i}_input_ids", f"teacher_{i}_token_mask",
                               teacher_logits.shape[2], "the teacher logits", required=teacher_ids)
        bad = bad_t if bad is None else bad if bad_t is None else bad | bad_t
    return with_flag(normalizer, bad)
