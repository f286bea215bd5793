"""Which positions and chunks of a CONTRACTS §2 batch a loss counts ("valid units").

Next-token shift: the logit at position p predicts token p+1, so position p is a *next-token
position* when tokens p and p+1 are both real (`token_mask`) and its sample is kept (`sample_mask`).
CE and same-vocab KL count next-token positions. The chunk losses credit position p to the chunk of
token p+1.

Two ways to turn a chunk into a unit (docs/losses.md):
- `"start"` (principled P-KL): the chunk's *start* positions, the logit just before the chunk's
  first token on each side. Both models have then read exactly the same text.
- `"mean"` (public P-KL): every next-token position whose next token lies in the chunk.
A chunk is valid when `pair_valid`, `pair_is_correct` (unless `correct_only=False`), its sample is
kept, and it has at least one position on each side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xtoken_core.errors import LossInputError, LossOptionError


def get_key(batch: dict, key: str, shape=None, *, required: bool = True):
    value = batch.get(key)
    if value is None:
        if required:
            raise LossInputError(f"batch: key {key!r} is missing (CONTRACTS §2 lists the batch keys)")
        return None
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise LossInputError(f"batch[{key!r}] has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


def next_token_mask(batch: dict, batch_size: int, length: int, prefix: str = "", device=None) -> torch.Tensor:
    """`[B, T]` bool: position p predicts a real token (token p and p+1 real, sample kept).

    `prefix` is `""` for the student, `"teacher_{i}_"` for cross-tokenizer teacher i. The token mask
    is required (a loss cannot tell padding from text without it: CONTRACTS §2); a batch without
    `sample_mask` keeps every sample. For the student, an optional `target_mask [B, T]` (chat
    `train_on: assistant`) also requires token p+1 to be a training target.
    """
    tm = get_key(batch, f"{prefix}token_mask", (batch_size, length))
    tm = tm.to(device=device, dtype=torch.bool)
    out = torch.zeros_like(tm)
    out[:, :-1] = tm[:, :-1] & tm[:, 1:]
    if not prefix:
        target = get_key(batch, "target_mask", (batch_size, length), required=False)
        if target is not None:
            out[:, :-1] &= target[:, 1:].to(device=device, dtype=torch.bool)
    sm = get_key(batch, "sample_mask", (batch_size,), required=False)
    if sm is not None:
        out &= sm.to(device=device, dtype=torch.bool)[:, None]
    return out


def next_token_targets(batch: dict, valid: torch.Tensor, width: int) -> torch.Tensor:
    """`[B * T]` int64: the student's next token id at each next-token position (`valid [B, T]`,
    from `next_token_mask`), 0 elsewhere, clamped into `[0, width)` (on an accelerator out-of-range
    ids are not raised but poison the loss: `checks.check_real_ids`)."""
    ids = batch["input_ids"].to(valid.device)
    target = torch.zeros_like(ids)
    target[:, :-1] = ids[:, 1:]
    return torch.where(valid, target, torch.zeros_like(target)).flatten().clamp(0, width - 1)


def shifted_chunk_ids(chunk_id: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """`[B, T]`: the chunk of token p+1 for each next-token position p, -1 elsewhere."""
    out = torch.full_like(chunk_id, -1)
    out[:, :-1] = chunk_id[:, 1:]
    return torch.where(valid, out, torch.full_like(out, -1))


@dataclass(frozen=True, eq=False)
class ChunkUnits:
    """Valid chunks of one teacher's alignment, flattened over the batch (U of them)."""

    num_units: torch.Tensor  # [] int64, on the batch device (no host sync)
    # "start": one student row and one teacher row per unit (flat indices b * T + p)
    student_rows: torch.Tensor  # [U] (start) or [N_s] (mean)
    teacher_rows: torch.Tensor  # [U] (start) or [N_t] (mean)
    # "mean": the unit each listed row belongs to, and each unit's row counts
    student_unit: torch.Tensor | None = None  # [N_s]
    teacher_unit: torch.Tensor | None = None  # [N_t]
    student_count: torch.Tensor | None = None  # [U]
    teacher_count: torch.Tensor | None = None  # [U]


