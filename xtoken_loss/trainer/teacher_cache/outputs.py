"""`topk_outputs`: a teacher's full logits -> the CONTRACTS §3 top-k form, as the cache stores it.

The one function both the cache writer (`xtoken-train cache-teacher`) and the online
`teachers.I.top_k` path call, so the two give the same numbers for the same logits.

Per real position j (`token_mask`), in float32 whatever the logits' dtype:
- `lp = log_softmax(logits[j])` over the full width V (temperature 1);
- `topk_logprobs`, `topk_indices`: the `min(k, V)` largest `lp`, in decreasing order (ties as
  `torch.topk` breaks them); the values are then rounded to `dtype` (the storage dtype, bf16 by
  default, fp16 the option), the indices are int64 model ids;
- `target_logprob`: `lp[input_ids[j + 1]]` where position j + 1 is real too, else 0 (the last real
  position of a row, padding); kept in float32 (one value per position: 4 bytes, not worth rounding);
- `rest_logprob`: the log of the mass outside the listed ids, `logsumexp` of the other `V - k`
  log-probabilities (no cancellation, unlike `log1p(-sum exp(topk))`), -inf when k >= V; float32.

Padded positions: indices -1, every value 0. Memory: the log-softmax runs over chunks of rows of
about 2**24 floats (64 MiB), never over the whole `[B, T, V]` at once.
"""

from __future__ import annotations

import torch

from xtoken_core.errors import ConfigError
from xtoken_loss.teacher_outputs import TeacherOutputs

STORAGE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CHUNK_ELEMENTS = 1 << 24


def storage_dtype(name: str) -> torch.dtype:
    """`"bf16"` / `"fp16"` -> the torch dtype (ConfigError naming the choices otherwise)."""
    if name not in STORAGE_DTYPES:
        raise ConfigError(f"storage dtype {name!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def next_token_ids(input_ids: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(next_ids [B, T] int64, has_next [B, T] bool)`: the token after each position where both
    positions are real (`next_ids` 0 elsewhere)."""
    mask = token_mask.bool()
    has_next = torch.zeros_like(mask)
    has_next[:, :-1] = mask[:, :-1] & mask[:, 1:]
    nxt = torch.zeros_like(input_ids, dtype=torch.int64)
    nxt[:, :-1] = input_ids[:, 1:]
    return torch.where(has_next, nxt, torch.zeros_like(nxt)), has_next


@torch.no_grad()
def topk_outputs(logits: torch.Tensor, input_ids: torch.Tensor, token_mask: torch.Tensor, k: int,
                 dtype: torch.dtype = torch.bfloat16) -> TeacherOutputs:
    """The top-k form of `logits [B, T, V]` (module doc): `topk_logprobs [B, T, k'] dtype`,
    `topk_indices [B, T, k'] int64`, `target_logprob [B, T] float32`, `rest_logprob [B, T] float32`,
    with `k' = min(k, V)`. `input_ids [B, T]` are the ids the teacher read (in the logits' id space:
    compact ids for a restricted model), `token_mask [B, T]` its real positions."""
    if logits.dim() != 3:
        raise ConfigError(f"topk_outputs: logits have shape {list(logits.shape)}, expected [B, T, V]")
    b, t, v = logits.shape
    if tuple(input_ids.shape) != (b, t) or tuple(token_mask.shape) != (b, t):
        raise ConfigError(f"topk_outputs: input_ids {list(input_ids.shape)} and token_mask {list(token_mask.shape)} "
                          f"must be [B, T] = {[b, t]}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"topk_outputs: k must be a positive integer, found {k!r}")
    if dtype not in STORAGE_DTYPES.values() and dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"topk_outputs: dtype {dtype}: expected bfloat16, float16, float32 or float64")
    kk = min(k, v)
    dev = logits.device
    nxt, has_next = next_token_ids(input_ids, token_mask)
    nxt, has_next = nxt.reshape(-1), has_next.reshape(-1)
    flat = logits.reshape(b * t, v)
    vals = torch.zeros(b * t, kk, dtype=dtype, device=dev)
    idx = torch.full((b * t, kk), -1, dtype=torch.int64, device=dev)
    target = torch.zeros(b * t, dtype=torch.float32, device=dev)
    rest = torch.zeros(b * t, dtype=torch.float32, device=dev)
    rows = token_mask.reshape(-1).bool().nonzero().squeeze(1)
    step = max(1, _CHUNK_ELEMENTS // v)
    for start in range(0, rows.numel(), step):
        r = rows[start:start + step]
        lp = torch.log_softmax(flat[r].float(), dim=-1)  # [R, V]
        top_v, top_i = lp.topk(kk, dim=-1)
        tl = lp.gather(1, nxt[r, None]).squeeze(1)
        target[r] = torch.where(has_next[r], tl, torch.zeros_like(tl))
        lp.scatter_(1, top_i, float("-inf"))
        rest[r] = torch.logsumexp(lp, dim=-1)
        vals[r] = top_v.to(dtype)
        idx[r] = top_i
    return TeacherOutputs(topk_logprobs=vals.reshape(b, t, kk), topk_indices=idx.reshape(b, t, kk),
                          target_logprob=target.reshape(b, t), rest_logprob=rest.reshape(b, t))
