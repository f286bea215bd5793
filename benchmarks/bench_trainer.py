"""Step time of xtoken-train: a KD step (excluding the teachers' forwards) against a CE-only step on
the same student and data, with the step-time breakdown.

Realistic shape (issue 13): a Llama-style student with the full 128,256-row head and a body of
~31M parameters (hidden 512, 9 layers, MLP 1536), two random-init teachers (a qwen3 P-KL teacher
with its full 151,936-wide head and the cached `projection: auto` artifact, and a same-vocab llama3
KL teacher), 2 sequences x 512 tokens of the bundled corpus per step, one process. Each run does
`--steps` optimizer steps through the real trainer (`xtoken_loss.trainer.run.train`); the first is
a warm-up and is not counted, the figures are medians of the rest, read from `metrics.jsonl`.

    python -m benchmarks.bench_trainer            # from the repository root; ends with the RESULT line

RESULT: `kd_step_vs_ce_step` = (KD step - teacher forwards) / CE step (target <= 1.1, bar 1.25);
`data_share` = time waiting for batches / step time, in the KD run.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run it from the repository root as a module: python -m benchmarks.bench_trainer [options]")

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "step")


def student_model(hidden: int, layers: int, mlp: int) -> dict:
    return {"architecture": "llama", "hidden_size": hidden, "num_layers": layers, "num_heads": 8,
            "intermediate_size": mlp, "max_position_embeddings": 1024}


def config(out: Path, args, *, kd: bool) -> dict:
    teachers = [
        {"name": "qwen3", "tokenizer": "qwen3", "loss": "pkl", "projection": "auto",
         "model": {"architecture": "qwen3", "hidden_size": 256, "num_layers": 2, "num_heads": 4,
                   "intermediate_size": 768, "max_position_embeddings": 1024}},
        {"name": "llama3", "tokenizer": "llama3", "loss": "kl",
         "model": {"architecture": "llama", "hidden_size": 256, "num_layers": 2, "num_heads": 4,
                   "intermediate_size": 768, "max_position_embeddings": 1024}},
    ] if kd else []
    return {
        "output_dir": str(out), "max_steps": args.steps, "seed": 0,
        "student": {"tokenizer": "llama3", "model": student_model(args.hidden, args.layers, args.mlp)},
        "teachers": teachers,
        "data": {"train": str(REPO / "data" / "corpus" / "train.jsonl"), "batch_size": 2, "max_length": 512,
                 "teacher_max_length": 1024,
                 "num_workers": 1},
        "optim": {"lr": 1e-4},
        "schedule": {"total_steps": 100, "warmup_steps": 0},
        "log": {"progress": False},
    }


def body_params(hidden: int, layers: int, mlp: int) -> int:
    return layers * (4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden)


def run(cfg: dict) -> dict[str, float]:
    from xtoken_loss.trainer.config import TrainConfig
    from xtoken_loss.trainer.metrics import read_metrics
    from xtoken_loss.trainer.run import train

    train(TrainConfig.from_dict(cfg))
    recs = [r for r in read_metrics(cfg["output_dir"]) if "loss" in r][1:]  # the first step warms up
    med = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in recs) for p in PHASES}
    med["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in recs)
    return med


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not counted)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--mlp", type=int, default=1536)
    args = ap.parse_args()
    body = body_params(args.hidden, args.layers, args.mlp) / 1e6
    print(f"student: llama3 head 128,256 x {args.hidden}, body {body:.1f}M parameters; "
          f"2 x 512 tokens per step; {args.steps - 1} measured steps per run")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("XTOKEN_CACHE", str(REPO / "data" / "cache"))
        ce = run(config(Path(tmp) / "ce", args, kd=False))
        kd = run(config(Path(tmp) / "kd", args, kd=True))
    print(f"{'phase (s, median)':<20}{'CE only':>10}{'KD':>10}")
    for p in PHASES:
        print(f"{p:<20}{ce[p]:>10.3f}{kd[p]:>10.3f}")
    print(f"{'tokens/s':<20}{ce['tokens_per_s']:>10.0f}{kd['tokens_per_s']:>10.0f}")
    ratio = (kd["step"] - kd["teacher_forward"]) / ce["step"]
    share = kd["data"] / kd["step"]
    print(f"KD step without the teachers' forwards / CE step: {ratio:.3f} (target <= 1.1, bar 1.25)")
    print(f"RESULT kd_step_vs_ce_step={ratio:.3f} data_share={share:.3f}")


if __name__ == "__main__":
    main()