def chunk_units(
    batch: dict,
    teacher_index: int,
    batch_size: int,
    student_len: int,
    teacher_len: int,
    *,
    mode: str = "start",
    correct_only: bool = True,
    device=None,
) -> ChunkUnits:
    """The valid chunks of teacher `teacher_index`'s alignment as loss units (see module doc)."""
    if mode not in ("start", "mean"):
        raise LossOptionError(f"chunk unit mode {mode!r}: valid modes are 'start', 'mean'")
    i = teacher_index
    B = batch_size
    cid_s = get_key(batch, f"alignment_{i}_student_chunk_id", (B, student_len)).to(device)
    cid_t = get_key(batch, f"alignment_{i}_teacher_chunk_id", (B, teacher_len)).to(device)
    pair_valid = get_key(batch, f"alignment_{i}_pair_valid").to(device=device, dtype=torch.bool)
    if pair_valid.dim() != 2 or pair_valid.shape[0] != B:
        raise LossInputError(
            f"batch['alignment_{i}_pair_valid'] has shape {tuple(pair_valid.shape)}, expected [B={B}, P]"
        )
    P = pair_valid.shape[1]
    ok = pair_valid.clone()
    if correct_only:
        ok &= get_key(batch, f"alignment_{i}_pair_is_correct", (B, P)).to(device=device, dtype=torch.bool)
    sm = get_key(batch, "sample_mask", (B,), required=False)
    if sm is not None:
        ok &= sm.to(device=device, dtype=torch.bool)[:, None]
    ms = next_token_mask(batch, B, student_len, "", device)
    mt = next_token_mask(batch, B, teacher_len, f"teacher_{i}_", device)
    sh_s = shifted_chunk_ids(cid_s, ms)  # [B, T_s]
    sh_t = shifted_chunk_ids(cid_t, mt)  # [B, T_t]

    if mode == "start":
        start_s = _chunk_starts(cid_s, sh_s, P)  # [B, P]
        start_t = _chunk_starts(cid_t, sh_t, P)
        ok &= (start_s >= 0) & (start_t >= 0)
        ub, uc = ok.nonzero(as_tuple=True)
        return ChunkUnits(
            num_units=ok.sum(),
            student_rows=ub * student_len + start_s[ub, uc],
            teacher_rows=ub * teacher_len + start_t[ub, uc],
        )

    count_s = _chunk_counts(sh_s, P)
    count_t = _chunk_counts(sh_t, P)
    ok &= (count_s > 0) & (count_t > 0)
    flat_ok = ok.flatten()
    unit_of = torch.cumsum(flat_ok.to(torch.int64), 0) - 1
    unit_of = torch.where(flat_ok, unit_of, torch.full_like(unit_of, -1))  # [B * P]
    s_rows, s_unit = _rows_in_units(sh_s, unit_of, P)
    t_rows, t_unit = _rows_in_units(sh_t, unit_of, P)
    return ChunkUnits(
        num_units=flat_ok.sum(),
        student_rows=s_rows,
        teacher_rows=t_rows,
        student_unit=s_unit,
        teacher_unit=t_unit,
        student_count=count_s.flatten()[flat_ok],
        teacher_count=count_t.flatten()[flat_ok],
    )


def _chunk_starts(chunk_id: torch.Tensor, shifted: torch.Tensor, P: int) -> torch.Tensor:
    """`[B, P]`: position p whose next token is the *first* token of chunk c (-1: none)."""
    B, T = chunk_id.shape
    prev = chunk_id  # chunk of token p itself
    is_start = (shifted >= 0) & (shifted != prev)
    b, p = is_start.nonzero(as_tuple=True)
    c = shifted[b, p]
    out = torch.full((B * P,), -1, dtype=torch.int64, device=chunk_id.device)
    out[b * P + c] = p
    return out.view(B, P)


def _chunk_counts(shifted: torch.Tensor, P: int) -> torch.Tensor:
    B = shifted.shape[0]
    b, p = (shifted >= 0).nonzero(as_tuple=True)
    c = shifted[b, p]
    out = torch.zeros(B * P, dtype=torch.int64, device=shifted.device)
    out.index_add_(0, b * P + c, torch.ones_like(c))
    return out.view(B, P)


def _rows_in_units(shifted: torch.Tensor, unit_of: torch.Tensor, P: int):
    B, T = shifted.shape
    b, p = (shifted >= 0).nonzero(as_tuple=True)
    unit = unit_of[b * P + shifted[b, p]]
    keep = unit >= 0
    return (b * T + p)[keep], unit[keep]


def check_chunk_ids(batch: dict, teacher_index: int) -> None:
    """Raise unless every chunk id is -1 or a valid slot of `pair_valid` (syncs; check mode only)."""
    i = teacher_index
    P = batch[f"alignment_{i}_pair_valid"].shape[1]
    for side in ("student", "teacher"):
        cid = batch[f"alignment_{i}_{side}_chunk_id"]
        if cid.numel() and (int(cid.min()) < -1 or int(cid.max()) >= P):
            raise LossInputError(
                f"batch['alignment_{i}_{side}_chunk_id'] holds ids outside [-1, {P - 1}] (P = pair_valid.shape[1])"
            )


def count_units(batch: dict, kind: str, *, teacher_index: int = 0, device=None, **options) -> torch.Tensor:
    """The local number of valid units a loss of `kind` with keyword `options` (the loss function's,
    e.g. `public=True`, `chunk_form="chain"`, `correct_only=False`) divides by on `batch` when
    `normalizer=None` (a 0-dim int64 tensor). Every registry kind is covered.

    Under data parallelism, all-reduce (sum) it across ranks and pass it as `normalizer`.
    Position kinds (`LossSpec.unit == "position"`): next-token positions. Chunk kinds: the valid
    chunks of teacher `teacher_index`, as chunk starts or as chunks with positions on both sides,
    whichever the options' `unit_mode` says (principled P-KL, and ULD / H-KL / GOLD in the "start"
    chunk form: starts; public P-KL, the other chunk forms and ALM: positions). ALM with
    `debias_gamma` drops chunks by the logits, so its count is refused.
    """
    from xtoken_loss import registry  # the registry imports the losses, which import this module

    return registry.count_units(batch, kind, teacher_index=teacher_index, device=device, **options)
