"""Numba kernels of the chunk aligner. They see only integer arrays; `aligner.py` prepares them.

Vocabulary of the arrays:
- *surface bytes* of an id: its canonical bytes for a text token, its content string's UTF-8 for a
  special token (what it occupies in a text that spells it out, e.g. a rendered chat template).
  Packed as `surf_data [N] uint8`, `surf_off [V + 1] int64`.
- A side's tokens for a batch are flat: `ids [N]`, sample `tok_off [B + 1]`. Positions (`starts`,
  `ends`) are byte offsets local to each sample's text (render) or, after `alignment.py` maps them,
  to the sample's common axis.
- A token is *faithful* when its canonical bytes are exactly the text bytes of its span (a leading
  phantom prefix space allowed); only faithful tokens make a chunk correct.
- `keys [N] int64`: what zero-width tokens are paired by: a role code for special tokens (-1: no
  role, never paired), a hash of the canonical bytes for text tokens.

Chunk records are int64 rows `[byte_start, byte_end, a_start, a_end, b_start, b_end, correct]` with
token indices local to the sample (half-open).
"""

from __future__ import annotations

import numpy as np
from numba import njit

SPACE = 32
LCS_MAX_CELLS = 4_000_000  # zero-width runs larger than this are paired as one gap chunk


@njit(cache=True, nogil=True)
def _matches(surf_data, surf_off, tid, skip, text, pos, end):
    """Surface bytes of `tid` minus `skip` leading bytes equal `text[pos:...]` within `end`."""
    a = surf_off[tid] + skip
    n = surf_off[tid + 1] - a
    if pos + n > end:
        return False
    for k in range(n):
        if surf_data[a + k] != text[pos + k]:
            return False
    return True


@njit(cache=True, nogil=True)
def walk_range(ids, lo, hi, surf_data, surf_off, special, prefix_space, text, tlo, thi,
               phantom_pos, starts, ends, faithful):
    """Place `ids[lo:hi]` one after the other on `text[tlo:thi]` by their surface bytes.

    A phantom prefix space (SentencePiece dummy prefix) is accepted at `phantom_pos` and after a
    special token. Writes positions relative to `tlo`. Returns whether the tokens tile the text
    exactly; on False the outputs of this range are garbage.
    """
    r = tlo
    used_phantom = -1
    prev_special = False
    for i in range(lo, hi):
        t = ids[i]
        n = surf_off[t + 1] - surf_off[t]
        if _matches(surf_data, surf_off, t, 0, text, r, thi):
            starts[i] = r - tlo
            ends[i] = r + n - tlo
            faithful[i] = (not special[t]) and n > 0
            r += n
        elif (prefix_space and n > 0 and not special[t] and surf_data[surf_off[t]] == SPACE
              and used_phantom != r and (r == phantom_pos or prev_special)
              and _matches(surf_data, surf_off, t, 1, text, r, thi)):
            starts[i] = r - tlo
            ends[i] = r + n - 1 - tlo
            faithful[i] = n > 1
            used_phantom = r
            r += n - 1
        else:
            return False
        prev_special = special[t]
    return r == thi


@njit(cache=True, nogil=True)
def walk_batch(ids, tok_off, n_pre, n_suf, surf_data, surf_off, special, prefix_space, text,
               text_off, starts, ends, faithful, ok):
    """`walk_range` over every sample; `n_pre`/`n_suf` tokens at each end were added (BOS/EOS) and
    sit at zero width on the text's ends."""
    for b in range(tok_off.shape[0] - 1):
        lo = tok_off[b] + n_pre[b]
        hi = tok_off[b + 1] - n_suf[b]
        tlo = text_off[b]
        thi = text_off[b + 1]
        for i in range(tok_off[b], lo):
            starts[i] = 0
            ends[i] = 0
            faithful[i] = False
        for i in range(hi, tok_off[b + 1]):
            starts[i] = thi - tlo
            ends[i] = thi - tlo
            faithful[i] = False
        ok[b] = walk_range(ids, lo, hi, surf_data, surf_off, special, prefix_space, text, tlo, thi,
                           tlo, starts, ends, faithful)


