"""Corpus evidence for a projection: how student and teacher tokens co-occur at shared boundaries.

At a byte position where both tokenizations of the same text have a token boundary, both models
condition on exactly the same text, and the next student token and the next teacher token start at
the same byte. Each such boundary is one observation "student token s <-> teacher token t";
`cooccurrence_counts` returns these counts as a sparse `[V_s, V_t]` matrix. The projection
builder blends them with its rule-based prior (`projection.py`).

Boundaries come from the chunk aligner (`xtoken_align.alignment.aligner`) when it is importable and
accepts the batch: each chunk with tokens on both sides contributes (its first student token, its
first teacher token); its fallback for text a normalizer changed (NFC, lowercasing) applies, so no
text is skipped. Otherwise (the aligner missing, or raising on a batch), boundaries come from exact
byte offsets: each side's canonical token byte lengths, cumulated (a SentencePiece phantom space is
not counted); a text on which either side is not byte-exact (a lossy normalizer, a special-token
string in the text) is skipped and counted, and texts are NFC-normalised first when either
tokenizer is `exact_nfc` (Qwen). On byte-exact text both give the same boundaries. The summary's
`aligner` field says which was used ("chunk_aligner", "exact_offsets" or "mixed").
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from xtoken_core.errors import XTokenError
from xtoken_align.textio import read_utf8
from xtoken_align.tokenizer.loader import TokenizerInfo

BATCH = 256


def read_corpus(path: Path) -> list[str]:
    """Texts of a corpus file: JSON lines with a `"text"` field (`.jsonl`), else one text per
    non-empty line. Raises `XTokenError` if the file is missing or not UTF-8."""
    path = Path(path)
    content = read_utf8(path, "corpus")
    lines = [ln for ln in content.splitlines() if ln.strip()]
    if path.suffix == ".jsonl" or (lines and lines[0].lstrip().startswith("{")):
        texts = []
        for n, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise XTokenError(f"corpus {path} line {n} is not valid JSON ({exc.msg}); "
                                  f"give JSON lines with a \"text\" field or plain text") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise XTokenError(f"corpus {path} line {n} has no string \"text\" field")
            texts.append(obj["text"])
        return texts
    return lines


def _boundaries(tok: TokenizerInfo, texts: list[str], encodings) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per text: (start byte offsets of the non-empty tokens, their ids), or None if the token bytes
    do not reproduce the text's bytes."""
    lengths_all = tok.token_lengths
    tb = tok.token_bytes
    out = []
    for text, enc in zip(texts, encodings):
        ids = np.asarray(enc.ids, dtype=np.int64)
        if len(ids) == 0:
            out.append(None)
            continue
        lengths = lengths_all[ids].copy()
        if tok.adds_phantom_space(text) and tb[ids[0]] is not None and tb[ids[0]].startswith(b" "):
            lengths[0] -= 1
        ends = np.cumsum(lengths)
        if ends[-1] != len(text.encode("utf-8")):
            out.append(None)
            continue
        keep = lengths > 0
        out.append(((ends - lengths)[keep], ids[keep]))
    return out


def _chunk_aligner():
    """The chunk aligner's (encode_side, align_sides), or None where it is not available."""
    try:
        from xtoken_align.alignment.aligner import align_sides, encode_side
    except ImportError:
        return None
    return encode_side, align_sides


def _aligner_pairs(aligner, student: TokenizerInfo, teacher: TokenizerInfo, texts: list[str]
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    """(student ids, teacher ids) of the first tokens of every chunk with tokens on both sides, or
    None if the aligner rejects the batch (the caller falls back to exact offsets)."""
    encode_side, align_sides = aligner
    try:
        sa, _ = encode_side(student, texts, add_special_tokens=False)
        sb, _ = encode_side(teacher, texts, add_special_tokens=False)
        pair = align_sides(sa, sb)
        ch = pair.chunks  # [C, 7]: byte_start, byte_end, a_start, a_end, b_start, b_end, correct
        sample = np.repeat(np.arange(len(texts)), np.diff(pair.offsets))
        both = (ch[:, 2] < ch[:, 3]) & (ch[:, 4] < ch[:, 5])
        return (sa.ids[(sa.offsets[sample] + ch[:, 2])[both]], sb.ids[(sb.offsets[sample] + ch[:, 4])[both]])
    except (XTokenError, AttributeError, TypeError, ValueError, IndexError):
        return None


def cooccurrence_counts(student: TokenizerInfo, teacher: TokenizerInfo, texts: list[str], *,
                        progress: Callable[..., None] | None = None) -> tuple[sp.csr_matrix, dict]:
    """`[V_s, V_t]` counts of (next student token, next teacher token) at shared boundaries, and
    a summary (texts used / skipped, boundaries counted)."""
    nfc = "exact_nfc" in (student.exactness, teacher.exactness)
    rows, cols = [], []
    used = skipped = 0
    by_aligner = by_offsets = 0
    aligner = _chunk_aligner()
    for start in range(0, len(texts), BATCH):
        batch = texts[start:start + BATCH]
        pairs = _aligner_pairs(aligner, student, teacher, batch) if aligner is not None else None
        if pairs is not None:
            rows.append(pairs[0])
            cols.append(pairs[1])
            used += len(batch)
            by_aligner += len(batch)
            if progress is not None:
                progress("corpus co-occurrence", min(start + BATCH, len(texts)), len(texts))
            continue
        by_offsets += len(batch)
        if nfc:
            batch = [unicodedata.normalize("NFC", t) for t in batch]
        bs = _boundaries(student, batch, student.backend.encode_batch(batch, add_special_tokens=False))
        bt = _boundaries(teacher, batch, teacher.backend.encode_batch(batch, add_special_tokens=False))
        for s, t in zip(bs, bt):
            if s is None or t is None:
                skipped += 1
                continue
            used += 1
            common, i_s, i_t = np.intersect1d(s[0], t[0], assume_unique=True, return_indices=True)
            rows.append(s[1][i_s])
            cols.append(t[1][i_t])
        if progress is not None:
            progress("corpus co-occurrence", min(start + BATCH, len(texts)), len(texts))
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    counts = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(student.vocab_size, teacher.vocab_size)).tocsr()
    counts.sum_duplicates()
    name = "chunk_aligner" if not by_offsets else "exact_offsets" if not by_aligner else "mixed"
    info = {"aligner": name, "texts": len(texts), "texts_used": used, "texts_skipped": skipped,
            "boundaries": int(len(r)), "nfc": bool(nfc and by_offsets)}
    return counts, info
