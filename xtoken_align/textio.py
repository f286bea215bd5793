"""Reading user text files: UTF-8 or a one-line error naming the file, line and byte."""

from __future__ import annotations

from pathlib import Path

from xtoken_core.errors import DataFileError, DataFileNotFoundError


def read_utf8(path: Path, what: str = "file") -> str:
    """The whole file decoded as UTF-8; `DataFileNotFoundError` if it does not exist,
    `DataFileError` if it cannot be read or is not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        error = DataFileNotFoundError if isinstance(exc, FileNotFoundError) else DataFileError
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataFileError(f"{what} {path}: invalid UTF-8 at line {line} (byte {exc.start}: "
                            f"{data[exc.start:exc.start + 1]!r}); the file is not UTF-8: re-encode it") from None


def no_lone_surrogates(text: str, where: str) -> str:
    """`text` itself, or a `DataFileError` naming `where` if it holds a lone surrogate (U+D800..U+DFFF:
    what a JSON `"\\ud800"` escape decodes to; not Unicode text, and no tokenizer accepts it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataFileError(f"{where} holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character "
                            f"{exc.start}), not valid Unicode text") from None
    return text
