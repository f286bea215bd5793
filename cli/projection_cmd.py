"""`xtoken-align build-projection` and `xtoken-align inspect`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np

from xtoken_align import load_tokenizer
from xtoken_align.projection import artifacts as art
from xtoken_align.projection.builder import ProjectionConfig
from xtoken_cli import outputs
from xtoken_cli.config_options import bounded, config_from, config_options
from xtoken_core.artifact_format import projection_sides
from xtoken_core.errors import ArtifactError, XTokenError


class _StepProgress:
    """A rich progress display on stderr: one line per step, a bar where the step has a total."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<52}"), BarColumn(),
                                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                  console=Console(stderr=True), transient=False)
        self._task = None
        self._name = None

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self._finish()
        else:  # an error message follows: leave no half-finished display above it
            self._progress.live.transient = True
        self._progress.stop()

    def _finish(self):
        if self._task is not None:
            t = self._progress.tasks[self._task]
            self._progress.update(self._task, total=t.total or 1, completed=t.total or 1)

    def __call__(self, step: str, completed: int | None = None, total: int | None = None) -> None:
        if step != self._name:
            self._finish()
            self._name = step
            self._task = self._progress.add_task(step, total=total or 1, completed=0)
        if completed is not None:
            self._progress.update(self._task, completed=completed, total=total)


# Option names that differ from the ProjectionConfig field names (the rest: `top_k` -> `--top-k`).
PROJECTION_OPTION_NAMES = {"student_model_vocab_size": "student-vocab-size",
                           "teacher_model_vocab_size": "teacher-vocab-size"}


@click.command("build-projection")
@click.option("--student", required=True, help="Student tokenizer: fixture name, local path or Hub name.")
@click.option("--teacher", required=True, help="Teacher tokenizer: fixture name, local path or Hub name.")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Artifact directory to write (new, empty, or an earlier projection artifact).")
@click.option("--corpus", type=click.Path(path_type=Path),
              help="UTF-8 corpus (JSON lines with a \"text\" field, or plain text lines) whose co-occurrence "
                   "counts refine the rule-based rows.")
@click.option("--corpus-format", type=click.Choice(["auto", "jsonl", "text"]), default="auto", show_default=True,
              help="How --corpus is read: auto = JSON lines for a .jsonl/.ndjson/.json file, else one text per line.")
@config_options(ProjectionConfig, names=PROJECTION_OPTION_NAMES,
                help={"both_directions": "Also write the teacher-to-student projection under "
                                         "OUT/teacher_to_student/."})
def build_projection_cmd(student: str, teacher: str, out: Path, corpus: Path | None, corpus_format: str,
                         **options) -> None:
    """Build a sparse student-to-teacher projection (CONTRACTS §4 artifact) into OUT."""
    from xtoken_align.projection.builder import build_projection, model_vocab_sizes
    from xtoken_align.projection.refine import read_corpus

    start = time.perf_counter()
    cfg = config_from(ProjectionConfig, options)
    outputs.prepare(inputs=[("--student", outputs.tokenizer_inputs(student)),  # fail before the work, not after
                            ("--teacher", outputs.tokenizer_inputs(teacher)), ("--corpus", corpus)],
                    artifact=("--out", out, art.PROJECTION_JSON))
    texts = read_corpus(corpus, corpus_format) if corpus is not None else None
    s_tok = load_tokenizer(student)  # ~0.5 s each: no progress display, so errors stay one line
    t_tok = load_tokenizer(teacher)
    model_vocab_sizes(s_tok, t_tok, cfg)
    with _StepProgress() as progress:
        build = build_projection(s_tok, t_tok, cfg, corpus=texts, corpus_name=str(corpus) if corpus else None,
                                 progress=progress)
        progress("writing artifact")
        build.save(out)
    st = build.forward.meta["stats"]
    extra = f", {st['corpus_refined_rows']} refined by the corpus" if texts is not None else ""
    if build.reverse is not None:
        extra += f"; teacher_to_student {build.reverse.meta['stats']['mapped_rows']} mapped rows"
    if st["unmatched_special_roles"]:
        extra += f"; unmatched specials: {', '.join(st['unmatched_special_roles'])}"
    click.echo(f"wrote {out}: {s_tok.name} -> {t_tok.name}, {st['rows']} rows x top-{cfg.top_k}: "
               f"{st['exact_rows']} exact, {st['decomposed_rows']} decomposed, {st['special_rows']} special, "
               f"{st['unmapped_rows']} unmapped{extra}; {time.perf_counter() - start:.1f} s")


def _sample_rows(kind: np.ndarray, code: int, n: int) -> list[int]:
    ids = np.flatnonzero(kind == code)
    if len(ids) <= n:
        return ids.tolist()
    return ids[np.linspace(0, len(ids) - 1, n).round().astype(int)].tolist()


