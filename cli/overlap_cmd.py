"""`xtoken-align overlap-report TOKENIZER [TOKENIZER ...]`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xtoken_align import __version__, load_tokenizer
from xtoken_align.tokenizer.overlap import CATEGORIES, OverlapReport, overlap_report
from xtoken_cli import outputs
from xtoken_core.errors import ConfigError, DataFileError


def _print_matrix(title: str, names: list[str], matrix: list[list[float]]) -> None:
    width = max(8, max(len(n) for n in names) + 1)
    click.echo(title)
    click.echo(" " * width + "".join(f"{n[:width - 1]:>{width}}" for n in names))
    for name, row in zip(names, matrix):
        click.echo(f"{name:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row))
    click.echo("")


def _print_report(report: OverlapReport, tokenizers) -> None:
    click.echo(f"{'tokenizer':<14}{'kind':<29}{'ids':>8}{'strings':>9}  exactness  prefix_space")
    for t, size in zip(tokenizers, report.sizes):
        click.echo(f"{t.name:<14}{t.kind:<29}{t.vocab_size:>8}{size:>9}  {t.exactness:<10} {t.prefix_space}")
    click.echo("")
    _print_matrix("Vocabulary overlap |A ∩ B| / min(|A|, |B|) on canonical bytes:", report.names, report.overlap)
    _print_matrix("Directed coverage: fraction of row's strings found in column:", report.names,
                  report.coverage_matrix)
    click.echo("Coverage audit (student tokens of each category found in the teacher, covered/total):")
    click.echo(f"{'student':<14}{'teacher':<14}" + "".join(f"{c:>20}" for c in CATEGORIES))
    for c in report.coverage:
        cells = []
        for cat in CATEGORIES:
            v = c.categories[cat]
            flag = "!" if v["total"] and v["covered"] == 0 else " "
            cells.append(f"{v['covered']}/{v['total']}{flag}".rjust(20))
        click.echo(f"{c.student:<14}{c.teacher:<14}" + "".join(cells))
    click.echo("\n(! = no token of that category is covered: a common-set loss such as GOLD pushes "
               "them all down)")


def _plot(report: OverlapReport, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'xtoken[plot]'") from None
    n = len(report.names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * n))
    im = ax.imshow(report.overlap, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), report.names, rotation=45, ha="right")
    ax.set_yticks(range(n), report.names)
    for i in range(n):
        for j in range(n):
            v = report.overlap[i][j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if v > 0.6 else "white")
    ax.set_title("Vocabulary overlap (canonical bytes, min-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with outputs.atomic_output(path, "wb") as fh:
        fig.savefig(fh.file, dpi=120, format=path.suffix.lstrip(".").lower() or None)
    plt.close(fig)


@click.command("overlap-report")
@click.argument("tokenizers", nargs=-1, required=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a labelled overlap heatmap (PNG) to this file.")
def overlap_report_cmd(tokenizers: tuple[str, ...], json_path: Path | None, plot_path: Path | None) -> None:
    """Pairwise vocabulary overlap and per-category coverage audit of TOKENIZERS.

    Each TOKENIZER is a bundled fixture name (llama3, qwen3, ...), a local directory or
    tokenizer.json, or a Hugging Face Hub name.
    """
    if len(tokenizers) < 2:
        raise click.UsageError("overlap-report needs at least two tokenizers")
    outputs.prepare(inputs=[(f"TOKENIZER {t}", outputs.tokenizer_inputs(t)) for t in tokenizers],
                    files=[("--json", json_path), ("--plot", plot_path)])
    loaded = [load_tokenizer(t, name=t) for t in tokenizers]
    report = overlap_report(loaded)
    _print_report(report, loaded)
    if json_path is not None:
        try:
            outputs.write_text(json_path, json.dumps(report.to_json(loaded, __version__), indent=2) + "\n")
        except OSError as exc:
            raise DataFileError(f"cannot write {json_path}: {exc.strerror}") from None
        click.echo(f"wrote {json_path}")
    if plot_path is not None:
        try:
            _plot(report, plot_path)
        except OSError as exc:
            raise DataFileError(f"cannot write {plot_path}: {exc.strerror}") from None
        click.echo(f"wrote {plot_path}")
