"""xtoken-train end to end on tiny random-init models with real tokenizers (qwen3 P-KL teacher,
same-vocab llama3 KL teacher): the step's normalisation (microbatches, ranks), exact resume, the
guard, the export, and the run directory's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.trainer_helpers import run_torchrun, tiny_config, train_records
from xtoken_loss.trainer.config import TrainConfig, TrainConfigError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One cache (remaps, the auto projection) and one small corpus for the module."""
    root = tmp_path_factory.mktemp("trainer")
    mp = pytest.MonkeyPatch()
    mp.setenv("XTOKEN_CACHE", str(root / "cache"))
    yield root
    mp.undo()


def _run(env: Path, name: str, **over):
    from xtoken_loss.trainer.run import train

    cfg = TrainConfig.from_dict(tiny_config(env / name, env / "data", **over))
    return train(cfg)


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in train_records(run_dir)]


def test_run_writes_its_files_and_learns(env):
    s = _run(env, "basic", max_steps=6)
    out = env / "basic"
    recs = train_records(out)
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        for key in ("loss", "ce", "teacher_0/kd", "teacher_1/kd", "teacher_0/weight", "lr", "grad_norm",
                    "tokens_per_s", "bytes_per_s", "world_size", "time/data", "time/teacher_forward",
                    "time/student_forward", "time/loss", "time/backward", "time/optimizer"):
            assert key in r, key
        assert math.isfinite(r["loss"])
        assert r["loss"] == pytest.approx(r["ce"] + r["teacher_0/kd"] + r["teacher_1/kd"], rel=1e-5)
    assert recs[-1]["ce"] < recs[0]["ce"]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval/bpb" in x]
    assert [e["step"] for e in evals] == [0, 6]
    assert all(k == "step" or k.startswith("eval/") for e in evals for k in e)
    assert "eval/teacher_0/bpb" in evals[0] and evals[-1]["eval/bpb"] < evals[0]["eval/bpb"]
    assert 0 <= evals[-1]["eval/teacher_0/projection_accuracy"] <= 1  # the P-KL teacher only
    assert "eval/teacher_1/projection_accuracy" not in evals[-1]
    assert s.last_eval["eval/bpb"] == evals[-1]["eval/bpb"]
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "step-6").is_dir()


def test_final_export_is_a_full_vocab_hf_model_and_the_student_of_a_new_run(env):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = env / "basic" / "final"
    if not final.exists():
        _run(env, "basic", max_steps=6)
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == 128256 and len(tok) >= 128256
    ids = torch.tensor([tok("The assert statement")["input_ids"]])
    logits = model(ids).logits
    assert torch.isfinite(logits).all()
    _run(env, "from_final", max_steps=2, student={"model": str(final)}, teachers=[])
    assert len(train_records(env / "from_final")) == 2


def test_microbatches_give_the_same_step(env):
    a = _losses_of(env, "mb4", data={"microbatch_size": 4})
    b = _losses_of(env, "mb1", data={"microbatch_size": 1})
    assert a == pytest.approx(b, rel=1e-4)


def _losses_of(env, name, **over):
    _run(env, name, **over)
    return _losses(env / name)


def test_resume_continues_exactly(env):
    full = _losses_of(env, "full", max_steps=6)
    _run(env, "part", max_steps=3)
    _run(env, "part", max_steps=6, resume=True)
    recs = train_records(env / "part")
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert [r["loss"] for r in recs] == pytest.approx(full, rel=1e-6)


def test_resume_refuses_changed_keys_and_accepts_a_raised_max_steps(env):
    _run(env, "r", max_steps=2)
    with pytest.raises(TrainConfigError, match="optim.lr"):
        _run(env, "r", max_steps=4, resume=True, optim={"lr": 0.5})
    with pytest.raises(TrainConfigError, match="resume=true"):
        _run(env, "r", max_steps=4)  # an existing run without resume=true
    _run(env, "r", max_steps=2, resume=True)  # finished: nothing to do
    _run(env, "r", max_steps=3, resume=True, log={"every": 1, "progress": False})
    assert [r["step"] for r in train_records(env / "r")] == [1, 2, 3]


