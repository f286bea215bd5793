"""The collator API: a batch of texts or conversations -> the CONTRACTS §2 training batch.

    collator = AlignmentCollator(student, [teacher_a, teacher_b], CollateConfig(max_length=2048))
    batch = collator(["some text", ...])          # or conversations: [[{"role", "content"}, ...]]

Steps: tokenize every side (`alignment.encode_side`), put conversations on their common axis
(`alignment_chat`), align the student with each cross-tokenizer teacher (`alignment.align_sides`),
truncate all sides at one shared chunk boundary (`truncate`), pad into tensors (`to_tensors`).
A teacher whose fingerprint equals the student's is same-vocab: it reads the student's
`input_ids` and gets no token or alignment keys of its own. Every side's tokenizer fingerprint is
recorded per row (`tokenizer_fingerprint`, `teacher_{i}_tokenizer_fingerprint`, `[B]` int64; see
`xtoken_core.fingerprints`), so a loss can refuse a projection built for other tokenizers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from xtoken_align.alignment import kernels as K
from xtoken_align.alignment.aligner import (
    PairBatch,
    SideBatch,
    align_sides,
    encode_ids,
    encode_side,
    plain_segments,
    to_axis,
)
from xtoken_align.alignment.chat import common_messages, common_segments, render_conversation
from xtoken_align.tokenizer.canonical_bytes import offsets_from_counts
from xtoken_align.tokenizer.loader import TokenizerInfo
from xtoken_core import fingerprints
from xtoken_core.config import MAX_TOKENS, Config, config, option
from xtoken_core.errors import AlignmentError, ConfigError


class CollateConfigError(ConfigError, AlignmentError):
    """An invalid `CollateConfig` field (a `ConfigError`; also an `AlignmentError`, which it was
    before the configs shared one design)."""


@config
class CollateConfig(Config):
    """Options of the collator, validated when built (`xtoken_core.config`).

    add_special_tokens applies to plain texts; conversations take theirs from the chat template.
    """

    error_type: ClassVar[type[ConfigError]] = CollateConfigError

    max_length: int | None = option(None, min=1, max=MAX_TOKENS,
                                    help="Student token budget per sample (None: no truncation); every side is "
                                         "cut at one shared chunk boundary.")
    teacher_max_length: int | None = option(None, min=1, max=MAX_TOKENS,
                                            help="Each teacher's token budget (None: same as max_length).")
    add_special_tokens: bool = option(True, help="Add each tokenizer's post-processor tokens (BOS/EOS) to plain "
                                                 "texts, as tokenizer(text) does.")
    text_field: str = option("text", help="Key read for a text when samples are dicts.")
    messages_field: str = option("messages", help="Key read for a conversation when samples are dicts.")
    train_on: Literal["all", "assistant"] = option(
        "all", help="Which tokens are training targets: 'all', or 'assistant' (conversations: only the "
                    "student tokens inside assistant messages' contents, written as the batch key "
                    "`target_mask`, and only the chunks inside them; plain texts stay all trained).")

    @property
    def teacher_budget(self) -> int | None:
        return self.teacher_max_length if self.teacher_max_length is not None else self.max_length


@dataclass
class AlignedBatch:
    """A batch before padding: the student's tokens, each teacher's (None: same-vocab) and each
    pair's alignment, flat (see `alignment.SideBatch`, `alignment.PairBatch`)."""

    student: SideBatch
    teachers: list[SideBatch | None]
    pairs: list[PairBatch | None]
    num_bytes: np.ndarray  # [B] int64: axis bytes of each sample
    # the tokenizers aligned (TokenizerInfo.fingerprint; None: not known, no batch key written)
    student_fingerprint: str | None = None
    teacher_fingerprints: list[str | None] | None = None  # one per teacher, same-vocab ones included
    # train_on="assistant": per sample, the `[R, 2]` int64 axis byte ranges `[start, end)` of the
    # trained message contents (None: the whole sample is trained); None: no target_mask written
    trained: list[np.ndarray | None] | None = None


