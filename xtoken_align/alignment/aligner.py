"""Chunk alignment: place each side's tokens on a common byte axis, then pair token boundaries.

The flow for a batch (see docs/alignment.md for the definitions):

1. `encode_side`: tokenize every text (or rendered conversation) with one tokenizer and place each
   token on the text's bytes. Positions come from the ids' surface byte lengths (`walk_batch`);
   the tokenizer's own character offsets are read only for samples whose tokens do not spell the
   text (a normalizer changed it: Qwen's NFC on non-NFC text, BERT's lowercasing, `<unk>`).
2. `to_axis`: map positions from the side's own text to the sample's common axis (the text itself;
   for conversations the concatenated message contents, with template scaffolding collapsed to
   zero width).
3. `align_sides`: the pair kernel closes a chunk wherever both sides have a token boundary at the
   same axis position; zero-width tokens (BOS/EOS, scaffolding) are paired by role or bytes.

Everything is flat numpy arrays with per-sample offsets; the numba kernels loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from xtoken_align.alignment import kernels as K
from xtoken_align.alignment.nfc import place_nfc
from xtoken_align.tokenizer import canonical_bytes as cb
from xtoken_align.tokenizer.loader import TokenizerInfo
from xtoken_core.errors import AlignmentError

# Roles zero-width special tokens are paired by, in priority order (a token with several roles,
# e.g. Llama-3's <|eot_id|> = eos and turn_end, is keyed by the first). Codes are index + 1.
ROLE_PRIORITY = ("bos", "turn_start", "role_header_start", "role_header_end", "turn_end", "eos",
                 "user_start", "assistant_start", "think_start", "think_end", "channel", "eos_text",
                 "pad", "unk", "mask")
CHUNK_FIELDS = ("byte_start", "byte_end", "a_start", "a_end", "b_start", "b_end", "correct")


@dataclass(frozen=True)
class SideTables:
    """Per-tokenizer arrays the kernels read (built once per tokenizer, see `side_tables`)."""

    surf_data: np.ndarray  # [N] uint8
    surf_off: np.ndarray  # [V + 1] int64
    special: np.ndarray  # [V] bool
    keys: np.ndarray  # [V] int64
    prefix_ids: tuple[int, ...]  # what the post-processor adds in front of a text (BOS)
    suffix_ids: tuple[int, ...]  # ... and after it (EOS)


_TABLES: dict[tuple[str, str], SideTables] = {}


def side_tables(info: TokenizerInfo) -> SideTables:
    """The kernel tables of `info` (cached by fingerprint and source)."""
    cache_key = (info.fingerprint, info.source)
    if cache_key in _TABLES:
        return _TABLES[cache_key]
    surface = list(info.token_bytes)
    for i, content in info.special_tokens.items():
        surface[i] = content.encode("utf-8")
    surf_data, surf_off = cb.pack(surface)
    data, off = info.packed
    keys = np.empty(info.vocab_size, np.int64)
    K.fnv_keys(data, off, keys)
    keys[info.is_special | info.is_unused] = -1
    for role in reversed(ROLE_PRIORITY):  # highest priority written last
        if role in info.special_roles:
            keys[info.special_roles[role]] = ROLE_PRIORITY.index(role) + 1
    with_special = info.backend.encode("x", add_special_tokens=True).ids
    plain = info.backend.encode("x", add_special_tokens=False).ids
    at = next((k for k in range(len(with_special) - len(plain) + 1)
               if with_special[k:k + len(plain)] == plain), None)
    prefix, suffix = ((), ()) if at is None else (tuple(with_special[:at]),
                                                  tuple(with_special[at + len(plain):]))
    tables = SideTables(surf_data, surf_off, np.ascontiguousarray(info.is_special), keys, prefix,
                        suffix)
    _TABLES[cache_key] = tables
    return tables


@dataclass
class SideBatch:
    """One tokenizer's tokens for a batch, flat. Positions are byte offsets local to each sample:
    in the sample's own text after `encode_side`, on the common axis after `to_axis`."""

    ids: np.ndarray  # [N] int64
    offsets: np.ndarray  # [B + 1] int64: sample b is ids[offsets[b]:offsets[b + 1]]
    starts: np.ndarray  # [N] int64
    ends: np.ndarray  # [N] int64
    faithful: np.ndarray  # [N] bool
    keys: np.ndarray  # [N] int64
    fallback: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [B] not spelled: NFC map / offsets

    @property
    def token_bytes(self) -> np.ndarray:
        """[N] int32: axis bytes each token covers (0 for BOS/EOS, scaffolding, a phantom space)."""
        return (self.ends - self.starts).astype(np.int32)

    def sample(self, b: int) -> slice:
        return slice(int(self.offsets[b]), int(self.offsets[b + 1]))


