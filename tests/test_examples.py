"""The examples/ integrations run: a few steps each, a finite loss, a student that changed, and
gradient accumulation that is exact (the Trainer's `num_items_in_batch` honoured)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MAX_LENGTH = 32  # short rows keep the full-vocabulary heads quick


NAMES = ("kd_common", "plain_loop", "accelerate_loop", "hf_trainer")


@pytest.fixture(scope="module")
def examples():
    import importlib

    sys.path.insert(0, str(EXAMPLES))
    try:
        yield {name: importlib.import_module(name) for name in NAMES}
    finally:
        sys.path.remove(str(EXAMPLES))
        for name in NAMES:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """One directory for every run here, so the projection artifact is built once and then loaded."""
    return tmp_path_factory.mktemp("examples")


def initial_student(kd_common, seed=0):
    return kd_common.tiny_causal_lm("llama", kd_common.tokenizer("llama3").vocab_size, seed)


def assert_trained(student, kd_common):
    before = initial_student(kd_common).state_dict()
    changed = [n for n, p in student.named_parameters() if not torch.equal(p.detach().cpu(), before[n])]
    assert len(changed) == len(list(student.parameters())), "some parameters did not change"


@pytest.fixture(scope="module")
def plain_losses(examples, output_dir):
    losses, student = examples["plain_loop"].train(2, output_dir, max_length=MAX_LENGTH)
    return losses, student


def test_plain_loop_trains(examples, plain_losses):
    losses, student = plain_losses
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert_trained(student, examples["kd_common"])


def test_accelerate_loop_trains_like_the_plain_loop(examples, plain_losses, output_dir):
    losses, student = examples["accelerate_loop"].train(2, output_dir, max_length=MAX_LENGTH, cpu=True)
    assert all(math.isfinite(x) for x in losses)
    assert_trained(student, examples["kd_common"])
    # same data, seed and normalisation: one process under Accelerate computes what the plain loop does
    assert losses == pytest.approx(plain_losses[0], rel=1e-5)
    plain_student = plain_losses[1]
    for (name, p), q in zip(student.named_parameters(), plain_student.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-4, atol=1e-6, msg=name)


class GradientsAtFirstStep:
    """A Trainer callback keeping the accumulated gradients of the first optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                if outer.grads is None:
                    outer.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

        self.grads = None
        self.callback = Callback()


def test_hf_trainer_honours_num_items_in_batch(examples, output_dir):
    hf, kd_common = examples["hf_trainer"], examples["kd_common"]
    # texts of different lengths, so the microbatches hold different numbers of positions and chunks
    # (a per-microbatch mean would then weight them wrongly)
    texts = [{"text": r["text"][:n]} for r, n in zip(kd_common.load_texts(4), (40, 400, 90, 20))]
    # 2 microbatches of 2 per step (2 steps: two passes over the 4 texts) vs one batch of 4
    accumulated, whole = GradientsAtFirstStep(), GradientsAtFirstStep()
    trainer = hf.train(2, output_dir, batch_size=2, accumulation=2, texts=texts, max_length=MAX_LENGTH,
                       callbacks=[accumulated.callback])
    one = hf.train(1, output_dir, batch_size=4, accumulation=1, texts=texts, max_length=MAX_LENGTH,
                   callbacks=[whole.callback])

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert_trained(trainer.model, kd_common)
    # each microbatch was divided by the whole step's count of the student's next-token positions
    units = float(kd_common.xtoken_loss.count_units(trainer.distillation.collator(texts), "ce"))
    assert trainer.normalizers == [units] * 4
    assert one.normalizers == [units]
    # so the accumulated gradient is the gradient of the one batch holding both microbatches
    scale = max(g.abs().max() for g in whole.grads.values())
    for name, g in accumulated.grads.items():
        torch.testing.assert_close(g, whole.grads[name], rtol=0, atol=1e-5 * scale, msg=name)
    first = next(log["loss"] for log in one.state.log_history if "loss" in log)
    assert losses[0] == pytest.approx(first, rel=1e-4)


def test_examples_import_without_side_effects(examples, output_dir, capsys):
    import importlib

    before = sorted(p.name for p in Path.cwd().iterdir()), sorted(p.name for p in output_dir.iterdir())
    had_group = torch.distributed.is_initialized()  # other tests of the session may have started one
    sys.path.insert(0, str(EXAMPLES))
    try:
        for name in NAMES:  # a fresh import of each (the libraries they use are loaded already)
            sys.modules.pop(name, None)
            importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))
    assert capsys.readouterr().out == ""
    assert (sorted(p.name for p in Path.cwd().iterdir()), sorted(p.name for p in output_dir.iterdir())) == before
    assert torch.distributed.is_initialized() == had_group


def test_import_xtoken_loss_imports_neither_xtoken_align_nor_the_trainer():
    code = ("import sys, xtoken_loss; print(sorted(m for m in sys.modules "
            "if m.startswith(('xtoken_align', 'xtoken_loss.trainer'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
