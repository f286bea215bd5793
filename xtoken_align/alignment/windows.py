"""Long texts aligned in windows, with the chunks of aligning them whole.

Tokenizing a 20 MB text at once holds every token of both sides in the tokenizer's encodings,
Python lists and numpy arrays at the same time (gigabytes). `align_long` instead walks the text in
windows of about `WINDOW_CHARS` characters (256 KiB) and yields the alignment a piece at a time, so memory
follows the window, not the text. The pieces are exactly the whole text's alignment (same tokens,
positions, faithfulness and chunks), because a window boundary is placed only where that holds:

- a *cut* is a byte position where both sides have a token boundary, no zero-width token sits, and
  the text is at a character boundary; preferably at a space before a word (`" word"`: a pre-token
  boundary of byte-level BPE regexes, and a SentencePiece `▁` that needs no phantom prefix), else
  after a newline, else anywhere;
- the window runs `OVERLAP_CHARS` past the cut; the text from the cut is tokenized again on its
  own (a short window starting there), and the cut is taken only if both tokenizations agree token
  for token (ids, byte spans, faithfulness) on both sides over the first half of the overlap: one
  starts well before the cut, the other at it, and they end at different places, so neither a
  tokenizer's start-of-text behaviour (a phantom prefix space, a pre-token split inside a word) nor
  the end of a window (a pre-token cut short) can reach the kept tokens unseen;
- a candidate that fails is replaced by the next one (earlier in the window); when none passes,
  the window doubles (up to the rest of the text, which is then the whole remainder, exact);
- BOS is added only to the first window and EOS only to the last, as on the whole text;
- placement fallbacks are per text in `aligner.encode_side` (the tokenizer's offsets for a text a
  normalizer changed). If a window of a side needs the offsets fallback, the whole text would have
  used it everywhere: the text is started again with that side placed from offsets in every
  window, and `align_long` yields `RESTART` first (consumers drop what they have of the text).
  The NFC mapping needs no such restart: where tokens spell the text it places them as the walk.

Conversations are not windowed (a chat's scaffolding is small; its contents are rendered whole).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from xtoken_align.alignment.aligner import PairBatch, SideBatch, align_sides, encode_parts
from xtoken_align.tokenizer.loader import TokenizerInfo

LONG_TEXT_CHARS = 1 << 20  # texts of more characters are windowed; the others are aligned whole
WINDOW_CHARS = 1 << 18  # characters per window (a cut falls in its second half)
OVERLAP_CHARS = 1 << 15  # how far each window runs past its cut; the first half is compared
MAX_CANDIDATES = 6  # cuts tried per window before the window doubles
_SCAN = 20_000  # common boundaries looked at per window (latest first) for the candidates
RESTART = None  # yielded by `align_long` when it starts the text again (see the module docstring)


def is_long(text) -> bool:
    """Whether `text` is a str of more than `LONG_TEXT_CHARS` characters (the `align` command
    aligns those with `align_long`)."""
    return isinstance(text, str) and len(text) > LONG_TEXT_CHARS


@dataclass
class Piece:
    """One stretch of a long text's alignment: a `SideBatch` of one sample per side and the chunks
    between them, with byte positions and token indices of the whole text (`a` = student)."""

    a: SideBatch
    b: SideBatch
    pair: PairBatch  # chunks [C, 7] with whole-text bytes and token indices; a/b_chunk whole-text
    num_bytes: int  # bytes of this stretch


@dataclass
class _Window:
    """Both sides of `text[lo:hi]` (characters), positions local to the window."""

    lo: int
    hi: int
    sides: list[SideBatch]
    raw: bytes
    by_offsets: list[bool]


def _encode(infos, text: str, lo: int, hi: int, add_special: bool, force: list[bool]) -> _Window:
    """Both sides of `text[lo:hi]`; the teacher on a helper thread (tokenizers and the placement
    kernels release the GIL), as the collator does."""
    piece = text[lo:hi]
    results: list = [None, None]

    def encode(i: int) -> None:
        try:
            results[i] = encode_parts(infos[i], [piece], add_prefix=add_special and lo == 0,
                                      add_suffix=add_special and hi == len(text), force_offsets=force[i])
        except BaseException as exc:  # re-raised on the calling thread
            results[i] = exc

    helper = threading.Thread(target=encode, args=(1,), name="xtoken-window", daemon=True)
    helper.start()
    try:
        encode(0)
    finally:
        helper.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    sides = [r[0] for r in results]
    return _Window(lo, hi, sides, results[0][1][0], [bool(r[2][0]) for r in results])


def _in_sorted(x: np.ndarray, sorted_y: np.ndarray) -> np.ndarray:
    """[len(x)] bool: whether each value of x is in the sorted array `sorted_y`."""
    if len(sorted_y) == 0:
        return np.zeros(len(x), bool)
    at = np.minimum(np.searchsorted(sorted_y, x), len(sorted_y) - 1)
    return sorted_y[at] == x


def _candidates(w: _Window, text: str, lo_char: int, hi_char: int) -> list[tuple[int, int]]:
    """Cut candidates `(byte, char)` in `w` between characters `lo_char` and `hi_char` (absolute),
    best first: both sides end a token there and start a nonzero-width one, no zero-width token
    sits there, it is a character boundary; preferred: a space before a letter after a non-space,
    then after a newline; latest first within each class."""
    buf = np.frombuffer(w.raw, np.uint8)
    lead = (buf & 0xC0) != 0x80  # UTF-8 lead bytes: character starts
    char_at = np.cumsum(lead) - 1  # [bytes] character index (in the window) of each byte
    common = None
    for s in w.sides:
        nonzero = s.ends > s.starts
        pos = s.ends[nonzero]  # strictly increasing: the spans tile the window
        pos = pos[~_in_sorted(pos, s.starts[~nonzero])]  # no zero-width token there
        common = pos if common is None else common[_in_sorted(common, pos)]
    common = common[(common > 0) & (common < len(buf))]
    common = common[lead[common]]
    chars = char_at[common] + w.lo
    keep = (chars >= lo_char) & (chars <= hi_char)
    common, chars = common[keep], chars[keep]
    classes: list[list[tuple[int, int]]] = [[], [], []]
    for c, k in zip(common[::-1][:_SCAN].tolist(), chars[::-1][:_SCAN].tolist()):
        before, at, after = text[k - 1], text[k], text[k + 1] if k + 1 < len(text) else ""
        if at == " " and not before.isspace() and after.isalpha():
            classes[0].append((c, k))
        elif before == "\n" and not at.isspace():
            classes[1].append((c, k))
        else:
            classes[2].append((c, k))
        if len(classes[0]) >= MAX_CANDIDATES:
            break
    return (classes[0] + classes[1] + classes[2])[:MAX_CANDIDATES]


def _tail(s: SideBatch, cut: int, upto: int, first: int | None = None) -> tuple:
    """Tokens of `s` from byte `cut` (or from token `first`) that end by byte `upto`, positions
    relative to the cut."""
    i0 = int(np.searchsorted(s.ends, cut, side="right")) if first is None else first
    i1 = int(np.searchsorted(s.ends, upto, side="right"))
    return (s.ids[i0:i1], s.starts[i0:i1] - cut, s.ends[i0:i1] - cut, s.faithful[i0:i1])


def _agree(w: _Window, v: _Window, cut: int, text: str) -> bool:
    """Whether `w` (from before the cut) and `v` (from the cut) place the same tokens on both sides
    over the first half of `v`."""
    half = (v.hi - v.lo) // 2
    upto = len(text[v.lo:v.lo + half].encode("utf-8"))  # bytes from the cut
    for sw, sv in zip(w.sides, v.sides):
        a = _tail(sw, cut, cut + upto)
        b = _tail(sv, 0, upto, first=0)  # from its first token: a zero-width phantom space counts
        if len(a[0]) == 0 or len(a[0]) != len(b[0]):
            return False
        if not all(np.array_equal(x, y) for x, y in zip(a, b)):
            return False
        if int(a[2][-1]) * 4 < upto:  # agreement must cover a good part of the compared stretch
            return False
    return True


def _piece(w: _Window, cut: int | None, pair: PairBatch, base: list[int], byte_base: int,
           chunk_base: int) -> Piece:
    """The part of window `w` before byte `cut` (all of it for None) in whole-text coordinates."""
    end = len(w.raw) if cut is None else cut
    out = []
    counts = []
    for s, b0 in zip(w.sides, base):
        n = len(s.ids) if cut is None else int(np.searchsorted(s.ends, cut, side="right"))
        counts.append(n)
        out.append(SideBatch(s.ids[:n], np.array([0, n], np.int64), s.starts[:n] + byte_base,
                             s.ends[:n] + byte_base, s.faithful[:n], s.keys[:n], s.fallback))
    ch = pair.chunks
    nc = len(ch) if cut is None else int(np.searchsorted(ch[:, 1], cut, side="right"))
    chunks = ch[:nc].copy()
    chunks[:, 0:2] += byte_base
    chunks[:, 2:4] += base[0]
    chunks[:, 4:6] += base[1]
    na, nb = counts
    p = PairBatch(chunks, np.array([0, nc], np.int64), pair.a_chunk[:na] + chunk_base,
                  pair.b_chunk[:nb] + chunk_base, pair.a_exact[:na], pair.b_exact[:nb])
    return Piece(out[0], out[1], p, end)


def _run(infos, text: str, add_special: bool, force: list[bool], window: int, overlap: int
         ) -> Iterator[Piece]:
    """The pieces of `text`; raises `_Escalate` when a side first needs the offsets fallback."""
    n = len(text)
    p, base, byte_base, chunk_base = 0, [0, 0], 0, 0
    cur = None
    size = window
    while True:
        if cur is None:
            cur = _encode(infos, text, p, min(n, p + size + overlap), add_special, force)
            _check(cur, force)
        pair = align_sides(cur.sides[0], cur.sides[1])
        if cur.hi == n:
            yield _piece(cur, None, pair, base, byte_base, chunk_base)
            return
        accepted = None
        for cut, k in _candidates(cur, text, p + size // 2, min(p + size, n - 1)):
            v = _encode(infos, text, k, min(n, k + overlap), add_special, force)
            _check(v, force)
            if _agree(cur, v, cut, text):
                accepted = cut, k
                break
        if accepted is None:  # no cut passed: a bigger window from the same start
            size *= 2
            cur = None
            continue
        cut, k = accepted
        piece = _piece(cur, cut, pair, base, byte_base, chunk_base)
        yield piece
        base = [base[0] + len(piece.a.ids), base[1] + len(piece.b.ids)]
        byte_base += cut
        chunk_base += len(piece.pair.chunks)
        p, cur, size = k, None, window


class _Escalate(Exception):
    pass


def _check(w: _Window, force: list[bool]) -> None:
    """A side that needed the offsets fallback is placed from offsets in every window: start again."""
    escalate = False
    for i, off in enumerate(w.by_offsets):
        if off and not force[i]:
            force[i] = escalate = True
    if escalate:
        raise _Escalate


def align_long(a: TokenizerInfo, b: TokenizerInfo, text: str, *, add_special_tokens: bool = True,
               window: int | None = None, overlap: int | None = None) -> Iterator[Piece | None]:
    """The alignment of `text` between `a` (student) and `b` (teacher), in pieces, equal to
    aligning it whole (`align_sides(encode_side(a, [text]), encode_side(b, [text]))`); yields
    `RESTART` (None) when it starts over (see the module docstring). `window`/`overlap` (characters)
    default to `WINDOW_CHARS` / `OVERLAP_CHARS`."""
    window = WINDOW_CHARS if window is None else window
    overlap = OVERLAP_CHARS if overlap is None else overlap
    force = [False, False]
    while True:
        yielded = False
        try:
            for piece in _run([a, b], text, add_special_tokens, force, window, overlap):
                yielded = True
                yield piece
            return
        except _Escalate:
            if yielded:
                yield RESTART


def fallback_flags(pieces: list[Piece]) -> tuple[bool, bool]:
    """Whether any piece of each side was placed by a fallback (`SideBatch.fallback`)."""
    return (any(bool(p.a.fallback.any()) for p in pieces), any(bool(p.b.fallback.any()) for p in pieces))


def join(pieces: list[Piece]) -> tuple[SideBatch, SideBatch, PairBatch]:
    """One sample's `SideBatch` per side and `PairBatch` from its pieces (in order)."""
    fb_a, fb_b = fallback_flags(pieces)

    def side(parts: list[SideBatch], fb: bool) -> SideBatch:
        ids = np.concatenate([s.ids for s in parts])
        return SideBatch(ids, np.array([0, len(ids)], np.int64), np.concatenate([s.starts for s in parts]),
                         np.concatenate([s.ends for s in parts]), np.concatenate([s.faithful for s in parts]),
                         np.concatenate([s.keys for s in parts]), np.array([fb]))

    chunks = np.concatenate([p.pair.chunks for p in pieces])
    pair = PairBatch(chunks, np.array([0, len(chunks)], np.int64),
                     np.concatenate([p.pair.a_chunk for p in pieces]), np.concatenate([p.pair.b_chunk for p in pieces]),
                     np.concatenate([p.pair.a_exact for p in pieces]), np.concatenate([p.pair.b_exact for p in pieces]))
    return side([p.a for p in pieces], fb_a), side([p.b for p in pieces], fb_b), pair