def _sample_input(sample, config: CollateConfig):
    """('text', str) or ('chat', messages) for one sample."""
    if isinstance(sample, str):
        return "text", sample
    if isinstance(sample, list):
        return "chat", sample
    if isinstance(sample, dict):
        if config.messages_field in sample and isinstance(sample[config.messages_field], list):
            return "chat", sample[config.messages_field]
        if isinstance(sample.get(config.text_field), str):
            return "text", sample[config.text_field]
        raise AlignmentError(f"sample has neither a string {config.text_field!r} nor a list "
                             f"{config.messages_field!r} (keys: {sorted(sample)[:8]})")
    raise AlignmentError(f"a sample must be a str, a conversation (list of messages) or a dict, "
                         f"got {type(sample).__name__}")


def _encode_all(distinct: dict[str, TokenizerInfo], texts: dict[str, list[str]], add: np.ndarray,
                given_ids: dict[str, list] | None = None) -> dict[str, tuple[SideBatch, list[bytes]]]:
    """`encode_side` for every distinct tokenizer (`encode_ids` for those in `given_ids`). With two
    or more, the first (the student) is encoded on this thread while one helper thread encodes the
    others: the tokenizers library releases the GIL and the kernels run without it, so one side's
    placement overlaps the other side's tokenization. A fresh thread per call (no pool), so forked
    data-loader workers are safe."""
    items = list(distinct.items())
    out: dict[str, tuple[SideBatch, list[bytes]]] = {}
    given_ids = given_ids or {}

    def encode(fp, info):
        if fp in given_ids:
            return encode_ids(info, texts[fp], given_ids[fp], add_special_tokens=add)
        return encode_side(info, texts[fp], add_special_tokens=add)

    if len(items) == 1:
        fp, info = items[0]
        return {fp: encode(fp, info)}
    failure: list[BaseException] = []

    def others():
        try:
            for fp, info in items[1:]:
                out[fp] = encode(fp, info)
        except BaseException as exc:  # re-raised on the calling thread
            failure.append(exc)

    helper = threading.Thread(target=others, name="xtoken-encode", daemon=True)
    helper.start()
    try:
        fp, info = items[0]
        first = encode(fp, info)
    finally:
        helper.join()
    if failure:
        raise failure[0]
    return {fp: first, **{k: out[k] for k, _ in items[1:]}}


def align_batch(samples: list, student: TokenizerInfo, teachers: list[TokenizerInfo],
                config: CollateConfig = CollateConfig(), given_ids: dict[str, list] | None = None) -> AlignedBatch:
    """Tokenize and align a batch (no truncation, no padding). `given_ids`: tokenizer fingerprint ->
    one id sequence per sample, that side's full tokenization known already (a teacher cache's),
    placed without tokenizing again (`alignment.encode_ids`)."""
    inputs = [_sample_input(s, config) for s in samples]
    chat = np.array([kind == "chat" for kind, _ in inputs], bool)
    distinct: dict[str, TokenizerInfo] = {student.fingerprint: student}
    for t in teachers:
        distinct.setdefault(t.fingerprint, t)
    texts: dict[str, list[str]] = {}
    located: dict[str, list] = {}
    for fp, info in distinct.items():
        texts[fp], located[fp] = [], []
        for kind, value in inputs:
            if kind == "chat":
                rendered, loc = render_conversation(info, value)
                texts[fp].append(rendered)
                located[fp].append(loc)
            else:
                texts[fp].append(value)
                located[fp].append(None)
    encoded = _encode_all(distinct, texts, config.add_special_tokens & ~chat, given_ids)
    sides: dict[str, SideBatch] = {fp: side for fp, (side, _) in encoded.items()}
    segments: dict[str, list[np.ndarray]] = {fp: plain_segments(raw) for fp, (_, raw) in encoded.items()}
    num_bytes = np.array([len(r) for r in encoded[student.fingerprint][1]], np.int64)
    trained: list[np.ndarray | None] | None = [None] * len(samples) if config.train_on == "assistant" else None
    for b in np.flatnonzero(chat):
        per_side = common_segments([located[fp][b] for fp in distinct])
        for fp, seg in zip(distinct, per_side):
            segments[fp][b] = seg
        num_bytes[b] = int((per_side[0][:, 1] - per_side[0][:, 0]).sum())
        if trained is not None:
            trained[b] = _assistant_ranges(inputs[b][1], common_messages([located[fp][b] for fp in distinct]),
                                           per_side[0])
    if chat.any():
        sides = {fp: to_axis(side, segments[fp]) for fp, side in sides.items()}
    s_side = sides[student.fingerprint]
    pairs: dict[str, PairBatch] = {fp: align_sides(s_side, side) for fp, side in sides.items()
                                   if fp != student.fingerprint}
    return AlignedBatch(
        student=s_side,
        teachers=[None if t.fingerprint == student.fingerprint else sides[t.fingerprint] for t in teachers],
        pairs=[None if t.fingerprint == student.fingerprint else pairs[t.fingerprint] for t in teachers],
        num_bytes=num_bytes,
        student_fingerprint=student.fingerprint,
        teacher_fingerprints=[t.fingerprint for t in teachers],
        trained=trained,
    )


