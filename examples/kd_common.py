"""What the three examples share: real tokenizers, tiny random-init models, the collator, the loss.

Student: a Llama-style model with the llama3 tokenizer. Teachers: a Qwen3-style model with the qwen3
tokenizer (cross-tokenizer, P-KL through a projection built by `xtoken_align.build_projection`) and
a Llama-style model with the student's tokenizer (same-vocab, KL). The models are tiny (hidden 32,
2 layers) but keep the tokenizers' full id spaces (128,256 and 151,669 output rows), so the batches
are the real ones. Nothing runs at import.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

import xtoken_loss
from xtoken_align import AlignmentCollator, CollateConfig, ProjectionConfig, build_projection, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus" / "train.jsonl"


def load_texts(count: int, path: Path = CORPUS) -> list[dict]:
    """The first `count` records (`{"text": ...}`) of a JSONL corpus."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for _, line in zip(range(count), f)]
    if len(records) < count:
        raise ValueError(f"{path}: {count} records needed, found {len(records)}")
    return records


@functools.lru_cache(maxsize=None)  # once per process: the tests run several examples
def tokenizer(name: str):
    return load_tokenizer(name, name=name)


def tiny_causal_lm(architecture: str, vocab_size: int, seed: int):
    """A random-init causal LM (hidden 32, 2 layers) whose output rows cover `vocab_size` ids."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    config_type = {"llama": LlamaConfig, "qwen3": Qwen3Config}[architecture]
    config = config_type(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def projection_for(student, teacher, directory: Path) -> xtoken_loss.Projection:
    """The student -> teacher projection artifact in `directory`, built there first if absent, loaded
    with both fingerprints checked (the loss refuses batches of other tokenizers by them too)."""
    if not (directory / "projection.json").exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        build_projection(student, teacher, ProjectionConfig(top_k=4)).save(directory)
    return xtoken_loss.load_projection(directory, student_fingerprint=student.fingerprint,
                                       teacher_fingerprint=teacher.fingerprint)


@dataclass
class Distillation:
    """The student, the frozen teachers (in the batch's teacher order) and how to score them."""

    student: torch.nn.Module
    teachers: list[torch.nn.Module]
    collator: AlignmentCollator
    kd: xtoken_loss.MultiTeacherLoss

    def teacher_logits(self, batch: dict) -> list[torch.Tensor]:
        """One `[B, T_i, V_i]` logits tensor per teacher. A cross-tokenizer teacher reads its own
        tokens (`teacher_{i}_input_ids`); a same-vocab one reads the student's."""
        out = []
        with torch.no_grad():
            for i, model in enumerate(self.teachers):
                ids = batch.get(f"teacher_{i}_input_ids", batch["input_ids"])
                mask = batch.get(f"teacher_{i}_token_mask", batch["token_mask"])
                out.append(model(input_ids=ids, attention_mask=mask.long()).logits)
        return out

    def loss(self, student_logits: torch.Tensor, batch: dict, *, kd_normalizer=None, ce_normalizer=None):
        """`(loss, metrics)`: the teachers' weighted KD plus the student's next-token CE.

        Normalisers: None divides each term by its own count on this batch (a per-batch mean); under
        gradient accumulation pass counts over the whole optimizer step instead, so that the
        microbatches' losses add up to the step's loss (see the examples)."""
        kd, metrics = self.kd(student_logits, self.teacher_logits(batch), batch, normalizer=kd_normalizer)
        ce, _ = xtoken_loss.ce_loss(student_logits, None, batch, normalizer=ce_normalizer)
        loss, combined = xtoken_loss.combine_losses(kd, ce, kd_weight=1.0, ce_weight=1.0)
        return loss, {**metrics, **combined}


def build(output_dir: Path, *, seed: int = 0, max_length: int = 64) -> Distillation:
    """Models, collator and loss; the projection artifact lands in `output_dir/projection`."""
    student_tok, qwen = tokenizer("llama3"), tokenizer("qwen3")
    projection = projection_for(student_tok, qwen, Path(output_dir) / "projection")
    student = tiny_causal_lm("llama", student_tok.vocab_size, seed)
    teachers = [tiny_causal_lm("qwen3", qwen.vocab_size, seed + 1), tiny_causal_lm("llama", student_tok.vocab_size,
                                                                                   seed + 2)]
    for t in teachers:
        t.eval().requires_grad_(False)
    specs = [
        # top_k_columns=None: P-KL compares on every teacher column the projection reaches. Its default
        # (8192 columns) picks them per call from the teacher's logits, so each accumulation microbatch
        # would pick its own set and the accumulated step would not equal one step on the whole batch.
        xtoken_loss.TeacherSpec(name="qwen3", loss="pkl", weight=0.5, fingerprint=qwen.fingerprint,
                                vocab_size=qwen.vocab_size, projection=projection,
                                loss_options={"top_k_columns": None}),
        xtoken_loss.TeacherSpec(name="llama3", loss="kl", weight=0.5, fingerprint=student_tok.fingerprint,
                                vocab_size=student_tok.vocab_size),
    ]
    # projection_accuracy (a metric: how often the projected student's top token is the teacher's)
    # costs an extra pass over the chunks; off here to keep the examples quick
    config = xtoken_loss.MultiTeacherConfig(mode="sum", projection_accuracy=False)
    kd = xtoken_loss.MultiTeacherLoss(specs, config,
                                      student_fingerprint=student_tok.fingerprint,
                                      student_vocab_size=student_tok.vocab_size)
    collator = AlignmentCollator(student_tok, [qwen, student_tok], CollateConfig(max_length=max_length))
    return Distillation(student, teachers, collator, kd)


def step_units(distillation: Distillation, microbatches: list[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each teacher's and the CE's unit counts summed over an optimizer step's microbatches: the
    normalisers that make gradient accumulation exact with every term a mean over its own units
    (P-KL: valid chunks, KL and CE: next-token positions). Under data parallelism, all-reduce (sum)
    them over the ranks as well."""
    kd = [sum(xtoken_loss.count_units(mb, spec.loss, teacher_index=i, **_unit_options(spec)) for mb in microbatches)
          for i, spec in enumerate(distillation.kd.teachers)]
    ce = sum(xtoken_loss.count_units(mb, "ce") for mb in microbatches)
    return [n.clamp_min(1) for n in kd], ce.clamp_min(1)


def _unit_options(spec: xtoken_loss.TeacherSpec) -> dict:
    # the options that decide a kind's units (e.g. public=True counts positions, not chunk starts)
    names = spec.loss_spec.option_names()
    return {k: v for k, v in spec.loss_options.items() if k in names}

