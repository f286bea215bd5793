"""Does a batch belong to a projection? The tokenizer check of every projection-taking loss.

The collator records, per row, which tokenizers a batch was aligned for (CONTRACTS §2:
`tokenizer_fingerprint [B]` and `teacher_{i}_tokenizer_fingerprint [B]` int64, the numbers of
`xtoken_core.fingerprints`). A projection artifact records the student and teacher it was built for
(`{name, fingerprint, ...}` in `projection.json`); `Projection.tokenizers`, the `CommonSet` built from
a projection and a `LearnedProjection` (through its metadata) carry them as a `TokenizerPair`.
`check_batch_tokenizers(source, batch, teacher_index, loss=...)` refuses a batch whose rows were
aligned for other tokenizers than `source` with one `LossInputError` line naming both pairs.

Unchecked (nothing to compare): a source without recorded fingerprints (`Projection.from_tensors`
without metadata), and a batch without these keys (built by another pipeline). Rows the batch drops
(`sample_mask` false) are never read, so their fingerprints do not count; every other row must
match, so a batch mixing rows of several tokenizers is refused too.

Cost: the fingerprint keys (and `sample_mask`) are small `[B]` tensors, copied to the host in one
transfer; that copy is the one device sync the check costs per call, and none at all when the same
tensors were already read (a small cache keyed on the tensors' identity and version, so the loss
terms of one step share one copy).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from xtoken_core import fingerprints as fpr
from xtoken_core.errors import LossInputError


@dataclass(frozen=True)
class TokenizerPair:
    """The student and teacher tokenizers an artifact was built for (None: not recorded)."""

    student_name: str | None = None
    student_fingerprint: str | None = None
    teacher_name: str | None = None
    teacher_fingerprint: str | None = None

    @classmethod
    def from_metadata(cls, meta) -> TokenizerPair | None:
        """From artifact metadata (`{"student": {name, fingerprint, ...}, "teacher": {...}}`); None
        when neither side records a fingerprint. Registers the names (`xtoken_core.fingerprints`)."""
        if not isinstance(meta, Mapping):
            return None
        sides = []
        for role in ("student", "teacher"):
            entry = meta.get(role)
            entry = entry if isinstance(entry, Mapping) else {}
            name, fp = entry.get("name"), entry.get("fingerprint")
            sides += [None if name is None else str(name), None if fp is None else str(fp)]
        if sides[1] is None and sides[3] is None:
            return None
        fpr.register_name(sides[1], sides[0])
        fpr.register_name(sides[3], sides[2])
        return cls(*sides)

    def describe(self) -> str:
        """`"llama3 (sha256:...) -> qwen3 (sha256:...)"`."""
        return (f"{fpr.describe(self.student_fingerprint, self.student_name)} -> "
                f"{fpr.describe(self.teacher_fingerprint, self.teacher_name)}")


def tokenizers_of(source) -> TokenizerPair | None:
    """The `TokenizerPair` of a `Projection`, `CommonSet` (their `tokenizers`), or anything with
    artifact `metadata` (a `LearnedProjection`); None when unknown."""
    pair = getattr(source, "tokenizers", None)
    if isinstance(pair, TokenizerPair):
        return pair
    return TokenizerPair.from_metadata(getattr(source, "metadata", None))


def check_batch_tokenizers(source, batch: Mapping, teacher_index: int | None, *, loss: str,
                           what: str = "the projection") -> None:
    """Raise `LossInputError` unless `batch` was aligned for the tokenizers `source` records (module
    doc): the student's against `tokenizer_fingerprint`, the teacher's against
    `teacher_{teacher_index}_tokenizer_fingerprint` (not checked when `teacher_index` is None)."""
    pair = tokenizers_of(source)
    if pair is None:
        return
    expected = [(fpr.STUDENT_KEY, "student", pair.student_fingerprint)]
    if teacher_index is not None:
        expected.append((fpr.teacher_key(teacher_index), f"teacher {teacher_index}", pair.teacher_fingerprint))
    check_batch_fingerprints(batch, expected, loss=loss, what=lambda: f"{what} is for {pair.describe()}",
                             fix="pass the projection built for the batch's tokenizers (`xtoken-align "
                                 "build-projection`), or the batch aligned for this one"
                                 + (" (and check teacher_index)" if teacher_index is not None else ""))


def check_batch_fingerprints(batch: Mapping, expected: Sequence[tuple[str, str, str | None]], *, loss: str,
                             what: str | Callable[[], str], fix: str) -> None:
    """The general check: `expected` lists `(batch key, role, fingerprint)`; a key missing from the
    batch or a fingerprint of None is skipped. The message reads `"{loss}: {what}, but the batch ...;
    {fix}"` (`what` may be a function, called only to word a refusal)."""
    wanted = [(k, role, fp) for k, role, fp in expected if fp is not None and batch.get(k) is not None]
    if not wanted:
        return
    keys, rows, kept = _host_rows(batch, loss)
    if all(bool((rows[keys.index(k)][kept] == fpr.fingerprint_id(fp)).all()) for k, _, fp in wanted):
        return
    found = []
    for key, role, fp in wanted:
        uniq, counts = np.unique(rows[keys.index(key)][kept], return_counts=True)
        if len(uniq) == 1:
            found.append(f"{role} {fpr.describe_id(uniq[0])}")
        elif len(uniq) > 1:
            mix = ", ".join(f"{fpr.describe_id(u)} in {c} row{'s' if c > 1 else ''}" for u, c in zip(uniq, counts))
            found.append(f"{role} mixed ({mix})")
    what = what() if callable(what) else what
    raise LossInputError(f"{loss}: {what}, but the batch was aligned for {' and '.join(found)}; {fix}")


# --------------------------------------------------------------------------------------------------
# reading the batch's fingerprint rows: one transfer, cached on the tensors

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 8


def _fingerprint_keys(batch: Mapping) -> list[str]:
    tail = "_" + fpr.STUDENT_KEY
    return sorted(k for k in batch if isinstance(k, str) and (
        k == fpr.STUDENT_KEY or (k.startswith("teacher_") and k.endswith(tail))))


def _host_rows(batch: Mapping, loss: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`(keys, rows [len(keys), B] int64, kept [B] bool)` for every fingerprint key of `batch`."""
    keys = _fingerprint_keys(batch)
    tensors = [batch[k] for k in keys]
    B = None
    for k, t in zip(keys, tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise LossInputError(f"{loss}: batch[{k!r}] must be a [B] int64 tensor of fingerprint ids (CONTRACTS "
                                 f"§2), got {_shape(t)}")
        if B is None:
            B = t.shape[0]
        elif t.shape[0] != B:
            raise LossInputError(f"{loss}: batch[{k!r}] has {t.shape[0]} rows but batch[{keys[0]!r}] has {B}; "
                                 "slice every key of a batch by the same rows")
    mask = batch.get("sample_mask")
    if not (isinstance(mask, torch.Tensor) and tuple(mask.shape) == (B,)):
        mask = None  # (a malformed sample_mask is the entry checks' to report)
    parts = tensors + ([mask] if mask is not None else [])
    cache_key = tuple(id(t) for t in parts)
    hit = _CACHE.get(cache_key)
    if hit is not None and all(r() is t and t._version == v for r, t, v in zip(hit[0], parts, hit[1])):
        _CACHE.move_to_end(cache_key)
        return keys, hit[2], hit[3]
    devices = {t.device for t in parts}
    if len(devices) == 1:
        host = torch.stack([t.to(torch.int64) for t in parts]).cpu().numpy()  # the one transfer
    else:
        host = torch.stack([t.cpu().to(torch.int64) for t in parts]).numpy()
    rows = host[:len(tensors)]
    kept = host[len(tensors)].astype(bool) if mask is not None else np.ones(B, dtype=bool)
    _CACHE[cache_key] = (tuple(weakref.ref(t) for t in parts), tuple(t._version for t in parts), rows, kept)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return keys, rows, kept


def _shape(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    return type(t).__name__
