"""xtoken's losses inside a Hugging Face `transformers.Trainer` (a `compute_loss` override).

    python examples/hf_trainer.py --steps 3 --output-dir out/examples/hf_trainer

`AlignmentCollator` is the Trainer's `data_collator` (the records' `text` column is not a model
argument, hence `remove_unused_columns=False`); `compute_loss` runs the student and the frozen
teachers and returns KD + CE divided by `num_items_in_batch`.

Gradient accumulation: the Trainer counts `num_items_in_batch`, the label tokens of *all* the
microbatches of an optimizer step (all processes too, with `average_tokens_across_devices`), before
the step's first forward, and then does not divide the loss by the accumulation steps itself. Every
term divided by that one count sums, over the microbatches, to the step's loss over the step's
count: the accumulated gradient is that of one batch holding every microbatch.
The collator's `shift_labels` make that count the student's next-token positions, the units of CE and
of same-vocab KL. P-KL's units are chunks; its chunk sum is divided by the same position count (the
principled `kd_ce_loss` convention: one total over one count, so the KD/CE balance does not drift
with the number of chunks). To keep P-KL a mean over its own chunks instead, count the step's chunks
yourself (`xtoken_loss.count_units`, as plain_loop.py does): the Trainer counts only labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kd_common
import torch
from transformers import Trainer, TrainingArguments

from xtoken_loss.units import next_token_mask


class LabelledCollator:
    """The alignment collator plus `labels` (padding -100), which the Trainer looks for to count
    `num_items_in_batch`, and `shift_labels`, which it counts when present: the target of each
    next-token position xtoken's CE counts, -100 elsewhere."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, samples):
        batch = self.collator(samples)
        ids, kept = batch["input_ids"], batch["token_mask"] & batch["sample_mask"][:, None]
        batch["labels"] = ids.masked_fill(~kept, -100)
        counted = next_token_mask(batch, *ids.shape)
        batch["shift_labels"] = torch.full_like(ids, -100)
        batch["shift_labels"][:, :-1] = ids[:, 1:]
        batch["shift_labels"].masked_fill_(~counted, -100)
        return batch


class DistillationTrainer(Trainer):
    """A Trainer whose loss is xtoken's multi-teacher KD + CE (`kd_common.Distillation`)."""

    def __init__(self, *args, distillation: kd_common.Distillation, **kwargs):
        super().__init__(*args, model=distillation.student, **kwargs)
        self.distillation = distillation
        for teacher in distillation.teachers:  # frozen: on the device, outside the optimizer
            teacher.to(self.args.device)
        # The Trainer counts num_items_in_batch only for models whose forward takes **kwargs; this
        # compute_loss uses the count itself, whatever the model.
        self.model_accepts_loss_kwargs = True
        self.normalizers: list[float] = []  # what each microbatch was divided by (the tests read it)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["token_mask"].long())
        # None (e.g. a batch without labels): each term is this batch's mean, and the Trainer divides by
        # the accumulation steps (`loss_is_scaled_for_ga` left at its default decides so).
        loss, _ = self.distillation.loss(outputs.logits, inputs, kd_normalizer=num_items_in_batch,
                                         ce_normalizer=num_items_in_batch)
        if num_items_in_batch is not None:
            self.normalizers.append(float(num_items_in_batch))
            if self.args.average_tokens_across_devices:
                # the count is global over the processes, and DDP averages their gradients
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def train(steps: int, output_dir: Path, *, batch_size: int = 2, accumulation: int = 2, lr: float = 1e-3,
          seed: int = 0, max_length: int = 64, texts: list | None = None, callbacks=()) -> DistillationTrainer:
    """Run `steps` optimizer steps on `texts` (default: the first records of the corpus, one pass);
    returns the trainer (`trainer.state.log_history` has the losses)."""
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=lr, lr_scheduler_type="constant", seed=seed,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False,  # the collator reads the records' `text`, not a model argument
        use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False,
    )
    with args.main_process_first(desc="projection"):  # one process builds the artifact, the others load it
        d = kd_common.build(output_dir, seed=seed, max_length=max_length)
    texts = kd_common.load_texts(steps * accumulation * batch_size * args.world_size) if texts is None else texts
    trainer = DistillationTrainer(args=args, distillation=d, train_dataset=texts,
                                  data_collator=LabelledCollator(d.collator), callbacks=list(callbacks))
    trainer.train()
    return trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=Path("out/examples/hf_trainer"))
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation steps")
    args = parser.parse_args(argv)
    return train(args.steps, args.output_dir, accumulation=args.accumulation)


if __name__ == "__main__":
    main()
