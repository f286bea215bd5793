"""xtoken-train's config: merging files and overrides, and every config error refused with one
`error:` line and exit 2 before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from xtoken_cli.main import align_cli
from xtoken_cli.train_cmd import train_cli
from xtoken_loss.trainer import config as C

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "configs" / "demo.yaml"


def _write(tmp_path: Path, name: str, data) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_demo_config_is_valid_and_round_trips(tmp_path):
    cfg = C.load_config([DEMO])
    assert [t.loss for t in cfg.teachers] == ["pkl", "kl"]
    again = C.TrainConfig.from_dict(yaml.safe_load(C.to_yaml(cfg)))
    assert again == cfg
    assert C.resume_changes(cfg.to_dict(), again.to_dict()) == []


def test_later_files_merge_over_earlier_and_lists_are_replaced_whole(tmp_path):
    base = yaml.safe_load(DEMO.read_text())
    over = _write(tmp_path, "over.yaml", {
        "optim": {"lr": 1e-4},
        "teachers": [dict(base["teachers"][1], weight=0.25)],  # one teacher instead of two
    })
    cfg = C.load_config([DEMO, over], ["teachers.0.weight=0.5", "data.batch_size=4", "optim.beta1=0.8"])
    assert len(cfg.teachers) == 1 and cfg.teachers[0].name == "llama3"
    assert cfg.teachers[0].weight == 0.5  # the override comes last
    assert cfg.optim.lr == 1e-4 and cfg.optim.beta1 == 0.8 and cfg.optim.beta2 == 0.95  # merged, not replaced
    assert cfg.data.batch_size == 4 and cfg.data.train == base["data"]["train"]


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    cfg = C.load_config([DEMO], ["optim.lr=3e-4", "optim.eps=1E-6"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.eps == 1e-6


def test_resume_may_change_only_stop_log_eval_and_checkpoint_keys():
    cfg = C.load_config([DEMO])
    ok = C.load_config([DEMO], ["max_steps=500", "log.every=5", "eval.every=3", "checkpoint.every=7",
                                "data.num_workers=0"])
    assert C.resume_changes(cfg.to_dict(), ok.to_dict()) == []
    bad = C.load_config([DEMO], ["optim.lr=1e-4", "teachers.1.weight=2", "schedule.total_steps=70", "seed=3"])
    assert sorted(C.resume_changes(cfg.to_dict(), bad.to_dict())) == [
        "optim.lr", "schedule.total_steps", "seed", "teachers.1.weight"]


def test_schedule_does_not_depend_on_max_steps():
    from xtoken_loss.trainer.schedule import lr_factor

    f = [lr_factor(s, total_steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)
    assert f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))


def test_reference_table_lists_every_field():
    ref = C.config_reference()
    for prefix, cls in C.SECTIONS:
        for f in C.fields_of(cls):
            if prefix == "" and f.name in {p for p, _ in C.SECTIONS}:
                continue
            assert f"`{prefix + '.' if prefix else ''}{f.name}`" in ref


def test_docs_hold_the_generated_reference():
    text = (REPO / "docs" / "trainer.md").read_text()
    assert C.config_reference() in text, "docs/trainer.md is stale: run python -m xtoken_loss.trainer.config"


@pytest.fixture(scope="module")
def foreign_projection(tmp_path_factory) -> Path:
    """A real artifact for another pair (mistral-v1 -> bert-uncased, ~3 s)."""
    out = tmp_path_factory.mktemp("proj") / "p"
    r = CliRunner().invoke(align_cli, ["build-projection", "--student", "mistral-v1", "--teacher", "bert-uncased",
                                       "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


CASES = [
    # (extra args, words the one error line must hold)
    (["teachers.0.wieght=1"], ["teachers.0", "unknown field", "'wieght'"]),
    (["bogus=1"], ["unknown field", "'bogus'"]),
    (["optim.lr=fast"], ["OptimConfig.lr", "a number", "'fast'"]),
    (["data.batch_size=0"], ["DataConfig.batch_size", ">= 1"]),
    (["teachers.0.loss=ce"], ["teachers.0", "'ce'", "valid kinds"]),
    (["teachers.0.loss_options.temprature=2"], ["teachers.0", "'temprature'"]),
    (["teachers.7.weight=1"], ["teachers.7", "2 entries"]),
    (["student.model.hiden_size=3"], ["StudentConfig.model", "'hiden_size'"]),
    (["teachers.0.projection=/no/such/dir"], ["teachers.0.projection", "/no/such/dir", "does not exist"]),
    (["teachers.1.tokenizer=qwen3"], ["teachers.1", "same-vocab", "qwen3", "llama3"]),
    (["teachers.0.projection=null"], ["teachers.0", "needs a projection"]),
    (["teachers.1.projection=auto"], ["teachers.1", "takes no projection"]),
    (["data.train=/no/train.jsonl"], ["data.train", "/no/train.jsonl"]),
    (["schedule.warmup_steps=500"], ["warmup_steps=500", "total_steps"]),
    (["student.tokenizer=/no/tok"], ["student.tokenizer", "/no/tok"]),
    (["optim.lr"], ["key=value"]),
    (["student.model=/no/model"], ["student.model", "/no/model", "does not exist"]),
    (["student.model=./data"], ["student.model", "no config.json"]),
    (["loss.multi_teacher.mode=averaged_logits"], ["loss.multi_teacher", "cross-tokenizer", "qwen3"]),
    (["data.microbatch_size=3"], ["data.microbatch_size=3", "does not divide"]),
]


@pytest.mark.parametrize("args,words", CASES, ids=[c[0][0] for c in CASES])
def test_config_errors_are_one_line_before_any_model(args, words, monkeypatch, tmp_path):
    import xtoken_loss.trainer.models as models

    def no_models(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(models, "build_causal_lm", no_models)
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(train_cli, ["--config", str(DEMO), f"output_dir={tmp_path / 'run'}", *args])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not (tmp_path / "run").exists()  # nothing written


def test_mismatched_projection_artifact_is_refused(foreign_projection, monkeypatch, tmp_path):
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(train_cli, ["--config", str(DEMO), f"output_dir={tmp_path / 'run'}",
                                       f"teachers.0.projection={foreign_projection}"])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert line.startswith("error: teachers.0.projection:") and "\n" not in line, line
    assert "fingerprint" in line


def test_foreign_output_dir_is_never_touched(monkeypatch, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path / "cache"))
    r = CliRunner().invoke(train_cli, ["--config", str(DEMO), f"output_dir={out}"])
    assert r.exit_code == 2 and "not created by xtoken-train" in r.output, r.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_missing_config_file_and_bad_yaml(tmp_path):
    r = CliRunner().invoke(train_cli, ["--config", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and "does not exist" in r.output
    bad = _write(tmp_path, "bad.yaml", "student: [unclosed\n")
    r = CliRunner().invoke(train_cli, ["--config", str(bad)])
    assert r.exit_code == 2 and "not valid YAML" in r.output and "line" in r.output, r.output
    top = _write(tmp_path, "list.yaml", "- 1\n- 2\n")
    r = CliRunner().invoke(train_cli, ["--config", str(top)])
    assert r.exit_code == 2 and "expected a mapping" in r.output
