"""`xtoken-align align --student S --teacher T (--text-file F | --jsonl F) ...`: align a dataset.

Prints summary statistics; `--json` writes one record per sample, `--html` a page to look at the
alignments, `--out` a precomputed alignment artifact (`xtoken_align.batch.alignment_artifacts`).
The input is checked in one pass, then streamed batch by batch; a text longer than
`windows.LONG_TEXT_CHARS` is aligned in windows (`xtoken_align.alignment.windows`) with the same
record as aligning it whole, so memory follows the batch and the window, not the file.
"""

from __future__ import annotations

import contextlib
import html
import json
import shutil
import tempfile
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from xtoken_align import load_tokenizer
from xtoken_align.alignment import windows
from xtoken_align.alignment.aligner import PairBatch, SideBatch
from xtoken_align.alignment.chat import check_conversation
from xtoken_align.batch.alignment_artifacts import write_alignment_artifact
from xtoken_align.batch.collate import AlignedBatch, AlignmentCollator, CollateConfig, truncate
from xtoken_align.textio import check_text, iter_jsonl, iter_lines
from xtoken_align.tokenizer.canonical_bytes import offsets_from_counts
from xtoken_cli import outputs
from xtoken_cli.config_options import bounded, config_from, config_options
from xtoken_core.artifact_format import ALIGNMENT_JSON
from xtoken_core.errors import ConfigError, DataFileError

# The collator options `align` exposes, and their names where they differ from the field's.
COLLATE_FIELDS = ("max_length", "add_special_tokens")
COLLATE_OPTION_NAMES = {"add_special_tokens": "special-tokens"}
HTML_MAX_CHUNKS = 5000  # chunks drawn per sample in the --html page (a note says how many more)


def _text_samples(path: Path) -> Iterator[str]:
    """One sample per line (the line terminator, `\\n` or `\\r\\n`, is not part of the text), streamed."""
    for _, line in iter_lines(path, "text file"):
        yield line


def _jsonl_samples(path: Path, field: str) -> Iterator:
    """The `field` of every line of a JSON Lines file, streamed."""
    for n, record in iter_jsonl(path):
        if field not in record:
            raise DataFileError(f"{path}: line {n} has no {field!r} field; choose one with --field")
        value = record[field]
        if not isinstance(value, (str, list)):
            raise DataFileError(f"{path}: line {n}: {field!r} must be a string or a list of messages, "
                                f"got {type(value).__name__}")
        check_text(value, f"{path}: line {n}: {field!r}")
        if isinstance(value, list):  # a conversation: checked before any work, naming the line
            check_conversation(value, f"{path}: line {n}")
        yield value


