"""What a loss receives from a teacher (CONTRACTS §3), as one type with one parser.

Two forms:
- `"logits"`: the teacher's full logits `[B, T_t, V_t]` (any float dtype).
- `"topk"`: per-position top-k, `topk_logprobs [B, T_t, k]` (log-softmax over the full teacher
  vocabulary, taken before selecting) with `topk_indices [B, T_t, k]` (an integer dtype; -1 marks an
  empty slot), and optionally `target_logprob [B, T_t]`, the log-probability of the token that follows
  each position, and `rest_logprob [B, T_t]`, the log of the teacher's probability mass outside the
  listed ids (-inf when they hold all of it; it comes with the top-k pair). A loss that needs only
  `target_logprob` (ALM) also takes it alone; the cross-tokenizer losses' top-k forms need
  `rest_logprob` (their `needs`).

`as_teacher_outputs` is the one place that turns what a caller passes (a `TeacherOutputs`, a plain
tensor = full logits, or a dict with the CONTRACTS §3 keys, for example a model output with `logits`)
into a `TeacherOutputs`, checks its structure, and refuses a form the loss does not accept. Every
check reads shapes and dtypes only: no value is read, so nothing waits for the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from xtoken_core.errors import LossInputError

FORMS = ("logits", "topk")
TOPK_KEYS = ("topk_logprobs", "topk_indices")  # what the top-k form carries unless a loss says otherwise
_KEYS = ("logits", "topk_logprobs", "topk_indices", "target_logprob", "rest_logprob")
TOPK_REST_KEYS = TOPK_KEYS + ("rest_logprob",)  # what the cross-tokenizer losses' top-k forms read
_DIMS = {"topk_logprobs": "[B, T, k]", "topk_indices": "[B, T, k]", "target_logprob": "[B, T]",
         "rest_logprob": "[B, T]"}


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TeacherOutputs:
    """One teacher's outputs: `logits`, or the top-k fields (module doc). Validated when built
    (shapes and dtypes only); raises `LossInputError` naming the field."""

    logits: torch.Tensor | None = None  # [B, T_t, V_t]
    topk_logprobs: torch.Tensor | None = None  # [B, T_t, k]
    topk_indices: torch.Tensor | None = None  # [B, T_t, k], -1 = empty slot
    target_logprob: torch.Tensor | None = None  # [B, T_t]
    rest_logprob: torch.Tensor | None = None  # [B, T_t], log of the mass outside the listed ids

    def __post_init__(self):
        _check_fields(self.logits, self.topk_logprobs, self.topk_indices, self.target_logprob, "TeacherOutputs",
                      rest=self.rest_logprob)

    @property
    def form(self) -> str:
        """`"logits"` or `"topk"`."""
        return "logits" if self.logits is not None else "topk"

    @property
    def main(self) -> torch.Tensor:
        """The tensor that defines the positions: `logits`, else `topk_logprobs`, else `target_logprob`."""
        for t in (self.logits, self.topk_logprobs, self.target_logprob):
            if t is not None:
                return t
        raise AssertionError("unreachable: a TeacherOutputs always holds a tensor")

    @property
    def batch_size(self) -> int:
        return self.main.shape[0]

    @property
    def length(self) -> int:
        """T_t, the number of teacher positions."""
        return self.main.shape[1]

    @property
    def width(self) -> int | None:
        """V_t, the width of the logits (None for the top-k form)."""
        return self.logits.shape[2] if self.logits is not None else None

    @property
    def k(self) -> int | None:
        """The number of top-k slots per position (None for logits, or target_logprob alone)."""
        return self.topk_logprobs.shape[2] if self.topk_logprobs is not None else None

    @property
    def device(self) -> torch.device:
        return self.main.device


def as_teacher_outputs(
    obj,
    *,
    loss: str,
    accepts: Sequence[str] = FORMS,
    needs: Sequence[str] = TOPK_KEYS,
) -> TeacherOutputs:
    """`obj` as a `TeacherOutputs`, or `LossInputError`.

    `obj`: a `TeacherOutputs`, a tensor (full logits), or a dict (any mapping) with `logits` (it wins
    over the other keys, as it always has) or the top-k keys; other keys are ignored. `loss`: the
    loss or score named in messages. `accepts`: the forms it accepts (its module's `TEACHER_FORMS`).
    `needs`: the top-k fields it reads (default `topk_logprobs` + `topk_indices`; ALM reads
    `target_logprob`; the cross-tokenizer top-k forms `TOPK_REST_KEYS`, the pair + `rest_logprob`).
    """
    bad = [f for f in accepts if f not in FORMS]
    if bad or not accepts:
        raise ValueError(f"accepts must be a non-empty subset of {FORMS}, got {tuple(accepts)!r}")
    if isinstance(obj, TeacherOutputs):
        out = obj
    elif isinstance(obj, torch.Tensor):
        _check_fields(obj, None, None, None, loss, accepts, needs)
        out = TeacherOutputs(logits=obj)
    elif isinstance(obj, Mapping):
        if obj.get("logits") is not None:
            fields = (obj["logits"], None, None, None, None)
        else:
            fields = (None,) + tuple(obj.get(k) for k in _KEYS[1:])
            if all(f is None for f in fields):
                keys = ", ".join(repr(k) for k in obj) or "none"
                _refuse(loss, accepts, needs, f"is a dict without any of {', '.join(map(repr, _KEYS))} (keys: {keys})")
        _check_fields(*fields[:4], loss, accepts, needs, rest=fields[4])
        out = TeacherOutputs(logits=fields[0], topk_logprobs=fields[1], topk_indices=fields[2],
                             target_logprob=fields[3], rest_logprob=fields[4])
    else:
        _refuse(loss, accepts, needs, f"is a {type(obj).__name__}")
    if out.form not in accepts:
        if out.form == "logits":
            _refuse(loss, accepts, needs, f"are full logits {_shape(out.logits)}")
        shapes = ", ".join(f"{k} {_shape(getattr(out, k))}" for k in _KEYS[1:] if getattr(out, k) is not None)
        _refuse(loss, accepts, needs, f"are per-position top-k outputs ({shapes})")
    if out.form == "topk":
        missing = [k for k in needs if getattr(out, k) is None]
        if missing:
            _refuse(loss, accepts, needs, f"have no {' / '.join(map(repr, missing))}")
    return out


# --------------------------------------------------------------------------------------------------
# checks and messages


def _describe(accepts, needs) -> str:
    parts = []
    if "logits" in accepts:
        parts.append("full logits [B, T, V] (a tensor, {'logits': ...} or TeacherOutputs(logits=...))")
    if "topk" in accepts:
        if tuple(needs) == TOPK_KEYS:
            parts.append("per-position top-k {'topk_logprobs': [B, T, k], 'topk_indices': [B, T, k] (integer), "
                         "optional 'target_logprob': [B, T], 'rest_logprob': [B, T]}")
        else:
            need = " and ".join(f"{k!r} {_DIMS[k]}" for k in needs)
            rest = " / ".join(repr(k) for k in _KEYS[1:] if k not in needs)
            parts.append(f"top-k outputs with {need}" + (f" ({rest} optional)" if rest else ""))
    return " or ".join(parts)


def _refuse(loss, accepts, needs, what: str):
    raise LossInputError(f"{loss}: teacher_outputs {what}; {loss} accepts {_describe(accepts, needs)} (CONTRACTS §3)")


def _shape(t) -> str:
    return str(list(t.shape))


def _check_fields(logits, lp, idx, tlp, loss, accepts=FORMS, needs=TOPK_KEYS, *, rest=None) -> None:
    """Structure of the fields (shapes and dtypes only, no device sync); `rest`: `rest_logprob`."""

    def fail(what):
        _refuse(loss, accepts, needs, what)

    for name, t in zip(_KEYS, (logits, lp, idx, tlp, rest)):
        if t is not None and not isinstance(t, torch.Tensor):
            fail(f"field {name!r} is a {type(t).__name__}, not a tensor")
    if logits is not None:
        if any(t is not None for t in (lp, idx, tlp, rest)):
            fail("hold both 'logits' and top-k fields; give one form")
        if logits.dim() != 3:
            fail(f"logits have shape {_shape(logits)}, expected [B, T, V]")
        if not logits.is_floating_point():
            fail(f"logits have dtype {logits.dtype}, expected a floating dtype")
        return
    if lp is None and idx is None and tlp is None:
        fail("are empty (no logits and no top-k fields)")
    if (lp is None) != (idx is None):
        have, lack = ("topk_logprobs", "topk_indices") if idx is None else ("topk_indices", "topk_logprobs")
        fail(f"have {have!r} but no {lack!r}; the two come together")
    if lp is not None:
        if lp.dim() != 3:
            fail(f"topk_logprobs have shape {_shape(lp)}, expected [B, T, k]")
        if idx.shape != lp.shape:
            fail(f"topk_indices have shape {_shape(idx)} but topk_logprobs {_shape(lp)}; they must match")
        if not lp.is_floating_point():
            fail(f"topk_logprobs have dtype {lp.dtype}, expected a floating dtype")
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            fail(f"topk_indices have dtype {idx.dtype}, expected an integer dtype (int32/int64)")
    if tlp is not None:
        if tlp.dim() != 2:
            fail(f"target_logprob has shape {_shape(tlp)}, expected [B, T]")
        if lp is not None and tlp.shape != lp.shape[:2]:
            fail(f"target_logprob has shape {_shape(tlp)} but topk_logprobs {_shape(lp)}; expected [B, T] = "
                 f"{list(lp.shape[:2])}")
        if not tlp.is_floating_point():
            fail(f"target_logprob has dtype {tlp.dtype}, expected a floating dtype")
    if rest is not None:
        if lp is None:
            fail("have 'rest_logprob' but no 'topk_logprobs' / 'topk_indices'; it is the mass outside the listed ids "
                 "and comes with them")
        if rest.shape != lp.shape[:2]:
            fail(f"rest_logprob has shape {_shape(rest)} but topk_logprobs {_shape(lp)}; expected [B, T] = "
                 f"{list(lp.shape[:2])}")
        if not rest.is_floating_point():
            fail(f"rest_logprob has dtype {rest.dtype}, expected a floating dtype")