def _assistant_ranges(messages: list[dict], kept: list[int], segments: np.ndarray) -> np.ndarray:
    """`[R, 2]` axis byte ranges of the assistant contents among the messages on the axis (`kept`,
    row for row of `segments`, the `(render start, render end, axis start)` rows)."""
    rows = [k for k, i in enumerate(kept) if messages[i]["role"] == "assistant"]
    seg = segments[rows]
    return np.stack([seg[:, 2], seg[:, 2] + seg[:, 1] - seg[:, 0]], axis=1).astype(np.int64).reshape(-1, 2)


def _inside(ranges: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """`[N]` bool: span `[starts, ends)` is non-empty and lies inside one of the sorted, disjoint
    `ranges [R, 2]`."""
    if len(ranges) == 0:
        return np.zeros(len(starts), np.bool_)
    k = np.searchsorted(ranges[:, 0], starts, side="right") - 1
    kk = np.maximum(k, 0)
    return (k >= 0) & (ends > starts) & (ends <= ranges[kk, 1])


def target_flags(trained: list[np.ndarray | None], offsets: np.ndarray, starts: np.ndarray, ends: np.ndarray
                 ) -> np.ndarray:
    """`[N]` bool over a flat per-sample array of spans (tokens or chunks, `offsets [B + 1]`): the
    span is trained (its sample is all trained, or the span lies inside a trained range)."""
    out = np.ones(int(offsets[-1]), np.bool_)
    for b, ranges in enumerate(trained):
        if ranges is not None:
            sl = slice(int(offsets[b]), int(offsets[b + 1]))
            out[sl] = _inside(ranges, starts[sl], ends[sl])
    return out


def _keep_prefix_mask(offsets: np.ndarray, keep: np.ndarray) -> np.ndarray:
    lengths = np.diff(offsets)
    local = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    return local < np.repeat(keep, lengths)



def _cut_side(side: SideBatch, keep: np.ndarray) -> tuple[SideBatch, np.ndarray]:
    mask = _keep_prefix_mask(side.offsets, keep)
    return SideBatch(side.ids[mask], offsets_from_counts(keep), side.starts[mask], side.ends[mask],
                     side.faithful[mask], side.keys[mask], side.fallback), mask


def truncate(batch: AlignedBatch, max_length: int | None, teacher_max_length: int | None = None
             ) -> AlignedBatch:
    """Cut every sample at the last byte position that is a chunk boundary of every pair with the
    student within `max_length` tokens and each teacher within `teacher_max_length` (default: the
    same). All sides then cover the same bytes. A sample whose first chunk is already over budget
    becomes empty."""
    if max_length is None and teacher_max_length is None:
        return batch
    big = np.iinfo(np.int64).max
    max_s = big if max_length is None else max_length
    max_t = big if teacher_max_length is None else teacher_max_length
    s = batch.student
    n_s = np.diff(s.offsets)
    b_count = len(n_s)
    valid = np.ones(s.offsets[-1] + b_count, np.bool_)
    cross = [p for p in batch.pairs if p is not None]
    for p in cross:
        K.valid_cuts(p.chunks, p.offsets, s.offsets, max_s, max_t, valid)
    if not cross:  # student alone: any token boundary
        keep_s = np.minimum(n_s, max_s)
        ends_excl = np.concatenate([[0], np.cumsum(s.token_bytes, dtype=np.int64)])
        num_bytes = ends_excl[s.offsets[:-1] + keep_s] - ends_excl[s.offsets[:-1]]
    else:
        base = s.offsets[:-1] + np.arange(b_count)
        keep_s = np.array([np.flatnonzero(valid[base[b]:base[b] + n_s[b] + 1]).max()
                           for b in range(b_count)], np.int64)
        num_bytes = None
    s_new, s_mask = _cut_side(s, keep_s)
    teachers, pairs = [], []
    cut_cache: dict[int, tuple] = {}
    for side, p in zip(batch.teachers, batch.pairs):
        if p is None:
            teachers.append(None)
            pairs.append(None)
            continue
        if id(p) not in cut_cache:
            keep_t = np.empty(b_count, np.int64)
            keep_c = np.empty(b_count, np.int64)
            keep_bytes = np.empty(b_count, np.int64)
            K.cut_pair(p.chunks, p.offsets, keep_s, max_t, keep_t, keep_c, keep_bytes)
            t_new, t_mask = _cut_side(side, keep_t)
            c_mask = _keep_prefix_mask(p.offsets, keep_c)
            p_new = PairBatch(p.chunks[c_mask], offsets_from_counts(keep_c), p.a_chunk[s_mask],
                              p.b_chunk[t_mask], p.a_exact[s_mask], p.b_exact[t_mask])
            cut_cache[id(p)] = (t_new, p_new, keep_bytes)
        t_new, p_new, keep_bytes = cut_cache[id(p)]
        if num_bytes is None:
            num_bytes = keep_bytes
        elif not np.array_equal(num_bytes, keep_bytes):
            raise AlignmentError("truncation found different byte cuts for two teachers "
                                 "(internal error; please report it)")
        teachers.append(t_new)
        pairs.append(p_new)
    return AlignedBatch(s_new, teachers, pairs, np.asarray(num_bytes, np.int64), batch.student_fingerprint,
                        batch.teacher_fingerprints, batch.trained)


class _Padder:
    """Scatter flat per-sample arrays into right-padded `[B, T]` tensors; the index arrays of each
    offsets array are computed once per batch."""

    def __init__(self):
        self._index: dict[int, tuple] = {}

    def __call__(self, flat: np.ndarray, offsets: np.ndarray, fill, dtype) -> torch.Tensor:
        key = id(offsets)
        if key not in self._index:
            lengths = np.diff(offsets)
            width = max(1, int(lengths.max()) if len(lengths) else 1)
            rows = np.repeat(np.arange(len(lengths)), lengths)
            flat_index = rows * width + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths))
            self._index[key] = (offsets, len(lengths), width, flat_index)  # keeps offsets alive
        _, b, width, flat_index = self._index[key]
        if len(flat) >= 64 * b:  # long rows: slice copies (one pass over memory) beat a scatter
            out = np.empty((b, width), dtype=dtype)
            for row in range(b):
                n = offsets[row + 1] - offsets[row]
                out[row, :n] = flat[offsets[row]:offsets[row + 1]]
                out[row, n:] = fill
        else:
            out = np.full((b, width), fill, dtype=dtype)
            out.reshape(-1)[flat_index] = flat
        return torch.from_numpy(out)

    def mask(self, offsets: np.ndarray) -> torch.Tensor:
        """`[B, T]` bool: position holds a real element."""
        lengths = np.diff(offsets)
        width = max(1, int(lengths.max()) if len(lengths) else 1)
        return torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])


