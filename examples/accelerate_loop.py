"""xtoken's losses in an `accelerate.Accelerator` loop (prepare, accumulate, backward).

    python examples/accelerate_loop.py --steps 3 --output-dir out/examples/accelerate
    accelerate launch examples/accelerate_loop.py ...   # the same on several processes

As in plain_loop.py, each loss term is divided by its unit count over the whole optimizer step, here
also summed over the processes (`accelerator.reduce`). Accelerate's own conventions then need undoing:
`accelerator.backward` divides the loss by the accumulation steps, and DDP averages the gradients
over the processes; the loss is multiplied by both so the step's gradient is the exact global one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kd_common
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin


def train(steps: int, output_dir: Path, *, batch_size: int = 2, accumulation: int = 2, lr: float = 1e-3,
          seed: int = 0, max_length: int = 64, cpu: bool = False) -> tuple[list[float], torch.nn.Module]:
    """Run `steps` optimizer steps; returns (the loss of each step, the trained, unwrapped student)."""
    # The loop fetches a step's microbatches ahead (to count their units), so a step ends after
    # `accumulation` microbatches, not when the loader runs out: sync_with_dataloader=False.
    plugin = GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=plugin, cpu=cpu)
    with accelerator.main_process_first():  # one process builds the projection artifact, the others load it
        d = kd_common.build(output_dir, seed=seed, max_length=max_length)
    texts = kd_common.load_texts(steps * accumulation * batch_size * accelerator.num_processes)
    loader = torch.utils.data.DataLoader(texts, batch_size=batch_size, collate_fn=d.collator)
    optimizer = torch.optim.AdamW(d.student.parameters(), lr=lr)
    student, optimizer, loader = accelerator.prepare(d.student, optimizer, loader)
    for teacher in d.teachers:  # frozen: moved to the device, never prepared (no DDP, no optimizer)
        teacher.to(accelerator.device)
    scale = accumulation * accelerator.num_processes
    batches, losses = iter(loader), []
    for step in range(steps):
        microbatches = [next(batches) for _ in range(accumulation)]
        kd_units, ce_units = kd_common.step_units(d, microbatches)
        kd_units = [accelerator.reduce(n, reduction="sum") for n in kd_units]
        ce_units = accelerator.reduce(ce_units, reduction="sum")
        total = torch.zeros((), device=accelerator.device)
        for batch in microbatches:
            with accelerator.accumulate(student):  # no gradient sync before the last microbatch
                logits = student(input_ids=batch["input_ids"], attention_mask=batch["token_mask"].long()).logits
                loss, _ = d.loss(logits, batch, kd_normalizer=kd_units, ce_normalizer=ce_units)
                accelerator.backward(loss * scale)
                optimizer.step()  # a no-op until the step's last microbatch
                optimizer.zero_grad()
            total += loss.detach()
        losses.append(accelerator.reduce(total, reduction="sum").item())  # the step's global loss
        accelerator.print(f"step {step + 1}: loss {losses[-1]:.4f}")
    return losses, accelerator.unwrap_model(student)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=Path("out/examples/accelerate"))
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where an accelerator is present")
    args = parser.parse_args(argv)
    return train(args.steps, args.output_dir, cpu=args.cpu)


if __name__ == "__main__":
    main()
