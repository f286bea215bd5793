"""The rule-based parts of a projection: exact byte matches, byte-level decomposition, special roles.

Everything here works on canonical token bytes (BRIEF §3), never on decoded strings, and is
vectorised or batched: exact matching is one dict lookup per id, decomposition runs the target
tokenizer's Rust `encode_batch` over all tokens that decode as UTF-8 and falls back to a byte-level
dynamic programme only for the few that do not (tokens holding part of a UTF-8 character, text
the target's normalizer changes, a target special-token string inside the bytes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from xtoken_align.tokenizer.canonical_bytes import offsets_from_counts
from xtoken_align.tokenizer.loader import TokenizerInfo

# How a token's bytes were split into target tokens (counted in the projection's stats).
SPLIT_TOKENIZER = 0  # the target tokenizer's own split of the decoded text reproduced the bytes
SPLIT_BYTE_DP = 1  # byte-level fewest-pieces split over the target's byte vocabulary
SPLIT_PARTIAL = 2  # byte-level split that had to skip bytes no target token covers (lossy targets)
SPLIT_NONE = 3  # no target token covers any byte
SPLIT_NORMALIZED = 4  # the target tokenizer's split of the text its normalizer made (NFC, lowercase)
SPLIT_NAMES = ("tokenizer", "byte_dp", "partial", "none", "normalized")

# Roles that may stand in for one another when a tokenizer lacks the exact role (Llama-3 calls its
# document end `eos_text` and its chat end `eos`; most families have one end-of-sequence token).
ROLE_FALLBACKS: dict[str, tuple[str, ...]] = {
    "eos_text": ("eos",),
    "turn_end": ("eos",),
    "turn_start": ("role_header_start",),  # ChatML <|im_start|> ~ Llama-3 <|start_header_id|>
    "role_header_start": ("turn_start",),
}

_SKIP_COST = 1 << 20  # a skipped byte costs more than any number of pieces


def exact_map(src: TokenizerInfo, dst: TokenizerInfo) -> np.ndarray:
    """`[src.vocab_size] int64`: for each src text id, the (lowest) dst text id with identical
    canonical bytes, or -1 (special, unused or no byte-identical dst token)."""
    lookup = dst.bytes_to_id
    out = np.full(src.vocab_size, -1, dtype=np.int64)
    for i, b in enumerate(src.token_bytes):
        if b is not None:
            j = lookup.get(b)
            if j is not None:
                out[i] = j
    return out


@dataclass(frozen=True)
class Pieces:
    """Decompositions of a set of source ids into target ids, in CSR form.

    Token `ids[n]` splits into `pieces[ptr[n]:ptr[n + 1]]` (target ids, in text order), found by
    `method[n]` (one of the SPLIT_* codes).
    """

    ids: np.ndarray  # [N] int64 source ids
    ptr: np.ndarray  # [N + 1] int64
    pieces: np.ndarray  # [ptr[-1]] int64 target ids
    method: np.ndarray  # [N] int8

    def counts(self) -> dict[str, int]:
        return {name: int((self.method == code).sum()) for code, name in enumerate(SPLIT_NAMES)}

    def lookup(self, token_id: int) -> list[int] | None:
        """The pieces of one source id (None when it was not decomposed)."""
        n = np.searchsorted(self.ids, token_id)
        if n >= len(self.ids) or self.ids[n] != token_id:
            return None
        return self.pieces[self.ptr[n]:self.ptr[n + 1]].tolist()


def _without_phantom_space(backend: Tokenizer) -> Tokenizer:
    """A copy of a SentencePiece-style tokenizer that adds no dummy prefix, so that the bytes of a
    word-internal token ("ing") are split as they stand instead of as " ing"."""
    spec = json.loads(backend.to_str())

    def visit(obj):
        if isinstance(obj, dict):
            if obj.get("type") == "Metaspace":
                obj["prepend_scheme"] = "never"
                obj["add_prefix_space"] = False
            for key in ("normalizers", "pretokenizers"):
                if key in obj:
                    obj[key] = [c for c in obj[key] if not (isinstance(c, dict) and c.get("type") == "Prepend")]
            for v in obj.values():
                visit(v)
        elif isinstance(obj, list):
            for v in obj:
                visit(v)

    if isinstance(spec.get("normalizer"), dict) and spec["normalizer"].get("type") == "Prepend":
        spec["normalizer"] = None
    visit(spec)
    out = Tokenizer.from_str(json.dumps(spec))
    out.no_padding()
    out.no_truncation()
    return out


class ByteSplitter:
    """Splits byte strings into a target tokenizer's text tokens the way that tokenizer would.

    Bytes that decode as UTF-8 go through the target's own `encode_batch` (its normalizer,
    pre-tokenizer and merges), and the split is kept when the pieces' canonical bytes concatenate
    back to the input. Where the target's normalizer changed the text (Qwen's NFC, BERT's
    lowercasing and accent stripping), the split is kept when the pieces spell the normalized text
    (whitespace removed for a lossy target, whose pre-tokenizer drops it): that is what the target
    produces on this text. Otherwise (half a UTF-8 character, a special-token string matched, an
    `[UNK]`) a byte-level dynamic programme picks the split with the fewest target tokens,
    preferring the longest first piece on ties (what BPE and WordPiece produce on nearly all such
    strings).
    """

    def __init__(self, target: TokenizerInfo):
        self.target = target
        self._backend = _without_phantom_space(target.backend) if target.prefix_space else target.backend
        self._lookup = target.bytes_to_id
        lengths = target.token_lengths
        self._max_len = int(lengths.max()) if len(lengths) else 0

    def split(self, items: list[bytes]) -> tuple[list[list[int]], np.ndarray]:
        """Pieces (target ids) and SPLIT_* method of each byte string."""
        out: list[list[int] | None] = [None] * len(items)
        method = np.full(len(items), SPLIT_NONE, dtype=np.int8)
        texts, where = [], []
        for n, b in enumerate(items):
            try:
                texts.append(b.decode("utf-8"))
                where.append(n)
            except UnicodeDecodeError:
                pass
        tb = self.target.token_bytes
        normalizer = self._backend.normalizer
        lossy = self.target.exactness == "lossy"
        if texts:
            encodings = self._backend.encode_batch(texts, add_special_tokens=False)
            for n, text, enc in zip(where, texts, encodings):
                ids = enc.ids
                parts = [tb[i] for i in ids]
                if not ids or None in parts:
                    continue
                joined = b"".join(parts)
                if joined == items[n]:
                    out[n], method[n] = ids, SPLIT_TOKENIZER
                elif normalizer is not None:
                    norm = normalizer.normalize_str(text)
                    if lossy:
                        norm = "".join(norm.split())
                    if joined == norm.encode("utf-8"):
                        out[n], method[n] = ids, SPLIT_NORMALIZED
        for n, b in enumerate(items):
            if out[n] is None:
                out[n], method[n] = self._dp(b)
        return out, method

    def _dp(self, b: bytes) -> tuple[list[int], int]:
        """Fewest-pieces split of `b` over the target's byte vocabulary (bytes no token covers are
        skipped at a high cost)."""
        n = len(b)
        lookup, max_len = self._lookup, self._max_len
        best = [0] * (n + 1)  # best[i]: cost of covering b[i:]
        choice = [0] * (n + 1)  # end of the first piece of that cover (i + 1 with -1 id = skip)
        for i in range(n - 1, -1, -1):
            cost, end = best[i + 1] + _SKIP_COST, -(i + 1)
            for j in range(min(n, i + max_len), i, -1):  # longest first: wins ties
                if b[i:j] in lookup and best[j] + 1 < cost:
                    cost, end = best[j] + 1, j
            best[i], choice[i] = cost, end
        pieces, i, skipped = [], 0, False
        while i < n:
            end = choice[i]
            if end < 0:
                skipped, i = True, -end
            else:
                pieces.append(lookup[b[i:end]])
                i = end
        if not pieces:
            return [], SPLIT_NONE
        return pieces, SPLIT_PARTIAL if skipped else SPLIT_BYTE_DP


def decompose(src: TokenizerInfo, ids: np.ndarray, splitter: ByteSplitter) -> Pieces:
    """Split the canonical bytes of `src` ids (sorted) into `splitter`'s target tokens."""
    ids = np.asarray(ids, dtype=np.int64)
    items = [src.token_bytes[i] for i in ids.tolist()]
    split, method = splitter.split(items)
    lens = np.fromiter((len(p) for p in split), dtype=np.int64, count=len(split))
    ptr = offsets_from_counts(lens)
    pieces = np.fromiter((i for p in split for i in p), dtype=np.int64, count=int(ptr[-1]))
    return Pieces(ids=ids, ptr=ptr, pieces=pieces, method=method)