@dataclass
class PairBatch:
    """The chunk alignment of one (student, teacher) pair for a batch."""

    chunks: np.ndarray  # [C, 7] int64 rows of CHUNK_FIELDS, token indices local to the sample
    offsets: np.ndarray  # [B + 1] int64: sample b's chunks are chunks[offsets[b]:offsets[b + 1]]
    a_chunk: np.ndarray  # [N_a] int64: local chunk index of each student token
    b_chunk: np.ndarray  # [N_b] int64
    a_exact: np.ndarray  # [N_a] bool: token sits in a correct 1:1 chunk
    b_exact: np.ndarray  # [N_b] bool

    def sample_chunks(self, b: int) -> np.ndarray:
        return self.chunks[self.offsets[b]:self.offsets[b + 1]]


def _utf8(texts: list[str]) -> list[bytes]:
    """UTF-8 of each text; a non-string or a lone surrogate (possible in JSON strings) raises a
    one-line `AlignmentError` naming the sample."""
    try:
        return [t.encode("utf-8") for t in texts]
    except (UnicodeEncodeError, AttributeError):
        for b, t in enumerate(texts):
            if not isinstance(t, str):
                raise AlignmentError(f"sample {b}: expected a string, got {type(t).__name__}") from None
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise AlignmentError(f"sample {b}: character {exc.start} is a lone surrogate "
                                     f"U+{ord(t[exc.start]):04X}, not valid Unicode text") from None
        raise


def _char_to_byte(text: str) -> np.ndarray:
    """[len(text) + 1] int64: byte offset of each character offset."""
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    widths = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    out = np.zeros(len(cps) + 1, np.int64)
    np.cumsum(widths, out=out[1:])
    return out


def _with_added(id_lists, add_pre: np.ndarray, add_suf: np.ndarray, prefix: tuple, suffix: tuple):
    """Flat ids with the post-processor's prefix ids added to the samples flagged in `add_pre` and
    its suffix ids to those flagged in `add_suf`: (ids [N], offsets [B + 1], n_pre [B], n_suf [B])."""
    n_pre = np.where(add_pre, len(prefix), 0).astype(np.int64)
    n_suf = np.where(add_suf, len(suffix), 0).astype(np.int64)
    lengths = np.fromiter(map(len, id_lists), np.int64, len(id_lists)) + n_pre + n_suf
    offsets = cb.offsets_from_counts(lengths)
    pre, suf, none = list(prefix), list(suffix), []
    parts = chain.from_iterable((pre if x else none, ids, suf if y else none)
                                for ids, x, y in zip(id_lists, add_pre.tolist(), add_suf.tolist()))
    return np.fromiter(chain.from_iterable(parts), np.int64, int(offsets[-1])), offsets, n_pre, n_suf


def _place_nfc_sample(info, tables, b, text_str, ids, offsets, n_pre, n_suf, starts, ends,
                      faithful) -> bool:
    lo = int(offsets[b] + n_pre[b])
    hi = int(offsets[b + 1] - n_suf[b])
    return place_nfc(ids, lo, hi, text_str, tables, info.prefix_space, starts, ends, faithful)