def _try_load(side: dict):
    if not isinstance(side.get("name"), str) or not isinstance(side.get("fingerprint"), str):
        return None  # a learned projection whose parent named no tokenizers
    try:
        tok = load_tokenizer(side["name"])
    except XTokenError:
        return None
    return tok if tok.fingerprint == side["fingerprint"] else None


def _check_inspect_meta(meta: dict, path: Path) -> None:
    """What `inspect` shows beyond what `read_projection` checks: `method {name, params?}`, `stats`,
    and each side's `name` / `fingerprint` (strings, or null in a learned projection without a
    named parent) and `model_vocab_size`."""
    where = path if path.is_file() else path / art.PROJECTION_JSON

    def fail(what: str) -> ArtifactError:
        return ArtifactError(f"{where}: {what}; rebuild the artifact")

    method = meta.get("method")
    if not (isinstance(method, dict) and isinstance(method.get("name"), str)
            and isinstance(method.get("params", {}), dict)):
        raise fail("`method` is missing" if method is None else f"`method` must be {{name, params}}, got {method!r}")
    if not isinstance(meta.get("stats"), dict):
        raise fail("`stats` is missing or not an object")
    for side in ("student", "teacher"):
        d = meta[side]
        for key in ("name", "fingerprint"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise fail(f"`{side}.{key}` must be a string, got {d[key]!r}")
        if d.get("model_vocab_size") is not None and not isinstance(d["model_vocab_size"], int):
            raise fail(f"`{side}.model_vocab_size` must be an integer, got {d['model_vocab_size']!r}")


@click.command("inspect")
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--samples", default=3, show_default=True, type=bounded(int, min=0, max=10_000),
              help="Sample rows shown per row kind.")
@click.option("--json", "as_json", is_flag=True, help="Print metadata and samples as JSON.")
def inspect_cmd(artifact_dir: Path, samples: int, as_json: bool) -> None:
    """Show a projection artifact's metadata, statistics and sample rows."""
    proj = art.read_projection(artifact_dir)
    meta = proj.meta
    _check_inspect_meta(meta, artifact_dir)
    rows_side, cols_side = projection_sides(meta)
    row_tok, col_tok = _try_load(meta[rows_side]), _try_load(meta[cols_side])
    kind = proj.row_kind if proj.row_kind is not None else np.full(proj.num_rows, 255, dtype=np.uint8)

    def name(tok, i):  # token_repr already escapes what is not text: quote it, do not repr() it again
        return f"'{tok.token_repr(i)}'" if tok is not None and i < tok.vocab_size else f"#{i}"

    def describe(i):
        return {"id": i, "token": name(row_tok, i),
                "entries": [[name(col_tok, j), round(w, 4)] for j, w in proj.row(i)]}

    sample = {}
    for code, kname in enumerate(art.ROW_KIND_NAMES):
        if kname in ("unmapped", "padded", "unused"):
            continue
        for i in _sample_rows(kind, code, samples):
            sample.setdefault(kname, []).append(describe(i))
    spread = np.flatnonzero((proj.weights[:, 0] < 0.6) & (proj.indices[:, 0] >= 0))
    for i in spread[np.linspace(0, len(spread) - 1, min(samples, len(spread))).round().astype(int)].tolist():
        sample.setdefault("spread (top weight < 0.6)", []).append(describe(i))
    if as_json:
        click.echo(json.dumps({"meta": meta, "samples": sample}, indent=2, ensure_ascii=False))
        return
    click.echo(f"projection {artifact_dir}  ({meta['direction']}, schema {meta['schema_version']}, "
               f"{meta.get('created_with', '?')})")
    for side in ("student", "teacher"):
        d = meta[side]
        fingerprint = f"{d['fingerprint'][:23]}…" if d.get("fingerprint") else "(no fingerprint)"
        click.echo(f"  {side:<8} {d.get('name') or '?':<14} vocab {d['vocab_size']:>7}  model vocab "
                   f"{d.get('model_vocab_size') or d['vocab_size']:>7}  {fingerprint}")
    click.echo(f"  rows {rows_side} ids, columns {cols_side} ids; top_k {meta['top_k']}; "
               f"method {meta['method']['name']}")
    click.echo(f"  params {json.dumps(meta['method'].get('params', {}), ensure_ascii=False)}")
    click.echo("stats:")
    for k, v in meta["stats"].items():
        click.echo(f"  {k:<28} {v:.4f}" if isinstance(v, float) else f"  {k:<28} {v}")
    if (artifact_dir / art.REVERSE_SUBDIR).is_dir():
        click.echo(f"(also holds {art.REVERSE_SUBDIR}/: inspect {artifact_dir / art.REVERSE_SUBDIR})")
    if row_tok is None or col_tok is None:
        click.echo("(tokenizers not found or fingerprints differ: showing ids)")
    for kname, rows in sample.items():
        click.echo(f"sample {kname} rows:")
        for r in rows:
            entries = ", ".join(f"{t} {w:.3f}" for t, w in r["entries"])
            click.echo(f"  {r['id']:>7} {r['token']:<24} -> {entries}")