def test_activation_checkpointing_and_teacher_offload_leave_losses_unchanged(env):
    base = _losses_of(env, "plain")
    ac = _losses_of(env, "ac", student={"activation_checkpointing": True})
    off = _losses_of(env, "off", teachers=[
        dict(tiny_config(env, env / "data")["teachers"][0], offload=True),
        dict(tiny_config(env, env / "data")["teachers"][1], offload=True)])
    assert ac == pytest.approx(base, rel=1e-5)
    assert off == pytest.approx(base, rel=1e-5)


def test_non_finite_steps_are_skipped_and_stop_the_run(env, monkeypatch):
    from xtoken_loss.trainer import step as step_mod
    from xtoken_loss.trainer.step import TrainingDiverged

    real = step_mod.StepRunner.microbatch_loss

    def poisoned(self, mb, counts, timer):
        loss, pieces = real(self, mb, counts, timer)
        return loss * float("nan"), pieces

    monkeypatch.setattr(step_mod.StepRunner, "microbatch_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        _run(env, "nan", max_steps=6, optim={"max_bad_steps": 3})
    recs = train_records(env / "nan")
    assert [r["skipped"] for r in recs] == [1, 1, 1] or [r["skipped"] for r in recs] == [1, 1]


@pytest.mark.slow
def test_two_processes_equal_one_and_reshard_on_resume(env, tmp_path):
    cfg1 = tiny_config(tmp_path / "one", env / "data")
    cfg2 = tiny_config(tmp_path / "two", env / "data")
    r = run_torchrun(2, cfg2, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _run_cfg(cfg1)
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [x["world_size"] for x in two] == [2] * 4
    assert [x["loss"] for x in two] == pytest.approx([x["loss"] for x in one], rel=1e-4)
    # the 2-rank checkpoint continues on 1 rank: the same losses as an uninterrupted 1-rank run
    _run_cfg(dict(cfg2, max_steps=6, resume=True))
    _run_cfg(dict(cfg1, output_dir=str(tmp_path / "one6"), max_steps=6))
    assert [x["loss"] for x in train_records(tmp_path / "two")] == pytest.approx(
        [x["loss"] for x in train_records(tmp_path / "one6")], rel=1e-4)


def _run_cfg(cfg: dict):
    from xtoken_loss.trainer.run import train

    return train(TrainConfig.from_dict(cfg))


def test_chat_data_trains_on_assistant_bytes(env):
    from tests.trainer_helpers import CORPUS

    chat = env / "chat.jsonl"
    chat.write_text("".join(open(CORPUS / "chat_train.jsonl", encoding="utf-8").readlines()[:16]))
    _run(env, "chat", max_steps=2, data={"train": str(chat), "eval": str(chat), "train_on": "assistant"})
    _run(env, "chat_all", max_steps=2, data={"train": str(chat), "eval": str(chat), "train_on": "all"})
    a, b = train_records(env / "chat"), train_records(env / "chat_all")
    assert all(math.isfinite(r["loss"]) for r in a + b)
    # fewer trained positions when only the assistant messages count
    assert a[0]["units/ce"] < b[0]["units/ce"] and a[0]["units/teacher_0"] < b[0]["units/teacher_0"]


def test_trainable_projection_is_checkpointed_resumed_and_exported(env):
    from xtoken_loss import load_projection

    qwen = dict(tiny_config(env, env / "data")["teachers"][0], projection_trainable=True)
    teachers = [qwen, tiny_config(env, env / "data")["teachers"][1]]
    full = _losses_of(env, "lw_full", max_steps=4, teachers=teachers)
    _run(env, "lw", max_steps=2, teachers=teachers)
    _run(env, "lw", max_steps=4, teachers=teachers, resume=True)
    assert _losses(env / "lw") == pytest.approx(full, rel=1e-6)
    proj = load_projection(env / "lw" / "projection-qwen3")
    assert proj.indices.shape[0] > 0 and torch.isfinite(proj.weights).all()


def test_plot_draws_the_curves(env):
    from click.testing import CliRunner

    from xtoken_cli.train_cmd import train_cli

    run = env / "basic"
    if not (run / "metrics.jsonl").exists():
        _run(env, "basic", max_steps=6)
    r = CliRunner().invoke(train_cli, ["plot", str(run), "--out", str(env / "curves.png")])
    assert r.exit_code == 0, r.output
    assert (env / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(train_cli, ["plot", str(env / "nothing-here")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "metrics.jsonl" in r.output