def _place_by_offsets(info, tables, b, enc, text_str, n_bytes, ids, offsets, n_pre, n_suf, text,
                      text_off, byte_starts, starts, ends, faithful, given=False) -> None:
    """Fallback placement of sample b from the tokenizer's character offsets (`enc`)."""
    lo = int(offsets[b] + n_pre[b])
    hi = int(offsets[b + 1] - n_suf[b])
    if enc.ids != ids[lo:hi].tolist():
        if given:
            raise AlignmentError(f"{info.name}: the given ids of sample {b} are not this tokenizer's tokenization "
                                 "of its text (a teacher cache built from other data or another tokenizer?)")
        raise AlignmentError(f"{info.name}: tokenizing sample {b} twice gave different ids")
    c2b = _char_to_byte(text_str)
    char_starts = np.asarray(enc.offsets, np.int64).reshape(-1, 2)[:, 0]
    byte_starts[lo:hi] = c2b[np.minimum(char_starts, len(c2b) - 1)]
    K.place_by_offsets(ids, lo, hi, byte_starts, tables.surf_data, tables.surf_off,
                       tables.special, info.prefix_space, text, int(text_off[b]),
                       int(text_off[b + 1]), starts, ends, faithful)
    if lo == hi and offsets[b + 1] > offsets[b]:
        # The tokenizer dropped the whole text (BERT on whitespace): its added tokens cover it,
        # the first suffix token (EOS) holding the bytes, unfaithful.
        holder = lo if n_suf[b] else lo - 1
        starts[offsets[b]:offsets[b + 1]] = 0
        ends[offsets[b]:holder + 1] = 0
        ends[holder:offsets[b + 1]] = n_bytes
        starts[holder + 1:offsets[b + 1]] = n_bytes


def encode_side(info: TokenizerInfo, texts: list[str], *, add_special_tokens=True
                ) -> tuple[SideBatch, list[bytes]]:
    """Tokenize `texts` and place every token on its text's bytes.

    With `add_special_tokens` (a bool, or one bool per text) the tokenizer's post-processor tokens
    (BOS/EOS) are added at zero width, except to empty texts (an empty text has no tokens and no
    chunks). Returns the side and the texts' UTF-8 bytes.
    """
    add = np.broadcast_to(np.asarray(add_special_tokens, bool), (len(texts),))
    side, raw, _ = encode_parts(info, texts, add_prefix=add, add_suffix=add)
    return side, raw


