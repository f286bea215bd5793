"""`xtoken-align align --student S --teacher T (--text-file F | --jsonl F) ...`: align a dataset.

Prints summary statistics; `--json` writes one record per sample, `--html` a page to look at the
alignments, `--out` a precomputed alignment artifact (`xtoken_align.batch.alignment_artifacts`).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from xtoken_align import load_tokenizer
from xtoken_align.alignment.chat import check_conversation
from xtoken_align.batch.alignment_artifacts import write_alignment_artifact
from xtoken_align.batch.collate import AlignedBatch, AlignmentCollator, CollateConfig
from xtoken_align.textio import read_utf8
from xtoken_cli import outputs
from xtoken_cli.config_options import bounded, config_from, config_options
from xtoken_core.artifact_format import ALIGNMENT_JSON
from xtoken_core.errors import ConfigError, DataFileError

# The collator options `align` exposes, and their names where they differ from the field's.
COLLATE_FIELDS = ("max_length", "add_special_tokens")
COLLATE_OPTION_NAMES = {"add_special_tokens": "special-tokens"}


def _read_text_lines(path: Path) -> list[str]:
    """One sample per line (the line terminator, `\\n` or `\\r\\n`, is not part of the text)."""
    text = read_utf8(path, "text file")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _read_jsonl(path: Path, field: str) -> list:
    samples = []
    for n, line in enumerate(_read_text_lines(path), start=1):
        if not line.strip():
            raise DataFileError(f"{path}: line {n} is empty; every line must be a JSON object")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise DataFileError(f"{path}: line {n} has no {field!r} field; choose one with --field")
        value = record[field]
        if not isinstance(value, (str, list)):
            raise DataFileError(f"{path}: line {n}: {field!r} must be a string or a list of messages, "
                                f"got {type(value).__name__}")
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataFileError(f"{path}: line {n}: {field!r} holds a lone surrogate (\\ud800-\\udfff), "
                                f"not valid Unicode text") from None
        if isinstance(value, list):  # a conversation: checked here, before any work, naming the line
            check_conversation(value, f"{path}: line {n}")
        samples.append(value)
    return samples


class _Stats:
    def __init__(self):
        self.samples = self.bytes = self.s_tokens = self.t_tokens = 0
        self.chunks = self.correct = self.zero_width = self.exact_bytes = self.bad_bytes = 0
        self.fallback_s = self.fallback_t = 0
        self.shapes: Counter = Counter()

    def add(self, batch: AlignedBatch) -> None:
        s, t, p = batch.student, batch.teachers[0], batch.pairs[0]
        ch = p.chunks
        width = ch[:, 1] - ch[:, 0]
        a_w, b_w = ch[:, 3] - ch[:, 2], ch[:, 5] - ch[:, 4]
        self.samples += len(batch.num_bytes)
        self.bytes += int(batch.num_bytes.sum())
        self.s_tokens += len(s.ids)
        self.t_tokens += len(t.ids)
        self.chunks += len(ch)
        self.correct += int(ch[:, 6].sum())
        self.zero_width += int((width == 0).sum())
        self.exact_bytes += int(width[(a_w == 1) & (b_w == 1) & (ch[:, 6] == 1)].sum())
        self.bad_bytes += int(width[ch[:, 6] == 0].sum())
        self.fallback_s += int(s.fallback.sum())
        self.fallback_t += int(t.fallback.sum())
        cap = lambda w: np.where(w >= 4, 4, w)  # noqa: E731
        self.shapes.update(zip(cap(a_w).tolist(), cap(b_w).tolist()))

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


def _sample_html(k: int, batch: AlignedBatch, b: int, student, teacher) -> str:
    s_ids = batch.student.ids[batch.student.sample(b)]
    t_ids = batch.teachers[0].ids[batch.teachers[0].sample(b)]
    parts = [f'<div class="s"><p>sample {k}: {int(batch.num_bytes[b])} bytes, {len(s_ids)} / '
             f'{len(t_ids)} tokens</p>']
    for row in batch.pairs[0].sample_chunks(b):
        cls = "c" if row[6] else ("c zw" if row[1] == row[0] else "c bad")
        top = "".join(_token_html(student, int(i)) for i in s_ids[row[2]:row[3]])
        bottom = "".join(_token_html(teacher, int(i)) for i in t_ids[row[4]:row[5]])
        parts.append(f'<span class="{cls}" title="bytes {row[0]}..{row[1]}"><span class="r">{top}</span>'
                     f'<span class="r b">{bottom}</span></span>')
    parts.append("</div>")
    return "".join(parts)


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
    samples = _read_text_lines(text_file) if text_file is not None else _read_jsonl(jsonl, field)
    s_info = load_tokenizer(student)
    t_info = load_tokenizer(teacher)
    if s_info.fingerprint == t_info.fingerprint:
        raise ConfigError(f"--student {student} and --teacher {teacher} are the same tokenizer: nothing to align")
    collator = AlignmentCollator(s_info, [t_info], config)
    stats = _Stats()
    html_parts: list[str] = []
    json_fh = outputs.OutputFile(json_out) if json_out else None  # replaces json_out only on commit()

    def batches() -> Iterator[AlignedBatch]:
        for lo in range(0, len(samples), batch_size):
            batch = collator.align(samples[lo:lo + batch_size])
            stats.add(batch)
            s, t, p = batch.student, batch.teachers[0], batch.pairs[0]
            for b in range(len(batch.num_bytes)):
                if json_fh is not None:
                    record = {"bytes": int(batch.num_bytes[b]), "student_tokens": int(s.offsets[b + 1] - s.offsets[b]),
                              "teacher_tokens": int(t.offsets[b + 1] - t.offsets[b]),
                              "chunks": p.sample_chunks(b).tolist()}
                    json_fh.write(json.dumps(record) + "\n")
                if html_out is not None and lo + b < html_samples:
                    html_parts.append(_sample_html(lo + b, batch, b, s_info, t_info))
            yield batch

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
