"""Output paths of every command, checked before any work, and written without destroying anything.

`prepare(inputs=..., files=..., artifact=...)` is the first thing a command does after parsing its
options. It raises an `XTokenError` (printed as one `error: ...` line, exit 2) when
- an output file (`--json`, `--html`, `--plot`) is a directory, its parent directory is missing
  (it is never created) or is not a writable directory, or the file exists and is not writable;
- an artifact directory (`--out`) cannot be written (`artifact_format.check_writable`: not a
  directory, a missing parent, or anything in it that is not a previous artifact of the same kind);
- an output is an input, lies inside an input directory, or holds an input (`--jsonl f --json f`,
  `overlap-report llama3 DIR --json DIR/tokenizer.json`, `--text-file d/x.txt --out d`), or two
  outputs are one path;
and it takes the artifact's writer lock for the rest of the command (released when the click
context closes), so a second command writing the same `--out` is refused before its work too.

Output files are written with `atomic_output`: to a temporary file next to the target, moved into
place with `os.replace` only when complete, so a failing run leaves the previous file as it was.
"""

from __future__ import annotations

import os
import secrets
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

import click

from xtoken_core import artifact_format as fmt
from xtoken_core.errors import ConfigError, DataFileError, XTokenError

Named = tuple[str, "str | Path | None"]  # (what the user called it: "--json", "TOKENIZER x", path)


def _resolved(path: str | Path) -> Path:
    """The path with every existing directory component resolved (symlinks too), the last
    component kept as it is (an output replaces a symlink, never writes through it)."""
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    return Path(os.path.realpath(p.parent)) / p.name if p.name else Path(os.path.realpath(p))


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def tokenizer_inputs(name_or_path: str) -> list[Path]:
    """What reading tokenizer `name_or_path` reads, as far as it is known without reading it: the
    path given (a directory or a `tokenizer.json`) or a bundled fixture's directory; a Hub name
    gives nothing (its files live in the Hugging Face cache)."""
    from xtoken_align.tokenizer.fixtures import resolve_fixture

    p = Path(name_or_path).expanduser()
    if p.exists():
        return [p]
    try:
        fixture = resolve_fixture(str(name_or_path))
    except XTokenError:
        return []
    return [fixture] if fixture is not None else []


def check_output_file(option: str, path: str | Path) -> None:
    """Raise `DataFileError` unless `path` can be written as a file, without creating anything."""
    p = Path(path)
    if p.is_dir():
        raise DataFileError(f"{option} {p} is a directory; give the path of a file to write")
    parent = Path(os.path.abspath(p)).parent
    if not parent.exists():
        raise DataFileError(f"cannot write {option} {p}: the directory {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise DataFileError(f"cannot write {option} {p}: {parent} is not a directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise DataFileError(f"cannot write {option} {p}: the file is not writable")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataFileError(f"cannot write {option} {p}: the directory {parent} is not writable")


def _conflicts(inputs: list[tuple[str, Path]], outputs: list[tuple[str, Path, bool]]) -> None:
    """Refuse an output that is, lies inside or holds an input, and two outputs at one path."""
    for option, out, is_dir in outputs:
        target = _resolved(out)
        for what, given in inputs:
            src = _real(given)
            same = target == src or (target.exists() and src.exists() and os.path.samefile(target, src))
            if same:
                raise ConfigError(f"{option} {out} is the input {what}: writing it would destroy the input; "
                                  "choose another output path")
            if _within(target, src):
                raise ConfigError(f"{option} {out} is inside the input {what}: choose an output path outside it")
            if is_dir and _within(src, target):
                raise ConfigError(f"{option} {out} holds the input {what}: the artifact directory would replace "
                                  "what is in it; choose another directory")
    for i, (a_opt, a, a_dir) in enumerate(outputs):
        for b_opt, b, b_dir in outputs[i + 1:]:
            ra, rb = _resolved(a), _resolved(b)
            if ra == rb or (a_dir and _within(rb, ra)) or (b_dir and _within(ra, rb)):
                raise ConfigError(f"{a_opt} {a} and {b_opt} {b} are the same path or one lies inside the other; "
                                  "give each output its own path")


def prepare(*, inputs: Iterable[tuple[str, str | Path | Iterable[Path] | None]] = (),
            files: Iterable[tuple[str, str | Path | None]] = (),
            artifact: tuple[str, str | Path | None, str] | None = None) -> None:
    """Check a command's outputs before its work (module doc) and hold `artifact`'s writer lock
    until the command ends.

    `inputs`: `(name, path or paths)` of everything the command reads (None: not given);
    `files`: `(option, path)` of output files; `artifact`: `(option, directory, marker)` with the
    marker of its kind (`artifact_format.PROJECTION_JSON`, `ALIGNMENT_JSON`)."""
    ins: list[tuple[str, Path]] = []
    for name, value in inputs:
        if value is None:
            continue
        for p in ([value] if isinstance(value, (str, os.PathLike)) else value):
            ins.append((name, Path(p)))
    outs: list[tuple[str, Path, bool]] = []
    for option, path in files:
        if path is not None:
            check_output_file(option, path)
            outs.append((option, Path(path), False))
    if artifact is not None and artifact[1] is not None:
        outs.append((artifact[0], Path(artifact[1]), True))
    _conflicts(ins, outs)
    if artifact is not None and artifact[1] is not None:
        option, directory, marker = artifact
        try:
            fmt.check_writable(Path(directory), marker=marker)
        except XTokenError as exc:
            raise type(exc)(f"{option}: {exc}") from None
    if artifact is not None and artifact[1] is not None:
        stack = ExitStack()
        stack.enter_context(fmt.writer_lock(Path(artifact[1])))
        ctx = click.get_current_context(silent=True)
        if ctx is None:  # pragma: no cover - only commands call this
            stack.close()
        else:
            ctx.call_on_close(stack.close)


class OutputFile:
    """A text file written to a temporary sibling and moved onto `path` by `commit()`; `close()`
    without a commit removes the temporary, leaving a previous file at `path` as it was. A target
    that exists and is not a regular file (`/dev/null`, a pipe) is written directly."""

    def __init__(self, path: str | Path, mode: str = "w"):
        self.path = Path(path)
        direct = self.path.exists() and not self.path.is_file()
        self._tmp = None if direct else self.path.with_name(f".{self.path.name}.tmp-{secrets.token_hex(4)}")
        kwargs = {} if "b" in mode else {"encoding": "utf-8"}
        try:
            self._fh: IO = open(self._tmp or self.path, mode, **kwargs)
        except OSError as exc:
            raise DataFileError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._done = False

    @property
    def file(self) -> IO:
        """The open file (for writers that need a real file object, e.g. matplotlib's savefig)."""
        return self._fh

    def write(self, data) -> int:
        return self._fh.write(data)

    def commit(self) -> None:
        """Move the complete file into place (atomic at `path`)."""
        if self._done:
            return
        try:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            if self._tmp is not None:
                os.replace(self._tmp, self.path)
        except OSError as exc:
            self.close()
            raise DataFileError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._done = True

    def close(self) -> None:
        """Discard the file unless it was committed."""
        if self._done:
            return
        self._done = True
        self._fh.close()
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass


@contextmanager
def atomic_output(path: str | Path, mode: str = "w") -> Iterator[OutputFile]:
    """`with atomic_output(p) as fh: fh.write(...)`: committed on normal exit, discarded on error."""
    out = OutputFile(path, mode)
    try:
        yield out
        out.commit()
    finally:
        out.close()


def write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_output(path) as fh:
        fh.write(text)