def decay_weights(ptr: np.ndarray, *, first_weight: float, decay: float, max_pieces: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, position, weight) of every kept piece: piece i (1-based) of a decomposition gets
    `first_weight * decay**(i-1)` for i <= max_pieces, normalised to sum 1 per decomposition."""
    lens = np.diff(ptr)
    owner = np.repeat(np.arange(len(lens)), lens)
    pos = np.arange(int(ptr[-1]), dtype=np.int64) - ptr[owner]
    keep = pos < max_pieces
    owner, pos = owner[keep], pos[keep]
    w = first_weight * np.power(decay, pos.astype(np.float64))
    total = np.bincount(owner, weights=w, minlength=len(lens))
    w = w / total[owner]
    return owner, np.flatnonzero(keep), w


def special_map(src: TokenizerInfo, dst: TokenizerInfo) -> tuple[dict[int, int], list[str]]:
    """Src special id -> dst special id, by role (then fallback role, then identical content).

    Returns the map and a readable list of the src specials left unmatched.
    """
    roles_of: dict[int, list[str]] = {}
    for role, i in sorted(src.special_roles.items()):
        roles_of.setdefault(i, []).append(role)
    content_to_dst = {c: i for i, c in dst.special_tokens.items()}
    out: dict[int, int] = {}
    unmatched: list[str] = []
    for i in sorted(src.special_tokens):
        target = None
        roles = roles_of.get(i, [])
        for role in roles:
            if role in dst.special_roles:
                target = dst.special_roles[role]
                break
        if target is None:
            target = content_to_dst.get(src.special_tokens[i])
        if target is None:
            for role in roles:
                for alt in ROLE_FALLBACKS.get(role, ()):
                    if alt in dst.special_roles:
                        target = dst.special_roles[alt]
                        break
                if target is not None:
                    break
        if target is None:
            if roles:  # role-less reserved specials (Llama's 250 reserved ids) are not reported
                unmatched.append(f"{src.special_tokens[i]} ({'/'.join(roles)})")
        else:
            out[i] = target
    return out, unmatched