@njit(cache=True, nogil=True)
def place_by_offsets(ids, lo, hi, byte_starts, surf_data, surf_off, special, prefix_space, text,
                     tlo, thi, starts, ends, faithful):
    """Fallback placement when the surface bytes do not tile the text (a normalizer changed it).

    `byte_starts[i]` is token i's start from the tokenizer's own offsets (relative to `tlo`).
    Starts are made monotone and the first is pulled to 0; tokens sharing a start form a group that
    spans up to the next group's start (gaps the tokenizer dropped are absorbed). A group whose
    surface bytes tile its span keeps per-token spans and faithfulness; any other group gives its
    whole span to its first token (the rest sit at zero width at its end), all unfaithful.
    """
    n_text = thi - tlo
    prev = 0
    for i in range(lo, hi):
        s = byte_starts[i]
        if s < prev:
            s = prev
        if s > n_text:
            s = n_text
        if i == lo:
            s = 0
        byte_starts[i] = s
        prev = s
    g = lo
    while g < hi:
        k = g + 1
        while k < hi and byte_starts[k] == byte_starts[g]:
            k += 1
        p = byte_starts[g]
        q = byte_starts[k] if k < hi else n_text
        if not walk_range(ids, g, k, surf_data, surf_off, special, prefix_space, text, tlo + p,
                          tlo + q, tlo, starts, ends, faithful):
            starts[g] = p
            ends[g] = q
            faithful[g] = False
            for i in range(g + 1, k):
                starts[i] = q
                ends[i] = q
                faithful[i] = False
        else:
            for i in range(g, k):  # walk_range wrote positions relative to tlo + p
                starts[i] += p
                ends[i] += p
        g = k


@njit(cache=True)
def _emit(chunks, c, p0, p1, a0, a1, b0, b1, correct, a_base, b_base, k, a_chunk, b_chunk,
          a_exact, b_exact):
    chunks[c, 0] = p0
    chunks[c, 1] = p1
    chunks[c, 2] = a0 - a_base
    chunks[c, 3] = a1 - a_base
    chunks[c, 4] = b0 - b_base
    chunks[c, 5] = b1 - b_base
    chunks[c, 6] = 1 if correct else 0
    exact = correct and a1 - a0 == 1 and b1 - b0 == 1
    for i in range(a0, a1):
        a_chunk[i] = k
        a_exact[i] = exact
    for j in range(b0, b1):
        b_chunk[j] = k
        b_exact[j] = exact


@njit(cache=True)
def _pair_zero_width(a_key, i0, i1, b_key, j0, j1, p, chunks, c, a_base, b_base, k, a_chunk,
                     b_chunk, a_exact, b_exact):
    """Chunks for the zero-width runs `a[i0:i1]`, `b[j0:j1]` at axis position p: a longest common
    subsequence of their keys gives 1:1 pairs; between pairs, unmatched tokens of both sides form
    one chunk, or one chunk per token where only one side has any. None is correct.
    Returns (next chunk row, next local chunk index)."""
    m = i1 - i0
    n = j1 - j0
    mi = np.full(m + n + 1, -1, np.int64)  # matched pairs, in order
    mj = np.full(m + n + 1, -1, np.int64)
    nm = 0
    if m > 0 and n > 0 and m * n <= LCS_MAX_CELLS:
        L = np.zeros((m + 1, n + 1), np.int32)
        for x in range(m - 1, -1, -1):
            for y in range(n - 1, -1, -1):
                ka = a_key[i0 + x]
                if ka >= 0 and ka == b_key[j0 + y]:
                    L[x, y] = L[x + 1, y + 1] + 1
                elif L[x + 1, y] >= L[x, y + 1]:
                    L[x, y] = L[x + 1, y]
                else:
                    L[x, y] = L[x, y + 1]
        x = 0
        y = 0
        while x < m and y < n:
            ka = a_key[i0 + x]
            if ka >= 0 and ka == b_key[j0 + y]:
                mi[nm] = i0 + x
                mj[nm] = j0 + y
                nm += 1
                x += 1
                y += 1
            elif L[x + 1, y] >= L[x, y + 1]:
                x += 1
            else:
                y += 1
    mi[nm] = i1  # sentinel: the run's end
    mj[nm] = j1
    ia = i0
    jb = j0
    for q in range(nm + 1):
        ga = mi[q] - ia
        gb = mj[q] - jb
        if ga > 0 and gb > 0:
            _emit(chunks, c, p, p, ia, mi[q], jb, mj[q], False, a_base, b_base, k, a_chunk,
                  b_chunk, a_exact, b_exact)
            c += 1
            k += 1
        else:
            for i in range(ia, mi[q]):
                _emit(chunks, c, p, p, i, i + 1, jb, jb, False, a_base, b_base, k, a_chunk,
                      b_chunk, a_exact, b_exact)
                c += 1
                k += 1
            for j in range(jb, mj[q]):
                _emit(chunks, c, p, p, ia, ia, j, j + 1, False, a_base, b_base, k, a_chunk,
                      b_chunk, a_exact, b_exact)
                c += 1
                k += 1
        if q < nm:
            _emit(chunks, c, p, p, mi[q], mi[q] + 1, mj[q], mj[q] + 1, False, a_base, b_base, k,
                  a_chunk, b_chunk, a_exact, b_exact)
            c += 1
            k += 1
            ia = mi[q] + 1
            jb = mj[q] + 1
    return c, k


