"""Corpus evidence for a projection: how student and teacher tokens co-occur at shared boundaries.

At a byte position where both tokenizations of the same text have a token boundary, both models
condition on exactly the same text, and the next student token and the next teacher token start at
the same byte. Each such boundary is one observation "student token s <-> teacher token t";
`cooccurrence_counts` returns these counts as a sparse `[V_s, V_t]` matrix. The projection
builder blends them with its rule-based prior (`builder.py`).

Boundaries come from the chunk aligner (`xtoken_align.alignment.aligner`): each chunk with tokens
on both sides contributes (its first student token, its first teacher token). The aligner's
placement fallbacks for text a normalizer changed (NFC, lowercasing) apply, so no text is skipped.
The summary records `aligner: "chunk_aligner"` (and `nfc: false`, `texts_skipped: 0`) so artifacts
keep the keys they always had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp

from xtoken_align.textio import check_text, iter_jsonl, iter_lines
from xtoken_align.tokenizer.loader import TokenizerInfo
from xtoken_core.errors import DataFileError

BATCH = 256


CORPUS_FORMATS = ("auto", "jsonl", "text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def read_corpus(path: Path, corpus_format: str = "auto") -> list[str]:
    """Texts of a corpus file. `corpus_format` "jsonl": one JSON object per line with a string
    `"text"`; "text": one text per non-empty line; "auto" (default): "jsonl" for a `.jsonl`,
    `.ndjson` or `.json` file, else "text" (the content is never guessed from: a plain text whose first line
    starts with `{` is text). Read like every user text (`xtoken_align.textio`): a leading
    byte-order mark dropped, lines end at `\\n`. Raises `DataFileNotFoundError` if the file is
    missing, `DataFileError` if it is not UTF-8, a JSON line is malformed or a text holds a lone
    surrogate."""
    path = Path(path)
    if corpus_format not in CORPUS_FORMATS:
        raise DataFileError(f"corpus format must be one of {', '.join(CORPUS_FORMATS)}, got {corpus_format!r}")
    auto = corpus_format == "auto"
    if auto:
        corpus_format = "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"
    if corpus_format == "text":
        return [line for _, line in iter_lines(path, "corpus") if line.strip()]
    texts = []
    hint = (f"; {path.name} is read as JSON lines with a \"text\" field" + (" by its extension" if auto else "")
            + " (--corpus-format text reads one text per line)")
    for n, obj in iter_jsonl(path, "corpus", hint):
        if not isinstance(obj.get("text"), str):
            raise DataFileError(f"corpus {path} line {n} has no string \"text\" field")
        check_text(obj["text"], f"corpus {path} line {n}: \"text\"")
        texts.append(obj["text"])
    return texts


def _first_token_pairs(student: TokenizerInfo, teacher: TokenizerInfo, texts: list[str]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(student ids, teacher ids) of the first tokens of every chunk with tokens on both sides."""
    # Imported here: the aligner loads numba (~0.3 s, ~60 MB), which a build without a corpus, or
    # `read_corpus` alone, never needs.
    from xtoken_align.alignment.aligner import align_sides, encode_side

    sa, _ = encode_side(student, texts, add_special_tokens=False)
    sb, _ = encode_side(teacher, texts, add_special_tokens=False)
    pair = align_sides(sa, sb)
    ch = pair.chunks  # [C, 7]: byte_start, byte_end, a_start, a_end, b_start, b_end, correct
    sample = np.repeat(np.arange(len(texts)), np.diff(pair.offsets))
    both = (ch[:, 2] < ch[:, 3]) & (ch[:, 4] < ch[:, 5])
    return sa.ids[(sa.offsets[sample] + ch[:, 2])[both]], sb.ids[(sb.offsets[sample] + ch[:, 4])[both]]


def cooccurrence_counts(student: TokenizerInfo, teacher: TokenizerInfo, texts: list[str], *,
                        progress: Callable[..., None] | None = None) -> tuple[sp.csr_matrix, dict]:
    """`[V_s, V_t]` counts of (next student token, next teacher token) at shared boundaries, and
    a summary (texts used / skipped, boundaries counted)."""
    rows, cols = [], []
    for start in range(0, len(texts), BATCH):
        s_ids, t_ids = _first_token_pairs(student, teacher, texts[start:start + BATCH])
        rows.append(s_ids)
        cols.append(t_ids)
        if progress is not None:
            progress("corpus co-occurrence", min(start + BATCH, len(texts)), len(texts))
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    counts = sp.coo_matrix((np.ones(len(r)), (r, c)), shape=(student.vocab_size, teacher.vocab_size)).tocsr()
    counts.sum_duplicates()
    info = {"aligner": "chunk_aligner", "texts": len(texts), "texts_used": len(texts), "texts_skipped": 0,
            "boundaries": int(len(r)), "nfc": False}
    return counts, info
