"""Vocabulary strings -> canonical token bytes, per tokenizer kind.

A token's *canonical bytes* are the exact UTF-8 bytes it contributes to the text (BRIEF §3):

- ByteLevel BPE (GPT-2, Llama-3, Qwen, o200k, DeepSeek, Tekken): each vocabulary character stands
  for one byte through GPT-2's byte-to-unicode table (`Ġ` = 0x20, `Ċ` = 0x0A, ...).
- SentencePiece / Metaspace (Llama-2, Mistral v1): `▁` is a space; with byte fallback `<0xNN>` is
  the single raw byte 0xNN; everything else is the piece's UTF-8.
- WordPiece (BERT): `##x` continues a word and contributes `x`; a word-initial piece contributes
  itself (the whitespace before it was dropped by the pre-tokenizer: WordPiece is lossy).

Bytes are compared, never decoded strings: a byte-level token can hold half a UTF-8 character.
"""

from __future__ import annotations

import re

import numpy as np

METASPACE = "\u2581"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (256 entries)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


# str.translate table: byte-level character -> the latin-1 character of its byte, so that
# `piece.translate(_BYTE_LEVEL_TABLE).encode("latin-1")` gives the token's bytes in one C call.
_BYTE_LEVEL_TABLE = {ord(ch): b for b, ch in gpt2_bytes_to_unicode().items()}
_BYTE_LEVEL_ALPHABET = frozenset(_BYTE_LEVEL_TABLE)


def byte_level_piece_to_bytes(piece: str) -> bytes | None:
    """Bytes of a ByteLevel vocabulary piece, or None if it holds a character outside the alphabet."""
    try:
        return piece.translate(_BYTE_LEVEL_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        return None


def metaspace_piece_to_bytes(piece: str, *, byte_fallback: bool, replacement: str = METASPACE) -> bytes:
    """Bytes of a SentencePiece/Metaspace piece (`▁` -> space, `<0xNN>` -> byte with byte fallback)."""
    if byte_fallback and len(piece) == 6:
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
    return piece.replace(replacement, " ").encode("utf-8")


def wordpiece_piece_to_bytes(piece: str, *, prefix: str = "##") -> bytes:
    """Bytes of a WordPiece piece: a continuation `##x` contributes `x`."""
    if piece.startswith(prefix) and len(piece) > len(prefix):
        piece = piece[len(prefix):]
    return piece.encode("utf-8")


def offsets_from_counts(counts) -> np.ndarray:
    """`[n + 1] int64` CSR offsets of n consecutive runs: run i is `[out[i], out[i + 1])`."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def pack(token_bytes: list[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten per-id bytes into (`data [N] uint8`, `offsets [V + 1] int64`); None packs as empty.

    Token `i` is `data[offsets[i]:offsets[i + 1]]`: the layout numba kernels read.
    """
    lengths = np.fromiter((0 if b is None else len(b) for b in token_bytes), dtype=np.int64,
                          count=len(token_bytes))
    offsets = offsets_from_counts(lengths)
    data = np.frombuffer(b"".join(b for b in token_bytes if b is not None), dtype=np.uint8)
    return data, offsets
