"""Reading user text files: UTF-8, streamed line by line, or a one-line error naming the file,
line and byte.

Every reader of a user's text (`align --text-file` / `--jsonl`, conversations in JSON lines,
`build-projection --corpus`) goes through here, so they agree on:
- a UTF-8 byte-order mark at the start of a file is dropped (0 bytes of text); U+FEFF anywhere else,
  including the start of a later line or inside a JSON string, is text (3 bytes);
- a line ends at `\\n`; a `\\r` before it is part of the terminator; no other character ends a line;
- a string holding a lone surrogate (possible through a JSON `\\ud800` escape) is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from xtoken_core.errors import DataFileError, DataFileNotFoundError

BOM = b"\xef\xbb\xbf"
_READ_BLOCK = 1 << 20  # bytes a line is read in at a time (a line may be any length)


def _open_error(path: Path, what: str, exc: OSError) -> DataFileError:
    error = DataFileNotFoundError if isinstance(exc, FileNotFoundError) else DataFileError
    return error(f"cannot read {what} {path}: {exc.strerror or exc}")


def _decode(data: bytes, path: Path, what: str, line: int, base: int) -> str:
    """`data` (line `line`, starting at byte `base` of the file) decoded as UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line += data[:exc.start].count(b"\n")
        raise DataFileError(f"{what} {path}: invalid UTF-8 at line {line} (byte {base + exc.start}: "
                            f"{data[exc.start:exc.start + 1]!r}); the file is not UTF-8: re-encode it") from None


def read_utf8(path: Path, what: str = "file") -> str:
    """The whole file decoded as UTF-8, a leading byte-order mark dropped; `DataFileNotFoundError`
    if it does not exist, `DataFileError` if it cannot be read or is not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _open_error(path, what, exc) from None
    skip = len(BOM) if data.startswith(BOM) else 0
    return _decode(data[skip:], path, what, 1, skip)


def iter_lines(path: Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """`(line number, text)` of every line of the file, read one line at a time (memory holds one
    line, not the file). The terminator (`\\n` or `\\r\\n`) is not part of the text; a last line
    without one counts; an empty file has no lines. A leading byte-order mark is dropped."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise _open_error(path, what, exc) from None
    with fh:
        n, base = 0, 0
        try:
            for raw in iter(lambda: fh.readline(_READ_BLOCK), b""):
                parts = [raw]
                while not parts[-1].endswith(b"\n"):  # a line longer than one block
                    more = fh.readline(_READ_BLOCK)
                    if not more:
                        break
                    parts.append(more)
                data = b"".join(parts) if len(parts) > 1 else raw
                n += 1
                start = base
                base += len(data)
                if n == 1 and data.startswith(BOM):
                    data, start = data[len(BOM):], start + len(BOM)
                    if not data:  # the file is only a byte-order mark: no lines, like an empty file
                        return
                data = data[:-1] if data.endswith(b"\n") else data
                data = data[:-1] if data.endswith(b"\r") else data
                yield n, _decode(data, path, what, n, start)
        except OSError as exc:
            raise _open_error(path, what, exc) from None


def check_text(value, where: str) -> None:
    """Raise `DataFileError` (`where: ... lone surrogate`) if a string, or any string inside a
    JSON value, holds a lone surrogate (not valid Unicode text; tokenizers cannot take it)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataFileError(f"{where} holds a lone surrogate (\\ud800-\\udfff), not valid Unicode text") from None


def iter_jsonl(path: Path, what: str = "JSON lines file", hint: str = "") -> Iterator[tuple[int, dict]]:
    """`(line number, object)` of every line of a JSON Lines file, streamed; an empty line, a line
    that is not valid JSON or not a JSON object is a `DataFileError` naming the line (and ending
    with `hint`)."""
    for n, line in iter_lines(path, what):
        if not line.strip():
            raise DataFileError(f"{path}: line {n} is empty; every line must be a JSON object{hint}")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}: line {n} is not valid JSON ({exc.msg}){hint}") from None
        if not isinstance(record, dict):
            raise DataFileError(f"{path}: line {n} is a JSON {type(record).__name__}, not an object{hint}")
        yield n, record