def encode_parts(info: TokenizerInfo, texts: list[str], *, add_prefix, add_suffix, force_offsets=False,
                 given_ids: list | None = None) -> tuple[SideBatch, list[bytes], np.ndarray]:
    """`encode_side` with the prefix (BOS) and suffix (EOS) tokens chosen separately (bools, or one
    per text; never added to an empty text), as the windows of a longer text need
    (`alignment.windows`). `force_offsets` (per text) places those texts from the tokenizer's
    offsets even where the tokens spell the text, as the whole text is placed when any part of it
    needs that fallback. `given_ids` (one id sequence per text, without the prefix/suffix tokens):
    place these ids instead of tokenizing (`encode_ids`); a text they do not spell is re-encoded
    for the tokenizer's offsets, and ids that differ from that encoding raise. Also returns
    `[B] bool`: the texts placed from the offsets."""
    tables = side_tables(info)
    raw = _utf8(texts)
    if given_ids is None:
        id_lists = [e.ids for e in info.backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        if len(given_ids) != len(texts):
            raise AlignmentError(f"{info.name}: {len(given_ids)} id sequences given for {len(texts)} texts")
        id_lists = [np.asarray(x, np.int64).tolist() for x in given_ids]
    nonempty = np.array([len(r) > 0 for r in raw], bool)
    add_pre = np.broadcast_to(np.asarray(add_prefix, bool), (len(texts),)) & nonempty
    add_suf = np.broadcast_to(np.asarray(add_suffix, bool), (len(texts),)) & nonempty
    force = np.broadcast_to(np.asarray(force_offsets, bool), (len(texts),))
    ids, offsets, n_pre, n_suf = _with_added(id_lists, add_pre, add_suf, tables.prefix_ids, tables.suffix_ids)
    text = np.frombuffer(b"".join(raw), np.uint8)
    text_off = np.zeros(len(raw) + 1, np.int64)
    np.cumsum([len(r) for r in raw], out=text_off[1:])
    n = len(ids)
    starts = np.empty(n, np.int64)
    ends = np.empty(n, np.int64)
    faithful = np.empty(n, np.bool_)
    ok = np.empty(len(texts), np.bool_)
    if n and (int(ids.max()) >= info.vocab_size or int(ids.min()) < 0):
        raise AlignmentError(f"{info.name}: the tokenizer produced id {int(ids.max())} outside its "
                             f"vocabulary of {info.vocab_size}")
    K.walk_batch(ids, offsets, n_pre, n_suf, tables.surf_data, tables.surf_off, tables.special,
                 info.prefix_space, text, text_off, starts, ends, faithful, ok)
    failed = np.flatnonzero(~ok & ~force).tolist()
    if failed and info.exactness == "exact_nfc":  # tokens spell NFC(text): map, no re-tokenizing
        failed = [b for b in failed if not _place_nfc_sample(info, tables, b, texts[b], ids, offsets,
                                                             n_pre, n_suf, starts, ends, faithful)]
    failed = sorted(failed + np.flatnonzero(force).tolist())
    if failed:  # a normalizer changed the text: use the tokenizer's own offsets for those samples
        again = info.backend.encode_batch([texts[b] for b in failed], add_special_tokens=False)
        byte_starts = np.zeros(n, np.int64)
        for b, enc in zip(failed, again):
            _place_by_offsets(info, tables, b, enc, texts[b], len(raw[b]), ids, offsets, n_pre,
                              n_suf, text, text_off, byte_starts, starts, ends, faithful, given_ids is not None)
    by_offsets = np.zeros(len(texts), bool)
    by_offsets[failed] = True
    side = SideBatch(ids, offsets, starts, ends, faithful, tables.keys[ids], fallback=~ok)
    return side, raw, by_offsets


def encode_ids(info: TokenizerInfo, texts: list[str], ids: list, *, add_special_tokens=True
               ) -> tuple[SideBatch, list[bytes]]:
    """`encode_side` for texts already tokenized: `ids[b]` is text b's full tokenization as
    `encode_side` makes it (the post-processor's prefix/suffix tokens included where
    `add_special_tokens`, a bool or one per text, asks for them; none for an empty text), placed on
    the text's bytes without tokenizing it again (except where the tokenizer's offsets are needed,
    and then the ids must equal the tokenizer's). Ids that do not fit raise `AlignmentError`."""
    tables = side_tables(info)
    add = np.broadcast_to(np.asarray(add_special_tokens, bool), (len(texts),))
    pre, suf = list(tables.prefix_ids), list(tables.suffix_ids)
    core = []
    for b, (text, seq) in enumerate(zip(texts, ids)):
        seq = np.asarray(seq, np.int64).tolist()
        if add[b] and text:
            if seq[:len(pre)] != pre or len(seq) < len(pre) + len(suf) or (suf and seq[len(seq) - len(suf):] != suf):
                raise AlignmentError(f"{info.name}: the given ids of sample {b} do not start with {pre} and end with "
                                     f"{suf}, the tokens its post-processor adds")
            seq = seq[len(pre):len(seq) - len(suf)]
        core.append(seq)
    side, raw, _ = encode_parts(info, texts, add_prefix=add, add_suffix=add, given_ids=core)
    return side, raw


def to_axis(side: SideBatch, segments: list[np.ndarray]) -> SideBatch:
    """Map a side's positions from each sample's own text to its common axis.

    `segments[b]` is an `[S, 3]` int64 array of content segments `(text_start, text_end,
    axis_start)`, in order; positions outside them collapse onto the axis start of the next
    content. A token is faithful on the axis only if it was faithful and lies inside one content
    segment.
    """
    starts = side.starts.copy()
    ends = side.ends.copy()
    faithful = side.faithful.copy()
    for b, seg in enumerate(segments):
        sl = side.sample(b)
        if sl.start == sl.stop:
            continue
        s, e = side.starts[sl], side.ends[sl]
        if len(seg) == 0:
            starts[sl] = 0
            ends[sl] = 0
            faithful[sl] = False
            continue
        rs, re_, ax = seg[:, 0], seg[:, 1], seg[:, 2]
        starts[sl] = _map_positions(s, rs, re_, ax)
        ends[sl] = _map_positions(e, rs, re_, ax)
        k = np.searchsorted(rs, s, side="right") - 1
        inside = (k >= 0) & (e <= re_[np.maximum(k, 0)]) & (e > s)
        faithful[sl] &= inside
    return SideBatch(side.ids, side.offsets, starts, ends, faithful, side.keys, side.fallback)


def _map_positions(pos: np.ndarray, rs: np.ndarray, re_: np.ndarray, ax: np.ndarray) -> np.ndarray:
    k = np.searchsorted(rs, pos, side="right") - 1
    kk = np.maximum(k, 0)
    inside = np.minimum(pos, re_[kk]) - rs[kk]
    return np.where(k < 0, 0, ax[kk] + inside)


def align_sides(a: SideBatch, b: SideBatch) -> PairBatch:
    """The chunk alignment of two sides placed on the same axes."""
    if len(a.offsets) != len(b.offsets):
        raise AlignmentError(f"cannot align batches of {len(a.offsets) - 1} and "
                             f"{len(b.offsets) - 1} samples")
    cap = len(a.ids) + len(b.ids)
    chunks = np.empty((cap, 7), np.int64)
    c_off = np.empty(len(a.offsets), np.int64)
    a_chunk = np.full(len(a.ids), -1, np.int64)
    b_chunk = np.full(len(b.ids), -1, np.int64)
    a_exact = np.zeros(len(a.ids), np.bool_)
    b_exact = np.zeros(len(b.ids), np.bool_)
    bad = K.pair_batch(a.starts, a.ends, a.faithful, a.keys, a.offsets, b.starts, b.ends,
                       b.faithful, b.keys, b.offsets, chunks, c_off, a_chunk, b_chunk, a_exact,
                       b_exact)
    if bad >= 0:
        raise AlignmentError(f"sample {bad}: the two tokenizations do not cover the same bytes "
                             f"(internal placement error; please report it with the text)")
    return PairBatch(chunks[:c_off[-1]], c_off, a_chunk, b_chunk, a_exact, b_exact)


def plain_segments(raw: list[bytes]) -> list[np.ndarray]:
    """Axis segments of plain texts: the whole text, identity-mapped."""
    return [np.array([[0, len(r), 0]], np.int64) for r in raw]


@dataclass(frozen=True)
class Alignment:
    """The alignment of one text between tokenizers a and b (a convenience view for tools/tests)."""

    text_bytes: bytes
    a_ids: np.ndarray
    b_ids: np.ndarray
    a_token_bytes: np.ndarray
    b_token_bytes: np.ndarray
    chunks: np.ndarray  # [C, 7] rows of CHUNK_FIELDS

    def as_json(self) -> dict:
        """The `xtoken-align align --json` record of this text."""
        return {"bytes": len(self.text_bytes), "student_tokens": len(self.a_ids),
                "teacher_tokens": len(self.b_ids), "chunks": self.chunks.tolist()}


def align_texts(a: TokenizerInfo, b: TokenizerInfo, texts: list[str], *,
                add_special_tokens: bool = True) -> list[Alignment]:
    """Align each text between tokenizers a and b (no truncation)."""
    sa, raw = encode_side(a, texts, add_special_tokens=add_special_tokens)
    sb, _ = encode_side(b, texts, add_special_tokens=add_special_tokens)
    pair = align_sides(sa, sb)
    ta, tb = sa.token_bytes, sb.token_bytes
    return [Alignment(raw[i], sa.ids[sa.sample(i)], sb.ids[sb.sample(i)], ta[sa.sample(i)],
                      tb[sb.sample(i)], pair.sample_chunks(i)) for i in range(len(texts))]


def align_text(a: TokenizerInfo, b: TokenizerInfo, text: str, *,
               add_special_tokens: bool = True) -> Alignment:
    """Align one text between tokenizers a and b."""
    return align_texts(a, b, [text], add_special_tokens=add_special_tokens)[0]
