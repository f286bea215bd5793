"""Placement for `exact_nfc` tokenizers (Qwen) on text that is not NFC, without re-tokenizing.

Such a tokenizer's tokens spell NFC(text). The text differs from its NFC form only in small regions
(a starter and the combining marks after it, or a singleton such as U+212B ANGSTROM SIGN), so:
find those regions with a per-code-point lookup table, normalize them one by one, walk the tokens
over the result (which succeeds only if it is NFC(text), what the tokens spell), and map positions
back: identical stretches shift by the regions' size changes, a position strictly inside a changed
region maps to the region's start, and every token overlapping a changed region is unfaithful.
Where the walk fails, the caller falls back to the tokenizer's own offsets.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np

from xtoken_align.alignment import kernels as K

_SCAN_LIMIT = 0x30000  # every canonical decomposition and combining mark lies below (planes 0-2)


@functools.lru_cache(maxsize=1)
def _nfc_table() -> np.ndarray:
    """`[_SCAN_LIMIT] uint8` per code point: 1 = may change by joining the character before it under
    NFC (combining marks, the ccc-0 second halves of canonical pairs such as Hangul vowel/final
    jamo), 2 = changed by NFC on its own (singletons, composition exclusions), 0 = neither."""
    table = np.zeros(_SCAN_LIMIT, np.uint8)
    for cp in range(_SCAN_LIMIT):
        if 0xD800 <= cp < 0xE000:
            continue
        ch = chr(cp)
        if unicodedata.combining(ch):
            table[cp] = 1
        d = unicodedata.decomposition(ch)
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2:
                table[int(parts[1], 16)] = 1
            if unicodedata.normalize("NFC", ch) != ch:
                table[cp] = max(table[cp], 2)
    table[0x1161:0x1176] = 1  # Hangul vowel jamo
    table[0x11A8:0x11C3] = 1  # Hangul final jamo
    return table


def _regions(text: str) -> list[tuple[int, int]]:
    """Character spans `[start, end)` outside which NFC leaves `text` unchanged: each run of
    flagged characters, extended by the starter before a joining one."""
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    table = _nfc_table()
    flag = np.where(cps < _SCAN_LIMIT, table[np.minimum(cps, _SCAN_LIMIT - 1)], 0)
    region = flag > 0
    region[:-1] |= flag[1:] == 1
    if not region.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[False], region, [False]]).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def place_nfc(ids, lo, hi, text: str, tables, prefix_space, starts, ends, faithful) -> bool:
    """Place `ids[lo:hi]` on `text` (positions relative to the text) for an NFC-normalizing
    tokenizer; False if the regions do not reproduce NFC(text) or the tokens do not spell it."""
    regions = []  # (char start, char end, normalized piece)
    for a, b in _regions(text):
        piece = unicodedata.normalize("NFC", text[a:b])
        if piece != text[a:b]:
            regions.append((a, b, piece))
    pieces, last = [], 0
    for s, e, piece in regions:
        pieces.append(text[last:s])
        pieces.append(piece)
        last = e
    pieces.append(text[last:])
    # No separate check against NFC(text): the tokens spell NFC(text), so the walk below succeeds
    # only if the regions reproduced it exactly.
    nb = np.frombuffer("".join(pieces).encode("utf-8"), np.uint8)
    if not K.walk_range(ids, lo, hi, tables.surf_data, tables.surf_off, tables.special,
                        prefix_space, nb, 0, len(nb), 0, starts, ends, faithful):
        return False
    if not regions:
        return True
    # Byte spans of the regions in the text (t_*) and in the normalized text (n_*).
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    c2b = np.zeros(len(cps) + 1, np.int64)
    np.cumsum(1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000), out=c2b[1:])
    t_s = c2b[[s for s, _, _ in regions]]
    t_e = c2b[[e for _, e, _ in regions]]
    sizes = np.array([len(p.encode("utf-8")) for _, _, p in regions], np.int64)
    shift = np.concatenate([[0], np.cumsum(sizes - (t_e - t_s))])  # n - t before region k
    n_s = t_s + shift[:-1]
    n_e = n_s + sizes
    # A token overlapping a changed region is unfaithful. Decided on the normalized spans, before
    # mapping: a token that starts before a region and ends inside it maps to end at the region's
    # start, so its mapped span no longer shows the overlap.
    s, e = starts[lo:hi], ends[lo:hi]
    k = np.searchsorted(n_s, e, side="left") - 1
    overlaps = (k >= 0) & (n_e[np.maximum(k, 0)] > s)
    for arr in (starts, ends):
        x = arr[lo:hi]
        k = np.searchsorted(n_s, x, side="right") - 1
        kk = np.maximum(k, 0)
        inside = (k >= 0) & (x < n_e[kk])
        after = x - shift[kk + 1]
        arr[lo:hi] = np.where(k < 0, x, np.where(inside, t_s[kk], after))
    faithful[lo:hi] &= ~overlaps & (ends[lo:hi] > starts[lo:hi])
    return True
