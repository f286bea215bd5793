"""`xtoken-align`: the click group. Each command lives in its own module and registers here.

User errors (`XTokenError`, bad options, and click's own usage errors: a missing or unknown option,
a value of the wrong type) print one `error: ...` line on stderr and exit with code 2, never a
traceback or a usage block; anything else is a bug and keeps its traceback. Warnings (e.g. an
artifact without `tensors_sha256`) print as one `warning: ...` line.
"""

from __future__ import annotations

import sys
import warnings

import click

from xtoken_core.errors import XTokenError

# click >= 8.2 raises this (a UsageError) to show the help of a group called without arguments.
_SHOW_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _usage_line(exc: click.UsageError) -> str:
    message = " ".join(exc.format_message().split())  # one line, whatever click put in it
    if exc.ctx is not None:
        message += f" (see {exc.ctx.command_path} --help)"
    return message


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


class _Group(click.Group):
    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except _SHOW_HELP:
            raise
        except click.UsageError as exc:
            _fail(_usage_line(exc))

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning  # one `warning: ...` line, no source line
                return super().invoke(ctx)
        except XTokenError as exc:
            _fail(str(exc))
        except _SHOW_HELP:
            raise
        except click.UsageError as exc:  # a subcommand's options, or raised by a command itself
            _fail(_usage_line(exc))


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
