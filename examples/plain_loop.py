"""xtoken's losses in a plain PyTorch loop, with gradient accumulation.

    python examples/plain_loop.py --steps 3 --output-dir out/examples/plain

Each optimizer step reads `--accumulation` microbatches. Every loss term is a sum over its units
divided by that term's unit count over the *whole step* (`kd_common.step_units`), so the summed
microbatch gradients equal the gradient of one batch holding them all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import kd_common
import torch


def train(steps: int, output_dir: Path, *, batch_size: int = 2, accumulation: int = 2, lr: float = 1e-3,
          seed: int = 0, max_length: int = 64) -> tuple[list[float], torch.nn.Module]:
    """Run `steps` optimizer steps; returns (the loss of each step, the trained student)."""
    d = kd_common.build(output_dir, seed=seed, max_length=max_length)
    texts = kd_common.load_texts(steps * accumulation * batch_size)
    loader = torch.utils.data.DataLoader(texts, batch_size=batch_size, collate_fn=d.collator)
    optimizer = torch.optim.AdamW(d.student.parameters(), lr=lr)
    batches, losses = iter(loader), []
    for step in range(steps):
        microbatches = [next(batches) for _ in range(accumulation)]
        kd_units, ce_units = kd_common.step_units(d, microbatches)
        total = 0.0
        for batch in microbatches:
            logits = d.student(input_ids=batch["input_ids"], attention_mask=batch["token_mask"].long()).logits
            loss, _ = d.loss(logits, batch, kd_normalizer=kd_units, ce_normalizer=ce_units)
            loss.backward()  # adds this microbatch's share of the step's gradient
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        print(f"step {step + 1}: loss {total:.4f}")
    return losses, d.student


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, default=Path("out/examples/plain"))
    args = parser.parse_args(argv)
    return train(args.steps, args.output_dir)


if __name__ == "__main__":
    main()
