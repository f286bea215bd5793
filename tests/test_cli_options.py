"""CLI options generated from the configs (`xtoken_cli.config_options`): every `ProjectionConfig`
field reachable from `build-projection`, defaults from the config, today's option names kept, and
the options reaching the artifact."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import click
import numpy as np
import pytest
from click.testing import CliRunner

from xtoken_align.batch.collate import CollateConfig
from xtoken_align.projection import artifacts as art
from xtoken_align.projection.builder import ProjectionConfig
from xtoken_cli.align_cmd import align_cmd
from xtoken_cli.config_options import config_from, config_options
from xtoken_cli.main import align_cli
from xtoken_cli.overlap_cmd import overlap_report_cmd
from xtoken_cli.projection_cmd import build_projection_cmd, inspect_cmd
from xtoken_core.config import Config, config, option
from xtoken_core.errors import ConfigError

BASE = ["--student", "mistral-v1", "--teacher", "bert-uncased"]


def _options(cmd: click.Command) -> dict[str, click.Parameter]:
    """Every option string of `cmd` (secondary `--no-x` forms included) -> its parameter."""
    return {o: p for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def _params(cmd: click.Command, args: list[str]) -> dict:
    return dict(cmd.make_context(cmd.name, list(args)).params)


def test_every_projection_config_field_has_a_build_projection_option():
    by_name = {p.name: p for p in build_projection_cmd.params}
    for f in dataclasses.fields(ProjectionConfig):
        assert f.name in by_name, f"ProjectionConfig.{f.name} has no build-projection option"
    opts = _options(build_projection_cmd)
    for name in ("--first-weight", "--decay", "--max-pieces", "--reverse-weight"):
        assert name in opts


@pytest.mark.parametrize("cmd,names", [
    (build_projection_cmd, ["--student", "--teacher", "--out", "--top-k", "--corpus", "--both-directions",
                            "--student-vocab-size", "--teacher-vocab-size", "--no-reverse", "--prior-strength"]),
    (align_cmd, ["--student", "--teacher", "--text-file", "--jsonl", "--field", "--max-length",
                 "--no-special-tokens", "--json", "--html", "--html-samples", "--out", "--batch-size",
                 "--shard-size"]),
    (inspect_cmd, ["--samples", "--json"]),
    (overlap_report_cmd, ["--json", "--plot"]),
])
def test_todays_option_names_keep_working(cmd, names):
    opts = _options(cmd)
    missing = [n for n in names if n not in opts]
    assert not missing


def test_cli_defaults_are_the_configs_defaults():
    params = _params(build_projection_cmd, BASE + ["--out", "x"])
    assert config_from(ProjectionConfig, params) == ProjectionConfig()
    assert set(params) == {"student", "teacher", "out", "corpus", "corpus_format"}  # the rest went into the config
    params = _params(align_cmd, BASE)
    assert config_from(CollateConfig, params, ("max_length", "add_special_tokens")) == CollateConfig()


def test_cli_values_reach_the_config():
    args = BASE + ["--out", "x", "--top-k", "2", "--no-reverse", "--both-directions", "--prior-strength", "1.5",
                   "--teacher-vocab-size", "30600", "--decay", "0.5", "--max-pieces", "2", "--first-weight", "0.5",
                   "--reverse-weight", "0.25", "--student-vocab-size", "32000"]
    cfg = config_from(ProjectionConfig, _params(build_projection_cmd, args))
    assert cfg == ProjectionConfig(top_k=2, reverse=False, both_directions=True, prior_strength=1.5,
                                   teacher_model_vocab_size=30600, decay=0.5, max_pieces=2, first_weight=0.5,
                                   reverse_weight=0.25, student_model_vocab_size=32000)
    cfg = config_from(CollateConfig, _params(align_cmd, BASE + ["--max-length", "7", "--no-special-tokens"]),
                      ("max_length", "add_special_tokens"))
    assert cfg == CollateConfig(max_length=7, add_special_tokens=False)


@pytest.mark.parametrize("args,message", [
    (["--top-k", "0"], "--top-k must be a positive integer <= 256, got 0 (ProjectionConfig.top_k)"),
    (["--top-k", "1000000"], "--top-k must be a positive integer <= 256, got 1000000"),
    (["--decay", "1.5"], "--decay must be a number in (0, 1], got 1.5 (ProjectionConfig.decay)"),
    (["--decay", "0"], "--decay must be a number in (0, 1], got 0"),
    (["--first-weight", "0"], "--first-weight must be a number in (0, 1000000], got 0"),
    (["--reverse-weight", "-1"], "--reverse-weight must be a number in [0, 1000000], got -1"),
    (["--max-pieces", "two"], "--max-pieces must be a positive integer <= 256, got two"),
])
def test_out_of_range_values_are_one_line_config_errors(tmp_path, args, message):
    r = CliRunner().invoke(align_cli, ["build-projection", *BASE, "--out", str(tmp_path / "p"), *args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {message}"] or (len(lines) == 1 and lines[0].startswith(f"error: {message}"))
    assert not (tmp_path / "p").exists()


def test_new_options_change_the_recorded_params_and_the_rows(tmp_path):
    runner = CliRunner()
    r = runner.invoke(align_cli, ["build-projection", *BASE, "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output
    args = ["--first-weight", "0.5", "--decay", "0.5", "--max-pieces", "2", "--no-reverse", "--top-k", "3"]
    r = runner.invoke(align_cli, ["build-projection", *BASE, "--out", str(tmp_path / "n"), *args])
    assert r.exit_code == 0, r.output
    params = json.loads((tmp_path / "n" / art.PROJECTION_JSON).read_text())["method"]["params"]
    want = ProjectionConfig(first_weight=0.5, decay=0.5, max_pieces=2, reverse=False, top_k=3)
    assert ProjectionConfig.from_params(params) == want
    default = json.loads((tmp_path / "d" / art.PROJECTION_JSON).read_text())["method"]["params"]
    assert ProjectionConfig.from_params(default) == ProjectionConfig()
    # rows: with two pieces kept at weights 0.5 and 0.25 (no reverse pass), every decomposed row with
    # two distinct pieces is (2/3, 1/3); the default decay 0.1 over up to four pieces gives others
    new, old = art.read_projection(tmp_path / "n"), art.read_projection(tmp_path / "d")
    dec = new.row_kind == art.ROW_DECOMPOSED
    two = dec & (new.indices[:, 1] >= 0)
    assert two.sum() > 100 and not np.any(new.indices[dec, 2] >= 0)
    np.testing.assert_allclose(new.weights[two, :2], np.tile([2 / 3, 1 / 3], (int(two.sum()), 1)), rtol=1e-6)
    assert np.abs(old.weights[two, 0] - 2 / 3).min() > 0.1


def test_generated_options_for_literal_bool_and_required_fields():
    @config
    class Demo(Config):
        mode: Literal["fast", "exact"] = option("fast", help="How.")
        count: int = option(min=0, max=3, help="How many.")
        on: bool = option(False, help="Switch.")
        ratio: float | None = option(None, help="A ratio.")

    @click.command()
    @config_options(Demo, names={"on": "switch"})
    def cmd(**kw):
        click.echo(repr(config_from(Demo, kw)))

    runner = CliRunner()
    r = runner.invoke(cmd, ["--count", "2", "--mode", "exact", "--switch", "--ratio", "0.5"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(Demo(mode="exact", count=2, on=True, ratio=0.5))
    r = runner.invoke(cmd, ["--count", "2"])
    assert r.output.strip() == repr(Demo(count=2))
    assert runner.invoke(cmd, []).exit_code == 2  # --count is required: no default
    assert runner.invoke(cmd, ["--count", "1", "--mode", "slow"]).exit_code == 2  # click.Choice
    with pytest.raises(ConfigError, match=r"--count must be an integer in \[0, 3\], got 4 \(Demo.count\)"):
        cmd.main(["--count", "4"], standalone_mode=False)
