"""`xtoken-train`: train a student by distillation (docs/trainer.md).

    xtoken-train --config FILE.yaml [--config MORE.yaml ...] [key=value ...]   train
    xtoken-train plot RUN_DIR [--out FILE.png]                                 draw the curves
    xtoken-train cache-teacher --config FILE.yaml --teacher I --out DIR [--top-k K] [key=value ...]

Later `--config` files are merged over earlier ones (a list replaced whole), then the dotted
`key=value` overrides (`optim.lr=3e-4`, `teachers.0.weight=0.5`). Config errors print one `error:`
line and exit 2 before any model is loaded. Under torchrun every rank runs the same command.
"""

from __future__ import annotations

import click

from xtoken_cli.main import _Group


class _TrainGroup(_Group):
    """The group whose default command is `train`: `xtoken-train --config ...` trains."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_TrainGroup, context_settings={"help_option_names": ["-h", "--help"]})
def train_cli():
    """Distil a student from teachers with any tokenizers (FSDP2; one process or torchrun)."""


@train_cli.command("train")
@click.option("--config", "configs", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="YAML config; repeat to merge later files over earlier ones")
@click.argument("overrides", nargs=-1)
def train_command(configs, overrides):
    """Train (the default command): xtoken-train --config FILE.yaml [key=value ...]."""
    from xtoken_loss.trainer.distributed import use_cpu_huge_pages

    use_cpu_huge_pages()  # before anything large is allocated (see its docstring)
    from xtoken_loss.trainer.config import load_config

    cfg = load_config(list(configs), list(overrides))
    from xtoken_loss.trainer.run import summary_table, train

    summary = train(cfg)
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_rank() == 0:
        click.echo(summary_table(summary))
        click.echo(f"student exported to {summary.output_dir / 'final'}")
    if tdist.is_initialized():
        tdist.destroy_process_group()


@train_cli.command("cache-teacher")
@click.option("--config", "configs", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="YAML config of the run (as for training); repeat to merge")
@click.option("--teacher", "teacher", required=True, help="the teacher: its 0-based index or its name")
@click.option("--out", "out", required=True, type=click.Path(file_okay=True),
              help="cache folder: new, empty, or a partial cache of the same settings (resumed)")
@click.option("--top-k", "top_k", type=click.IntRange(min=1), default=64, show_default=True,
              help="log-probabilities kept per position")
@click.option("--dtype", "dtype", type=click.Choice(["bf16", "fp16"]), default="bf16", show_default=True,
              help="storage dtype of the top-k log-probabilities")
@click.option("--shard-docs", "shard_docs", type=click.IntRange(min=1), default=256, show_default=True,
              help="documents per shard")
@click.option("--batch-size", "batch_size", type=click.IntRange(min=1), default=None,
              help="documents per teacher forward (default: data.batch_size)")
@click.argument("overrides", nargs=-1)
def cache_teacher_command(configs, teacher, out, top_k, dtype, shard_docs, batch_size, overrides):
    """Run one teacher over the config's data once and store its top-k outputs (docs/teacher_cache.md)."""
    from xtoken_loss.trainer.distributed import use_cpu_huge_pages

    use_cpu_huge_pages()  # before anything large is allocated, as for training
    from xtoken_loss.trainer.config import load_config

    cfg = load_config(list(configs), list(overrides))
    from xtoken_loss.trainer.teacher_cache.writer import write_cache

    info = write_cache(cfg, teacher, out, top_k=top_k, dtype=dtype, shard_docs=shard_docs, batch_size=batch_size)
    import torch.distributed as tdist

    if not tdist.is_initialized() or tdist.get_rank() == 0:
        click.echo(f"teacher cache {out}: {info['num_positions']} positions, k={info['top_k']}, "
                   f"{info['bytes_per_token']:.1f} bytes per token")
    if tdist.is_initialized():
        tdist.destroy_process_group()


@train_cli.command("plot")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="PNG to write (default: RUN_DIR/curves.png)")
def plot_command(run_dir, out):
    """Draw a run's curves (loss, held-out BPB, per-teacher weights) to PNG."""
    from xtoken_loss.trainer.plot import plot_run

    path = plot_run(run_dir, out)
    click.echo(f"wrote {path}")


if __name__ == "__main__":  # python -m xtoken_cli.train_cmd (torchrun -m)
    train_cli()
