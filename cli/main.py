"""`xtoken-align`: the click group. Each command lives in its own module and registers here.

User errors (`XTokenError`, bad options) print one `error: ...` line and exit with code 2, never a
traceback; anything else is a bug and keeps its traceback. Warnings (e.g. an artifact without
`tensors_sha256`) print as one `warning: ...` line.
"""

from __future__ import annotations

import sys
import warnings

import click

from xtoken_core.errors import XTokenError


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning  # one `warning: ...` line, no source line
                return super().invoke(ctx)
        except XTokenError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xtoken")
def align_cli() -> None:
    """Cross-tokenizer alignment tools: overlap reports, alignments and sparse projections."""


def _register() -> None:
    from xtoken_cli.align_cmd import align_cmd
    from xtoken_cli.overlap_cmd import overlap_report_cmd
    from xtoken_cli.projection_cmd import build_projection_cmd, inspect_cmd

    align_cli.add_command(align_cmd)
    align_cli.add_command(overlap_report_cmd)
    align_cli.add_command(build_projection_cmd)
    align_cli.add_command(inspect_cmd)


_register()
