"""Vocabulary overlap and coverage audit between tokenizers, on canonical bytes.

overlap(A, B)     = |S_A ∩ S_B| / min(|S_A|, |S_B|)
coverage(A in B)  = |S_A ∩ S_B| / |S_A|

where S_X is the set of distinct canonical byte strings of X's non-special tokens (a SentencePiece
byte token `<0x41>` and the token `A` are one string). The coverage audit counts, per category of
A's tokens (1/2/3-digit numerals, ASCII punctuation, whitespace, CJK, special), how many exist in B:
it shows before any training that, say, none of Llama-3's multi-digit tokens exists in Qwen3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from xtoken_align.tokenizer.loader import TokenizerInfo

CATEGORIES = ("digits_1", "digits_2", "digits_3", "ascii_punctuation", "whitespace", "cjk", "special")

_PUNCT = re.compile(rb"^[!-/:-@\[-`{-~]+$")
_WHITESPACE = re.compile(rb"^[ \t\n\r\x0b\x0c]+$")
# CJK Unified Ideographs (+ Ext. A, compatibility), Hiragana, Katakana, Hangul syllables and Jamo.
_CJK = re.compile("^[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u1100-\u11ff]+$")


def text_set(tok: TokenizerInfo) -> set[bytes]:
    """Distinct canonical byte strings of the non-special tokens."""
    return {b for b in tok.token_bytes if b}


def category(b: bytes) -> str | None:
    """The audit category of one token's canonical bytes (None: not audited)."""
    if b.isdigit() and len(b) <= 3:
        return f"digits_{len(b)}"
    if _PUNCT.match(b):
        return "ascii_punctuation"
    if _WHITESPACE.match(b):
        return "whitespace"
    try:
        s = b.decode("utf-8").strip(" ")
    except UnicodeDecodeError:
        return None
    if s and _CJK.match(s):
        return "cjk"
    return None


@dataclass(frozen=True)
class PairCoverage:
    """Coverage of the `student`'s tokens by the `teacher`'s vocabulary, by category."""

    student: str
    teacher: str
    categories: dict[str, dict[str, int]]  # category -> {"covered": n, "total": m}


def categorise(strings: set[bytes]) -> dict[str, set[bytes]]:
    """Audit category -> the strings of that category."""
    out: dict[str, set[bytes]] = {c: set() for c in CATEGORIES if c != "special"}
    for tb in strings:
        c = category(tb)
        if c is not None:
            out[c].add(tb)
    return out


def coverage_audit(a: TokenizerInfo, b: TokenizerInfo, b_set: set[bytes] | None = None,
                   a_categories: dict[str, set[bytes]] | None = None) -> PairCoverage:
    """How many of `a`'s tokens of each category exist (same bytes) in `b`.

    `special` compares special-token roles: a special token of `a` is covered when `b` has a
    special token with the same role.
    """
    b_set = text_set(b) if b_set is None else b_set
    a_categories = categorise(text_set(a)) if a_categories is None else a_categories
    counts = {c: {"covered": len(s & b_set), "total": len(s)} for c, s in a_categories.items()}
    counts["special"] = {"covered": 0, "total": 0}
    b_roles = set(b.special_roles)
    a_role_of = {i: r for r, i in a.special_roles.items()}
    for i in a.special_tokens:
        counts["special"]["total"] += 1
        counts["special"]["covered"] += a_role_of.get(i) in b_roles
    return PairCoverage(a.name, b.name, counts)


@dataclass(frozen=True)
class OverlapReport:
    names: list[str]
    sizes: list[int]  # distinct non-special canonical byte strings
    vocab_sizes: list[int]
    overlap: list[list[float]]  # symmetric, min-normalised
    coverage_matrix: list[list[float]]  # [i][j] = fraction of i's strings found in j
    coverage: list[PairCoverage]  # every ordered pair (i != j)

    def to_json(self, tokenizers: list[TokenizerInfo], version: str) -> dict:
        return {
            "names": self.names,
            "sizes": self.sizes,
            "vocab_sizes": self.vocab_sizes,
            "fingerprints": [t.fingerprint for t in tokenizers],
            "overlap": self.overlap,
            "coverage_matrix": self.coverage_matrix,
            "coverage": [{"student": c.student, "teacher": c.teacher, "categories": c.categories}
                         for c in self.coverage],
            "xtoken_version": version,
        }


def overlap_report(tokenizers: list[TokenizerInfo]) -> OverlapReport:
    """Pairwise overlap, directed coverage and the per-category audit of every ordered pair."""
    sets = [text_set(t) for t in tokenizers]
    n = len(tokenizers)
    overlap = [[1.0] * n for _ in range(n)]
    directed = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            common = len(sets[i] & sets[j])
            overlap[i][j] = overlap[j][i] = common / max(1, min(len(sets[i]), len(sets[j])))
            directed[i][j] = common / max(1, len(sets[i]))
            directed[j][i] = common / max(1, len(sets[j]))
    cats = [categorise(s) for s in sets]
    audits = [coverage_audit(tokenizers[i], tokenizers[j], sets[j], cats[i])
              for i in range(n) for j in range(n) if i != j]
    return OverlapReport(
        names=[t.name for t in tokenizers],
        sizes=[len(s) for s in sets],
        vocab_sizes=[t.vocab_size for t in tokenizers],
        overlap=overlap,
        coverage_matrix=directed,
        coverage=audits,
    )