class _Stats:
    def __init__(self):
        self.samples = self.bytes = self.s_tokens = self.t_tokens = 0
        self.chunks = self.correct = self.zero_width = self.exact_bytes = self.bad_bytes = 0
        self.fallback_s = self.fallback_t = 0
        self.shapes: Counter = Counter()

    def add(self, batch: AlignedBatch) -> None:
        s, t, p = batch.student, batch.teachers[0], batch.pairs[0]
        self.add_counts(len(batch.num_bytes), int(batch.num_bytes.sum()), len(s.ids), len(t.ids), p.chunks,
                        int(s.fallback.sum()), int(t.fallback.sum()))

    def add_counts(self, samples: int, n_bytes: int, s_tokens: int, t_tokens: int, ch: np.ndarray,
                   fallback_s: int, fallback_t: int) -> None:
        width = ch[:, 1] - ch[:, 0]
        a_w, b_w = ch[:, 3] - ch[:, 2], ch[:, 5] - ch[:, 4]
        self.samples += samples
        self.bytes += n_bytes
        self.s_tokens += s_tokens
        self.t_tokens += t_tokens
        self.chunks += len(ch)
        self.correct += int(ch[:, 6].sum())
        self.zero_width += int((width == 0).sum())
        self.exact_bytes += int(width[(a_w == 1) & (b_w == 1) & (ch[:, 6] == 1)].sum())
        self.bad_bytes += int(width[ch[:, 6] == 0].sum())
        self.fallback_s += fallback_s
        self.fallback_t += fallback_t
        cap = lambda w: np.where(w >= 4, 4, w)  # noqa: E731
        self.shapes.update(zip(cap(a_w).tolist(), cap(b_w).tolist()))

    def merge(self, other: "_Stats") -> None:
        for key in ("samples", "bytes", "s_tokens", "t_tokens", "chunks", "correct", "zero_width",
                    "exact_bytes", "bad_bytes", "fallback_s", "fallback_t"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.shapes.update(other.shapes)

    def print(self, student: str, teacher: str) -> None:
        pct = lambda x, n: f"{100.0 * x / n:.2f}%" if n else "-"  # noqa: E731
        click.echo(f"samples {self.samples}, text bytes {self.bytes}")
        click.echo(f"tokens: student {student} {self.s_tokens}, teacher {teacher} {self.t_tokens}")
        click.echo(f"chunks {self.chunks}: correct {self.correct}, not correct {self.chunks - self.correct} "
                   f"(of which zero-width {self.zero_width}; bytes in not-correct chunks {self.bad_bytes})")
        click.echo(f"bytes in exact 1:1 chunks: {pct(self.exact_bytes, self.bytes)}")
        click.echo("chunk sizes (student tokens : teacher tokens, 4 = 4 or more):")
        name = lambda n: "4+" if n == 4 else str(n)  # noqa: E731
        for (a, b), n in self.shapes.most_common(12):
            click.echo(f"  {name(a):>2}:{name(b):<2} {n:>10}  {pct(n, self.chunks):>7}")
        if self.fallback_s or self.fallback_t:
            click.echo(f"samples whose tokens do not spell the text (a normalizer or special-token "
                       f"strings; placed by the NFC mapping or the tokenizer's offsets): "
                       f"student {self.fallback_s}, teacher {self.fallback_t}")


_CSS = """body{font-family:sans-serif;margin:1em}.s{margin:1em 0;border-top:1px solid #999}
.c{display:inline-flex;flex-direction:column;margin:2px 1px;border:2px solid #2a2;vertical-align:top}
.c.bad{border-color:#d22}.c.zw{border:2px dashed #888}.r{display:flex;font-family:monospace;font-size:12px}
.t{padding:1px 3px;border-right:1px solid #ccc;white-space:pre}.r.b{background:#eef}.sp{color:#a40}"""


def _token_html(info, i: int) -> str:
    cls = "t sp" if info.is_special[i] else "t"
    return f'<span class="{cls}" title="id {i}">{html.escape(info.token_repr(i))}</span>'


def _chunk_boxes(rows: np.ndarray, s_ids: np.ndarray, t_ids: np.ndarray, s_base: int, t_base: int,
                 student, teacher) -> str:
    """HTML boxes of chunk `rows`; `s_ids`/`t_ids` hold the sample's tokens from `s_base`/`t_base`."""
    parts = []
    for row in rows:
        cls = "c" if row[6] else ("c zw" if row[1] == row[0] else "c bad")
        top = "".join(_token_html(student, int(i)) for i in s_ids[row[2] - s_base:row[3] - s_base])
        bottom = "".join(_token_html(teacher, int(i)) for i in t_ids[row[4] - t_base:row[5] - t_base])
        parts.append(f'<span class="{cls}" title="bytes {row[0]}..{row[1]}"><span class="r">{top}</span>'
                     f'<span class="r b">{bottom}</span></span>')
    return "".join(parts)


def _sample_page(k: int, n_bytes: int, n_s: int, n_t: int, boxes: str, n_chunks: int) -> str:
    more = n_chunks - min(n_chunks, HTML_MAX_CHUNKS)
    note = f"<p>... {more} more chunks not shown (at most {HTML_MAX_CHUNKS} per sample)</p>" if more else ""
    return f'<div class="s"><p>sample {k}: {n_bytes} bytes, {n_s} / {n_t} tokens</p>{boxes}{note}</div>'


def _sample_html(k: int, batch: AlignedBatch, b: int, student, teacher) -> str:
    s_ids = batch.student.ids[batch.student.sample(b)]
    t_ids = batch.teachers[0].ids[batch.teachers[0].sample(b)]
    rows = batch.pairs[0].sample_chunks(b)
    boxes = _chunk_boxes(rows[:HTML_MAX_CHUNKS], s_ids, t_ids, 0, 0, student, teacher)
    return _sample_page(k, int(batch.num_bytes[b]), len(s_ids), len(t_ids), boxes, len(rows))


def _record_head(n_bytes: int, n_s: int, n_t: int) -> str:
    """The `--json` record up to its chunks, as `json.dumps` writes the whole record."""
    return json.dumps({"bytes": n_bytes, "student_tokens": n_s, "teacher_tokens": n_t, "chunks": []})[:-2]


def _rows_json(rows: np.ndarray) -> Iterator[str]:
    """`rows` as `json.dumps` writes them inside a list, a block of rows at a time."""
    for lo in range(0, len(rows), 65536):
        yield json.dumps(rows[lo:lo + 65536].tolist())[1:-1]


def _segments(samples: list) -> Iterator[tuple[int, list]]:
    """`(offset, samples)` runs of `samples` in order: each long text (`windows.is_long`) alone,
    the others together."""
    run_start = 0
    for i, x in enumerate(samples):
        if windows.is_long(x):
            if i > run_start:
                yield run_start, samples[run_start:i]
            yield i, [x]
            run_start = i + 1
    if run_start < len(samples):
        yield run_start, samples[run_start:]


def _concat(batches: list[AlignedBatch]) -> AlignedBatch:
    """One `AlignedBatch` (student and one teacher) of several, samples in order."""
    if len(batches) == 1:
        return batches[0]
    cat = lambda parts, f: np.concatenate([getattr(x, f) for x in parts])  # noqa: E731
    joined_offsets = lambda parts: offsets_from_counts(np.concatenate([np.diff(x.offsets) for x in parts]))  # noqa: E731

    def side(parts: list[SideBatch]) -> SideBatch:
        return SideBatch(cat(parts, "ids"), joined_offsets(parts), cat(parts, "starts"), cat(parts, "ends"),
                         cat(parts, "faithful"), cat(parts, "keys"), cat(parts, "fallback"))

    pairs = [b.pairs[0] for b in batches]
    pair = PairBatch(cat(pairs, "chunks").reshape(-1, 7), joined_offsets(pairs), cat(pairs, "a_chunk"),
                     cat(pairs, "b_chunk"), cat(pairs, "a_exact"), cat(pairs, "b_exact"))
    return AlignedBatch(side([b.student for b in batches]), [side([b.teachers[0] for b in batches])], [pair],
                        cat(batches, "num_bytes"))


@click.command("align")
@click.option("--student", required=True, help="Student tokenizer: path, fixture name or Hub name.")
@click.option("--teacher", required=True, help="Teacher tokenizer: path, fixture name or Hub name.")
@click.option("--text-file", type=click.Path(path_type=Path), help="UTF-8 text file, one sample per line.")
@click.option("--jsonl", type=click.Path(path_type=Path), help="JSON Lines file, one sample per line.")
@click.option("--field", default="text", show_default=True,
              help="JSONL field: a string (text) or a list of {role, content} messages (conversation).")
@config_options(CollateConfig, only=COLLATE_FIELDS, names=COLLATE_OPTION_NAMES,
                help={"max_length": "Token budget per side; both sides are cut at one shared chunk boundary."})
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write one JSON record per sample.")
@click.option("--html", "html_out", type=click.Path(path_type=Path), help="Write an HTML page of the alignments.")
@click.option("--html-samples", default=50, show_default=True, type=bounded(int, min=0, max=10_000),
              help="Samples shown in the HTML page.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Write a precomputed alignment artifact directory.")
@click.option("--batch-size", default=256, show_default=True, type=bounded(int, min=1, max=65_536),
              help="Samples aligned per call.")
@click.option("--shard-size", default=4096, show_default=True, type=bounded(int, min=1, max=1_048_576),
              help="Samples per artifact shard.")
def align_cmd(student, teacher, text_file, jsonl, field, json_out, html_out, html_samples, out_dir, batch_size,
              shard_size, **options):
    """Align a dataset between a student and a teacher tokenizer and report the chunks."""
    if (text_file is None) == (jsonl is None):
        raise ConfigError("give exactly one input: --text-file F or --jsonl F")
    config = config_from(CollateConfig, options, COLLATE_FIELDS)
    outputs.prepare(inputs=[("--text-file", text_file), ("--jsonl", jsonl),
                            ("--student", outputs.tokenizer_inputs(student)),
                            ("--teacher", outputs.tokenizer_inputs(teacher))],
                    files=[("--json", json_out), ("--html", html_out)], artifact=("--out", out_dir, ALIGNMENT_JSON))

    def samples() -> Iterator:  # streamed: memory holds a batch, never the file
        return _text_samples(text_file) if text_file is not None else _jsonl_samples(jsonl, field)

    for _ in samples():  # a bad line is an error before any work (a pass that keeps nothing)
        pass
    s_info = load_tokenizer(student)
    t_info = load_tokenizer(teacher)
    if s_info.fingerprint == t_info.fingerprint:
        raise ConfigError(f"--student {student} and --teacher {teacher} are the same tokenizer: nothing to align")
    collator = AlignmentCollator(s_info, [t_info], config)
    stats = _Stats()
    html_parts: list[str] = []
    json_fh = outputs.OutputFile(json_out) if json_out else None  # replaces json_out only on commit()

    def emit(k0: int, batch: AlignedBatch) -> None:
        """Stats, `--json` records and HTML of an aligned batch whose first sample is number k0."""
        stats.add(batch)
        s, t, p = batch.student, batch.teachers[0], batch.pairs[0]
        for b in range(len(batch.num_bytes)):
            if json_fh is not None:
                record = {"bytes": int(batch.num_bytes[b]), "student_tokens": int(s.offsets[b + 1] - s.offsets[b]),
                          "teacher_tokens": int(t.offsets[b + 1] - t.offsets[b]),
                          "chunks": p.sample_chunks(b).tolist()}
                json_fh.write(json.dumps(record) + "\n")
            if html_out is not None and k0 + b < html_samples:
                html_parts.append(_sample_html(k0 + b, batch, b, s_info, t_info))

    def long_text(k: int, text: str) -> AlignedBatch | None:
        """Align long text number k in windows (`xtoken_align.alignment.windows`), its record streamed
        through a temporary file (the token counts come first); with a budget (`--max-length`) the
        pieces up to it are joined and truncated like any batch. Returns the sample's batch for
        `--out`."""
        truncating = config.max_length is not None or config.teacher_budget is not None
        big = np.iinfo(np.int64).max
        max_s = config.max_length if config.max_length is not None else big
        max_t = config.teacher_budget if config.teacher_budget is not None else big
        keep = out_dir is not None or truncating
        n_bytes = len(text.encode("utf-8"))
        spilling = json_fh is not None and not truncating
        with tempfile.TemporaryFile("w+", encoding="utf-8") if spilling else contextlib.nullcontext() as spill:
            pieces, local, boxes, fb = [], _Stats(), [], [False, False]
            for piece in windows.align_long(s_info, t_info, text, add_special_tokens=config.add_special_tokens):
                if piece is windows.RESTART:  # started over: drop what this text has so far
                    pieces, local, boxes, fb = [], _Stats(), [], [False, False]
                    if spill is not None:
                        spill.seek(0)
                        spill.truncate()
                    continue
                fb = [fb[0] or bool(piece.a.fallback.any()), fb[1] or bool(piece.b.fallback.any())]
                if truncating:  # pieces up to the first one past the budget (later ones cannot be kept)
                    last = pieces[-1].pair.chunks[-1] if pieces else None
                    if last is None or (last[3] <= max_s and last[5] <= max_t):
                        pieces.append(piece)
                    continue
                if keep:
                    pieces.append(piece)
                ch = piece.pair.chunks
                if spill is not None:
                    for part in _rows_json(ch):
                        spill.write((", " if spill.tell() else "") + part)
                if html_out is not None and k < html_samples and local.chunks < HTML_MAX_CHUNKS:
                    boxes.append(_chunk_boxes(ch[:HTML_MAX_CHUNKS - local.chunks], piece.a.ids, piece.b.ids,
                                              local.s_tokens, local.t_tokens, s_info, t_info))
                local.add_counts(0, 0, len(piece.a.ids), len(piece.b.ids), ch, 0, 0)
            batch = None
            if keep:
                a, b, pair = windows.join(pieces)
                a.fallback[:], b.fallback[:] = fb
                batch = AlignedBatch(a, [b], [pair], np.array([n_bytes], np.int64))
            if truncating:
                batch = truncate(batch, config.max_length, config.teacher_budget)
                emit(k, batch)
                return batch
            local.add_counts(1, n_bytes, 0, 0, np.zeros((0, 7), np.int64), int(fb[0]), int(fb[1]))
            stats.merge(local)
            if spill is not None:
                json_fh.write(_record_head(n_bytes, local.s_tokens, local.t_tokens))
                spill.seek(0)
                shutil.copyfileobj(spill, json_fh)
                json_fh.write("]}\n")
        if html_out is not None and k < html_samples:
            html_parts.append(_sample_page(k, n_bytes, local.s_tokens, local.t_tokens, "".join(boxes),
                                           local.chunks))
        return batch

    def batches() -> Iterator[AlignedBatch]:
        stream = samples()
        k = 0
        while batch_samples := list(islice(stream, batch_size)):
            parts = []
            for at, segment in _segments(batch_samples):
                if len(segment) == 1 and windows.is_long(segment[0]):
                    parts.append(long_text(k + at, segment[0]))
                else:
                    parts.append(collator.align(segment))
                    emit(k + at, parts[-1])
            k += len(batch_samples)
            if out_dir is not None:
                yield _concat(parts)

    try:
        if out_dir is not None:
            recorded = {"max_length": config.max_length, "add_special_tokens": config.add_special_tokens,
                        "input": str(text_file or jsonl), "field": field if jsonl else None}
            write_alignment_artifact(out_dir, s_info, t_info, batches(), shard_size=shard_size, options=recorded)
        else:
            for _ in batches():
                pass
        if json_fh is not None:
            json_fh.commit()
    finally:
        if json_fh is not None:
            json_fh.close()
    stats.print(s_info.name, t_info.name)
    if html_out is not None:
        title = html.escape(f"{s_info.name} (top) vs {t_info.name} (bottom)")
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}"
                f"</style></head><body><h1>{title}</h1><p>Green: correct chunk; red: not correct; dashed: "
                f"zero-width (special tokens, template scaffolding).</p>{''.join(html_parts)}</body></html>")
        outputs.write_text(html_out, page)
        click.echo(f"wrote {html_out}")
    if json_out is not None:
        click.echo(f"wrote {json_out}")
    if out_dir is not None:
        click.echo(f"wrote alignment artifact {out_dir}")
