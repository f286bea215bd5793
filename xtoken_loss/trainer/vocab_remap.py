"""Restricted output rows ("restrict_vocab"): a side's model keeps rows only for the ids its data uses.

A tiny model cannot afford a 128k-152k wide head and embedding, so with `restrict_vocab: true` a side
(student or teacher) gets rows only for the token ids that the configured data files produce with
its tokenizer, plus the tokenizer's special-role ids (BOS, EOS, pad, ...), in increasing id order:
compact id `c` <-> real id `used_ids[c]`. Tokenization stays the real one; batches and projections
are mapped to compact ids here, and exports expand back (rows of unused ids zero).

    remap = build_remap(info, [train.jsonl, heldout.jsonl], cache_dir="data/cache", max_chars=8192)
    batch = remap_batch(batch, student_remap, [teacher_remap])      # ids -> compact ids
    proj = remap_projection(projection, student_remap, teacher_remap)

A remapped side carries a *derived fingerprint*
`f"{base_fingerprint}+remap:{sha256(used_ids as little-endian int64 bytes).hexdigest()[:16]}"`;
`remap_batch` writes `fingerprint_id(derived)` into the batch's fingerprint keys and
`remap_projection` records it in the projection's metadata, so the losses' pair check refuses a
remapped batch with an unremapped projection and the reverse (`xtoken_loss.batch_tokenizers`).

API (plain arguments; the trainer's loop calls these):
- `VocabRemap(used_ids, vocab_size, base_fingerprint, name=None)`: `size`, `fingerprint`,
  `to_compact(ids)`, `to_real(ids)`, `save(path)` / `VocabRemap.load(path)`, `to_dict()` /
  `from_dict()`.
- `build_remap(tokenizer, files, *, add_special_tokens=True, max_chars=None, cache_dir=None)`.
- `remap_batch(batch, student, teachers) -> dict`.
- `remap_projection(projection, student, teacher) -> Projection`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xtoken_core import fingerprints
from xtoken_core.artifact_format import ROW_UNUSED
from xtoken_core.errors import ConfigError, DataFileError, DataFileNotFoundError, TrainerError
from xtoken_loss.projection import Projection

_CACHE_VERSION = 1
_ENCODE_BATCH = 256  # samples tokenized per call while collecting ids


@dataclass(frozen=True, eq=False)
class VocabRemap:
    """The ids one side's restricted model keeps: compact id `c` is real id `used_ids[c]`.

    `used_ids [V_c]` int64, sorted, unique, in `[0, vocab_size)`; `vocab_size` is the tokenizer's
    id space (`TokenizerInfo.vocab_size`); `base_fingerprint` the tokenizer's fingerprint; `name`
    the tokenizer's name, for messages.
    """

    used_ids: np.ndarray
    vocab_size: int
    base_fingerprint: str
    name: str | None = None
    _compact: np.ndarray = field(init=False, repr=False)  # [vocab_size] int64: compact id, -1 unused

    def __post_init__(self):
        ids = np.asarray(self.used_ids, dtype=np.int64).reshape(-1)
        where = self.name or "vocab remap"
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= int(self.vocab_size)):
            raise TrainerError(f"{where}: used ids must lie in [0, {self.vocab_size}), found "
                               f"{int(ids.min())}..{int(ids.max())}")
        if ids.size > 1 and not bool((np.diff(ids) > 0).all()):
            raise TrainerError(f"{where}: used ids must be sorted and unique")
        ids = ids.copy()
        ids.setflags(write=False)
        table = np.full(int(self.vocab_size), -1, np.int64)
        table[ids] = np.arange(ids.size, dtype=np.int64)
        object.__setattr__(self, "used_ids", ids)
        object.__setattr__(self, "vocab_size", int(self.vocab_size))
        object.__setattr__(self, "_compact", table)
        fingerprints.register_name(self.fingerprint, f"{self.name or 'tokenizer'}+remap[{self.size}]")

    @property
    def size(self) -> int:
        """Number of compact ids (the restricted model's vocab size)."""
        return int(self.used_ids.size)

    @property
    def fingerprint(self) -> str:
        """The derived fingerprint (module doc)."""
        digest = hashlib.sha256(self.used_ids.astype("<i8").tobytes()).hexdigest()[:16]
        return f"{self.base_fingerprint}+remap:{digest}"

    def to_compact(self, ids: torch.Tensor) -> torch.Tensor:
        """Real ids (any shape, int) -> compact ids (same shape, int64, same device). Negative ids
        (-1: none) stay as they are; an id the remap does not keep raises `TrainerError` naming it."""
        ids = torch.as_tensor(ids)
        flat = ids.detach().to("cpu", torch.int64).numpy().reshape(-1)
        neg = flat < 0
        out_of_range = ~neg & (flat >= self.vocab_size)
        safe = np.where(neg | out_of_range, 0, flat)
        compact = np.where(neg, flat, self._compact[safe])
        bad = np.flatnonzero(out_of_range | (~neg & (compact < 0)))
        if bad.size:
            first = int(flat[bad[0]])
            raise TrainerError(
                f"{self.name or 'tokenizer'}: token id {first} is not among the {self.size} ids its restricted "
                f"vocabulary keeps ({bad.size} such position{'s' if bad.size > 1 else ''}); the remap is built "
                "from the configured data files: rebuild it with every file the run reads, or set "
                "restrict_vocab: false")
        return torch.from_numpy(compact.reshape(tuple(ids.shape))).to(ids.device)

    def to_real(self, ids: torch.Tensor) -> torch.Tensor:
        """Compact ids -> real ids (negative ids stay); an id outside `[0, size)` raises `TrainerError`."""
        ids = torch.as_tensor(ids)
        flat = ids.detach().to("cpu", torch.int64).numpy().reshape(-1)
        neg = flat < 0
        bad = np.flatnonzero(~neg & (flat >= self.size))
        if bad.size:
            raise TrainerError(f"{self.name or 'tokenizer'}: compact id {int(flat[bad[0]])} is outside the "
                               f"restricted vocabulary of {self.size} ids")
        real = np.where(neg, flat, self.used_ids[np.where(neg, 0, flat)])
        return torch.from_numpy(real.reshape(tuple(ids.shape))).to(ids.device)

    def to_dict(self) -> dict:
        """JSON-able form (`used_ids` as a list)."""
        return {"used_ids": self.used_ids.tolist(), "vocab_size": self.vocab_size,
                "base_fingerprint": self.base_fingerprint, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> VocabRemap:
        return cls(np.asarray(d["used_ids"], np.int64), int(d["vocab_size"]), str(d["base_fingerprint"]),
                   d.get("name"))

    def save(self, path) -> Path:
        """Write an `.npz` file atomically (a temporary file in the same folder, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"version": _CACHE_VERSION, "vocab_size": self.vocab_size,
                           "base_fingerprint": self.base_fingerprint, "name": self.name})
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, used_ids=self.used_ids, meta=np.array(meta))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> VocabRemap:
        """Read a file written by `save`; `DataFileError` naming the file if it cannot be read."""
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                used = z["used_ids"].astype(np.int64)
        except (OSError, ValueError, KeyError) as exc:
            raise DataFileError(f"cannot read vocab remap {path}: {exc}") from None
        if meta.get("version") != _CACHE_VERSION:
            raise DataFileError(f"{path}: vocab remap of version {meta.get('version')}, expected {_CACHE_VERSION}")
        return cls(used, int(meta["vocab_size"]), str(meta["base_fingerprint"]), meta.get("name"))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a data file's bytes (cache keys); a file that cannot be read raises naming it."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        error = DataFileNotFoundError if isinstance(exc, FileNotFoundError) else DataFileError
        raise error(f"cannot read data file {path}: {exc.strerror or exc}") from None
    return h.hexdigest()


def remap_cache_key(tokenizer, files, *, add_special_tokens: bool = True, max_chars: int | None = None) -> str:
    """sha256 hex over the tokenizer fingerprint, the files' contents (sha256, as a set) and the options."""
    key = {"version": _CACHE_VERSION, "tokenizer": tokenizer.fingerprint,
           "files": sorted(file_sha256(f) for f in files),
           "add_special_tokens": bool(add_special_tokens), "max_chars": max_chars}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def collect_ids(tokenizer, samples: list, *, add_special_tokens: bool = True) -> np.ndarray:
    """Sorted unique ids the collator's tokenization produces for `samples` (strings, or
    conversations rendered with the tokenizer's chat template), as `AlignmentCollator` encodes them."""
    from xtoken_align.alignment.aligner import encode_side
    from xtoken_align.alignment.chat import render_conversation

    seen = np.zeros(tokenizer.vocab_size, np.bool_)
    for start in range(0, len(samples), _ENCODE_BATCH):
        part = samples[start:start + _ENCODE_BATCH]
        texts, add = [], []
        for k, s in enumerate(part):
            if isinstance(s, dict):
                s = s["messages"] if isinstance(s.get("messages"), list) else s.get("text")
            if isinstance(s, list):
                texts.append(render_conversation(tokenizer, s, where=f"sample {start + k}")[0])
                add.append(False)  # conversations take their special tokens from the template
            elif isinstance(s, str):
                texts.append(s)
                add.append(bool(add_special_tokens))
            else:
                raise DataFileError(f"sample {start + k}: expected a text or a conversation, got "
                                    f"{type(s).__name__}")
        side, _ = encode_side(tokenizer, texts, add_special_tokens=np.array(add, bool))
        seen[side.ids] = True
    return np.flatnonzero(seen).astype(np.int64)


def build_remap(tokenizer, files, *, add_special_tokens: bool = True, max_chars: int | None = None,
                cache_dir=None) -> VocabRemap:
    """The remap of `tokenizer` (a `TokenizerInfo`) over the JSONL `files` (`text` or `messages`
    lines, read by `trainer.data.read_samples` with the same `max_chars` the run splits long texts
    with), plus the tokenizer's special-role ids.

    With `cache_dir`, the result is cached there as `vocab_remap-<name>-<key>.npz`, keyed by
    `remap_cache_key` (tokenizer fingerprint, files' sha256, options), and written atomically.
    """
    from xtoken_loss.trainer.data import read_samples

    files = [Path(f) for f in files]
    if not files:
        raise ConfigError("restrict_vocab: no data files to collect the used token ids from")
    cache_path = None
    if cache_dir is not None:
        key = remap_cache_key(tokenizer, files, add_special_tokens=add_special_tokens, max_chars=max_chars)
        safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(tokenizer.name))[:40]
        cache_path = Path(cache_dir) / f"vocab_remap-{safe_name}-{key[:24]}.npz"
        if cache_path.is_file():
            remap = VocabRemap.load(cache_path)
            if remap.base_fingerprint == tokenizer.fingerprint and remap.vocab_size == tokenizer.vocab_size:
                return remap
    seen = np.zeros(tokenizer.vocab_size, np.bool_)
    for f in files:
        seen[collect_ids(tokenizer, read_samples(f, max_chars=max_chars), add_special_tokens=add_special_tokens)] = True
    for role_id in tokenizer.special_roles.values():
        if 0 <= int(role_id) < tokenizer.vocab_size:
            seen[int(role_id)] = True
    remap = VocabRemap(np.flatnonzero(seen).astype(np.int64), tokenizer.vocab_size, tokenizer.fingerprint,
                       tokenizer.name)
    if cache_path is not None:
        remap.save(cache_path)
    return remap


def _map_real_positions(ids: torch.Tensor, mask: torch.Tensor | None, remap: VocabRemap) -> torch.Tensor:
    """Compact ids at real positions (`mask`), 0 (a valid compact id, masked anyway) elsewhere."""
    if mask is None:
        return remap.to_compact(ids)
    mask = mask.to(torch.bool)
    out = torch.zeros_like(ids, dtype=torch.int64)
    out[mask] = remap.to_compact(ids[mask])
    return out


def remap_batch(batch: dict, student: VocabRemap | None, teachers: list[VocabRemap | None]) -> dict:
    """A new batch dict with `input_ids` (student) and `teacher_{i}_input_ids` (cross-tokenizer
    teacher i) mapped to compact ids at real positions (`token_mask`; padding becomes compact id 0,
    still masked), and the fingerprint keys rewritten to `fingerprint_id(remap.fingerprint)`.

    `teachers` has one entry per configured teacher (None: that side is not restricted). A
    same-vocab teacher (no `teacher_{i}_input_ids` key) shares the student's remap; its entry must
    be None or the student's remap. Other keys are shared with `batch`, not copied.
    """
    out = dict(batch)
    if student is not None:
        out["input_ids"] = _map_real_positions(batch["input_ids"], batch.get("token_mask"), student)
        if fingerprints.STUDENT_KEY in batch:
            out[fingerprints.STUDENT_KEY] = _fingerprint_like(batch[fingerprints.STUDENT_KEY], student)
    for i, remap in enumerate(teachers):
        key = f"teacher_{i}_input_ids"
        fp_key = fingerprints.teacher_key(i)
        if key not in batch:  # same-vocab: reads the student's ids
            if remap is not None and (student is None or remap.fingerprint != student.fingerprint):
                raise ConfigError(f"teacher {i} shares the student's tokenizer, so it must share the student's "
                                  "restricted vocabulary (restrict_vocab must be the same for both)")
            if student is not None and fp_key in batch:
                out[fp_key] = _fingerprint_like(batch[fp_key], student)
            continue
        if remap is None:
            continue
        out[key] = _map_real_positions(batch[key], batch.get(f"teacher_{i}_token_mask"), remap)
        if fp_key in batch:
            out[fp_key] = _fingerprint_like(batch[fp_key], remap)
    return out


def _fingerprint_like(rows: torch.Tensor, remap: VocabRemap) -> torch.Tensor:
    return torch.full_like(rows, fingerprints.fingerprint_id(remap.fingerprint))


def remap_projection(projection: Projection, student: VocabRemap | None, teacher: VocabRemap | None
                     ) -> Projection:
    """`projection` on compact ids: row c is the real row `student.used_ids[c]` (an empty row where
    the projection has no such row), columns are teacher compact ids; entries pointing at a teacher id
    the teacher's remap does not keep are dropped and each row renormalised to sum 1 (a row left
    with nothing stays empty); `row_kind` follows its rows (uncovered rows: `unused`). Metadata is
    copied with each remapped side's fingerprint replaced by the derived one and its `vocab_size` /
    `model_vocab_size` set to the compact size. None on a side: that side is left as it is."""
    indices = projection.indices.detach().cpu().to(torch.int64).numpy()
    weights = projection.weights.detach().cpu().numpy()
    row_kind = None if projection.row_kind is None else projection.row_kind.detach().cpu().numpy()
    if student is not None:
        rows = student.used_ids
        covered = rows < indices.shape[0]
        safe = np.where(covered, rows, 0)
        indices = np.where(covered[:, None], indices[safe], -1)
        weights = np.where(covered[:, None], weights[safe], 0).astype(weights.dtype)
        if row_kind is not None:
            row_kind = np.where(covered, row_kind[safe], ROW_UNUSED).astype(np.uint8)
    if teacher is not None:
        valid = (indices >= 0) & (indices < teacher.vocab_size)
        cols = np.where(valid, teacher._compact[np.where(valid, indices, 0)], -1)
        kept = cols >= 0
        before = weights.sum(axis=1, dtype=np.float64)
        weights = np.where(kept, weights, 0).astype(weights.dtype)
        indices = np.where(kept, cols, -1)
        after = weights.sum(axis=1, dtype=np.float64)
        changed = (after > 0) & (after != before)
        scale = np.where(changed, 1.0 / np.where(after > 0, after, 1.0), 1.0)
        weights = (weights * scale[:, None]).astype(weights.dtype)
    meta = copy.deepcopy(dict(projection.metadata or {}))
    for role, remap in (("student", student), ("teacher", teacher)):
        if remap is not None and isinstance(meta.get(role), dict):
            meta[role].update(fingerprint=remap.fingerprint, vocab_size=remap.size, model_vocab_size=remap.size)
    width = teacher.size if teacher is not None else projection.teacher_width
    return Projection.from_tensors(torch.from_numpy(np.ascontiguousarray(indices)),
                                   torch.from_numpy(np.ascontiguousarray(weights)), teacher_width=width,
                                   metadata=meta, row_kind=None if row_kind is None else torch.from_numpy(row_kind))
