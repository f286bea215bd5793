"""Tokenizer fingerprints inside a training batch, and the names that go with them.

A batch records which tokenizers it was aligned for (CONTRACTS §2), one number per row and side:
`tokenizer_fingerprint [B]` int64 for the student and `teacher_{i}_tokenizer_fingerprint [B]` int64
for teacher i (same-vocab teachers included). The number is `fingerprint_id(TokenizerInfo.fingerprint)`:
the first 8 bytes of the fingerprint's sha256 digest, read as a signed big-endian int64. The full
`"sha256:<hex>"` string stays in the artifacts; 64 bits are plenty to tell two tokenizers apart (this
is a consistency check against mistakes, not a security boundary).

`register_name` / `name_of` form a small process-wide fingerprint -> name table, filled by the
tokenizer loader, the collator and the projection reader, so an error about a batch can say
"qwen3" rather than a bare number. Pure Python: the collator writes these numbers, the losses read
them, and neither package needs the other.
"""

from __future__ import annotations

import hashlib
import re

STUDENT_KEY = "tokenizer_fingerprint"

_SHA256 = re.compile(r"sha256:([0-9a-fA-F]{64})")
_NAMES: dict[int, tuple[str, str]] = {}  # fingerprint id -> (name, fingerprint string)


def teacher_key(i: int) -> str:
    """The batch key holding teacher `i`'s fingerprint ids."""
    return f"teacher_{i}_{STUDENT_KEY}"


def digest(fingerprint: str) -> bytes:
    """The 32-byte digest of a `"sha256:<hex>"` fingerprint (another string: the sha256 of its text)."""
    m = _SHA256.fullmatch(fingerprint)
    return bytes.fromhex(m.group(1)) if m else hashlib.sha256(fingerprint.encode("utf-8")).digest()


def fingerprint_id(fingerprint: str) -> int:
    """The int64 a batch stores for `fingerprint` (module doc)."""
    return int.from_bytes(digest(str(fingerprint))[:8], "big", signed=True)


def short(fingerprint: str) -> str:
    """`"sha256:"` and the first 16 hex digits (what `fingerprint_id` keeps), for messages."""
    m = _SHA256.fullmatch(fingerprint)
    return f"sha256:{m.group(1)[:16].lower()}" if m else fingerprint


def id_to_short(value: int) -> str:
    """`short` of the fingerprint a batch number stands for (when the fingerprint is a sha256 one)."""
    return "sha256:" + int(value).to_bytes(8, "big", signed=True).hex()


def register_name(fingerprint: str | None, name: str | None) -> None:
    """Remember `name` for `fingerprint` in this process (the first name given wins)."""
    if fingerprint and name:
        _NAMES.setdefault(fingerprint_id(fingerprint), (str(name), str(fingerprint)))


def name_of(value: int | str) -> str | None:
    """The registered name of a fingerprint (string) or fingerprint id (int); None when unknown."""
    key = fingerprint_id(value) if isinstance(value, str) else int(value)
    entry = _NAMES.get(key)
    return entry[0] if entry else None


def describe(fingerprint: str | None, name: str | None = None) -> str:
    """`"name (sha256:0123456789abcdef)"` for messages; the registered name when none is given."""
    if fingerprint is None:
        return f"{name} (no fingerprint recorded)" if name else "an unrecorded tokenizer"
    name = name or name_of(fingerprint)
    return f"{name} ({short(fingerprint)})" if name else short(fingerprint)


def describe_id(value: int) -> str:
    """`describe` for a number read from a batch."""
    entry = _NAMES.get(int(value))
    if entry is not None:
        return describe(entry[1], entry[0])
    return f"an unregistered tokenizer ({id_to_short(value)})"