@njit(cache=True)
def pair_batch(a_start, a_end, a_faith, a_key, a_off, b_start, b_end, b_faith, b_key, b_off,
               chunks, c_off, a_chunk, b_chunk, a_exact, b_exact):
    """Chunk alignment of every sample: walk both sides' axis spans, close a chunk where both have a
    token boundary at the same position; zero-width tokens at a boundary go to `_pair_zero_width`.

    `chunks` has room for `a_off[-1] + b_off[-1]` rows (each chunk takes at least one token).
    Fills `c_off [B + 1]`. Returns -1 on success, else the first sample whose two sides do not end
    at the same position (a bug upstream, never silently aligned).
    """
    c = 0
    for s in range(a_off.shape[0] - 1):
        c_off[s] = c
        a_base = a_off[s]
        b_base = b_off[s]
        i = a_base
        j = b_base
        iend = a_off[s + 1]
        jend = b_off[s + 1]
        p = 0
        k = 0
        while i < iend or j < jend:
            i2 = i
            while i2 < iend and a_start[i2] == p and a_end[i2] == p:
                i2 += 1
            j2 = j
            while j2 < jend and b_start[j2] == p and b_end[j2] == p:
                j2 += 1
            if i2 > i or j2 > j:
                c, k = _pair_zero_width(a_key, i, i2, b_key, j, j2, p, chunks, c, a_base, b_base,
                                        k, a_chunk, b_chunk, a_exact, b_exact)
                i = i2
                j = j2
                continue
            b_only = i >= iend and j < jend and b_start[j] == p  # a tokenized none of the rest
            a_only = j >= jend and i < iend and a_start[i] == p  # b tokenized none of the rest
            if a_only or b_only:  # the side that has a token here gets a chunk of its own
                i1, j1 = (i, j + 1) if b_only else (i + 1, j)
                end = b_end[j] if b_only else a_end[i]
                _emit(chunks, c, p, end, i, i1, j, j1, False, a_base, b_base, k, a_chunk, b_chunk, a_exact,
                      b_exact)
                c += 1
                k += 1
                p = end
                i, j = i1, j1
                continue
            if i >= iend or j >= jend or a_start[i] != p or b_start[j] != p:
                return s
            i0 = i
            j0 = j
            ea = a_end[i]
            eb = b_end[j]
            correct = a_faith[i] and b_faith[j]
            i += 1
            j += 1
            while ea != eb:
                if ea < eb:
                    if i >= iend:
                        return s
                    ea = a_end[i]
                    correct = correct and a_faith[i]
                    i += 1
                else:
                    if j >= jend:
                        return s
                    eb = b_end[j]
                    correct = correct and b_faith[j]
                    j += 1
            _emit(chunks, c, p, ea, i0, i, j0, j, correct, a_base, b_base, k, a_chunk, b_chunk,
                  a_exact, b_exact)
            c += 1
            k += 1
            p = ea
    c_off[a_off.shape[0] - 1] = c
    return -1


@njit(cache=True, nogil=True)
def fnv_keys(data, off, out):
    """64-bit FNV-1a of each packed byte string, folded to a non-negative int64 above 2**20."""
    for t in range(off.shape[0] - 1):
        h = np.uint64(14695981039346656037)
        for q in range(off[t], off[t + 1]):
            h = (h ^ np.uint64(data[q])) * np.uint64(1099511628211)
        out[t] = np.int64(h >> np.uint64(2)) + 1048576


@njit(cache=True)
def valid_cuts(chunks, c_off, s_off, max_s, max_t, valid):
    """AND into `valid` (indexed `s_off[b] + b + n`, n = 0..tokens of sample b) whether keeping the
    first n student tokens is a chunk boundary of this pair with both sides within budget."""
    for b in range(c_off.shape[0] - 1):
        base = s_off[b] + b
        n_s = s_off[b + 1] - s_off[b]
        own = np.zeros(n_s + 1, np.bool_)
        own[0] = True
        for c in range(c_off[b], c_off[b + 1]):
            if chunks[c, 3] <= max_s and chunks[c, 5] <= max_t:
                own[chunks[c, 3]] = True
        for n in range(n_s + 1):
            valid[base + n] = valid[base + n] and own[n]


@njit(cache=True)
def cut_pair(chunks, c_off, keep_s, max_t, keep_t, keep_c, keep_bytes):
    """For each sample, the last chunk ending at student count `keep_s[b]` with the teacher within
    budget: how many teacher tokens, chunks and axis bytes the cut keeps."""
    for b in range(c_off.shape[0] - 1):
        keep_t[b] = 0
        keep_c[b] = 0
        keep_bytes[b] = 0
        for c in range(c_off[b], c_off[b + 1]):
            if chunks[c, 3] == keep_s[b] and chunks[c, 5] <= max_t:
                keep_t[b] = chunks[c, 5]
                keep_c[b] = c - c_off[b] + 1
                keep_bytes[b] = chunks[c, 1]
            elif chunks[c, 3] > keep_s[b]:
                break