def pad_id(info: TokenizerInfo) -> int:
    """The id padding uses: the pad token, else EOS, else 0 (padding is masked anyway)."""
    roles = info.special_roles
    return int(roles.get("pad", roles.get("eos", 0)))


def to_tensors(batch: AlignedBatch, student_pad_id: int = 0,
               teacher_pad_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The CONTRACTS §2 dict, padded on the right (every padded axis at least 1 wide)."""
    s = batch.student
    n_s = np.diff(s.offsets)
    _pad = _Padder()
    out: dict[str, torch.Tensor] = {
        "input_ids": _pad(s.ids, s.offsets, student_pad_id, np.int64),  # [B, T_s]
        "token_mask": _pad.mask(s.offsets),
        "sample_mask": torch.from_numpy(n_s > 0),  # [B]
        "token_bytes": _pad(s.token_bytes, s.offsets, 0, np.int32),
        "num_bytes": torch.from_numpy(np.asarray(batch.num_bytes, np.int64)),
    }
    if batch.trained is not None:  # [B, T_s] bool: token is a training target (train_on="assistant")
        out["target_mask"] = _pad(target_flags(batch.trained, s.offsets, s.starts, s.ends), s.offsets, False,
                                  np.bool_)
    rows = len(n_s)
    if batch.student_fingerprint is not None:
        out[fingerprints.STUDENT_KEY] = _fingerprint_rows(batch.student_fingerprint, rows)  # [B]
    teacher_fps = batch.teacher_fingerprints or [None] * len(batch.teachers)
    for i, (t, p) in enumerate(zip(batch.teachers, batch.pairs)):
        if teacher_fps[i] is not None:  # same-vocab teachers too: the key says which tokenizer they share
            out[fingerprints.teacher_key(i)] = _fingerprint_rows(teacher_fps[i], rows)  # [B]
        if p is None:
            continue
        fill = teacher_pad_ids[i] if teacher_pad_ids else 0
        out[f"teacher_{i}_input_ids"] = _pad(t.ids, t.offsets, fill, np.int64)  # [B, T_t]
        out[f"teacher_{i}_token_mask"] = _pad.mask(t.offsets)
        out[f"teacher_{i}_token_bytes"] = _pad(t.token_bytes, t.offsets, 0, np.int32)
        a = f"alignment_{i}_"
        out[a + "student_chunk_id"] = _pad(p.a_chunk, s.offsets, -1, np.int64)  # [B, T_s]
        out[a + "teacher_chunk_id"] = _pad(p.b_chunk, t.offsets, -1, np.int64)  # [B, T_t]
        if batch.trained is None:
            out[a + "pair_valid"] = _pad.mask(p.offsets)  # [B, P]
        else:  # chunks outside the trained bytes are not loss units
            out[a + "pair_valid"] = _pad(target_flags(batch.trained, p.offsets, p.chunks[:, 0], p.chunks[:, 1]),
                                         p.offsets, False, np.bool_)
        out[a + "pair_is_correct"] = _pad(p.chunks[:, 6].astype(bool), p.offsets, False, np.bool_)
        out[a + "chunk_bytes"] = _pad((p.chunks[:, 1] - p.chunks[:, 0]).astype(np.int32), p.offsets,
                                      0, np.int32)
        out[a + "num_chunks"] = torch.from_numpy(np.diff(p.offsets).astype(np.int64))  # [B]
        out[a + "student_exact_partition_mask"] = _pad(p.a_exact, s.offsets, False, np.bool_)
        out[a + "teacher_exact_partition_mask"] = _pad(p.b_exact, t.offsets, False, np.bool_)
    return out


def _fingerprint_rows(fingerprint: str, rows: int) -> torch.Tensor:
    """`[rows]` int64: the batch form of a tokenizer fingerprint (`xtoken_core.fingerprints`)."""
    return torch.full((rows,), fingerprints.fingerprint_id(fingerprint), dtype=torch.int64)


class AlignmentCollator:
    """Callable collator: `collator(samples) -> dict[str, torch.Tensor]` (CONTRACTS §2).

    Samples are plain strings, conversations (lists of `{"role", "content"}` messages) or dicts
    holding either under `config.text_field` / `config.messages_field`.
    """

    def __init__(self, student: TokenizerInfo, teachers: list[TokenizerInfo],
                 config: CollateConfig = CollateConfig()):
        self.student = student
        self.teachers = list(teachers)
        self.config = config
        for info in (student, *self.teachers):  # so a loss refusing a batch can name its tokenizers
            fingerprints.register_name(info.fingerprint, info.name)

    def align(self, samples: list) -> AlignedBatch:
        """Aligned and truncated, not yet padded."""
        batch = align_batch(samples, self.student, self.teachers, self.config)
        return truncate(batch, self.config.max_length, self.config.teacher_budget)

    def __call__(self, samples: list) -> dict[str, torch.Tensor]:
        return to_tensors(self.align(samples), pad_id(self.student),
                          [pad_id(t) for t in self.teachers])


def collate(samples: list, student: TokenizerInfo, teachers: list[TokenizerInfo], **options
            ) -> dict[str, torch.Tensor]:
    """One-call form of `AlignmentCollator(student, teachers, CollateConfig(**options))(samples)`."""
    return AlignmentCollator(student, teachers, CollateConfig(**options))(samples)
