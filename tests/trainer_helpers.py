"""Shared pieces of the trainer tests: small real data files and a tiny two-teacher config (a
cross-tokenizer qwen3 P-KL teacher and a same-vocab llama3 KL teacher, random-init, restricted
vocabularies), run in-process or under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus"


def small_corpus(folder: Path, n_train: int = 48, n_eval: int = 8) -> tuple[Path, Path]:
    """The first records of the bundled corpus, as train / held-out JSONL files."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for split, n in (("train", n_train), ("heldout", n_eval)):
        path = folder / f"{split}.jsonl"
        if not path.exists():
            with open(CORPUS / f"{split}.jsonl", encoding="utf-8") as f:
                lines = [next(f) for _ in range(n)]
            path.write_text("".join(lines), encoding="utf-8")
        out.append(path)
    return out[0], out[1]


def tiny_model(arch: str = "llama", hidden: int = 32, layers: int = 2) -> dict:
    return {"architecture": arch, "hidden_size": hidden, "num_layers": layers, "num_heads": 2,
            "intermediate_size": 2 * hidden, "max_position_embeddings": 256}


def tiny_config(output_dir: Path, data_dir: Path, **over) -> dict:
    """A complete config as a plain dict (`TrainConfig.from_dict`), with `over` merged on top."""
    train, heldout = small_corpus(data_dir)
    cfg = {
        "output_dir": str(output_dir), "max_steps": 4, "seed": 0,
        "student": {"tokenizer": "llama3", "model": tiny_model(), "restrict_vocab": True},
        "teachers": [
            {"name": "qwen3", "tokenizer": "qwen3", "model": tiny_model("qwen3", 48), "loss": "pkl",
             "projection": "auto"},
            {"name": "llama3", "tokenizer": "llama3", "model": tiny_model("llama", 48), "loss": "kl"},
        ],
        "data": {"train": str(train), "eval": str(heldout), "batch_size": 4, "max_length": 64, "num_workers": 0},
        "optim": {"lr": 1e-2},
        "schedule": {"total_steps": 8, "warmup_steps": 2},
        "log": {"progress": False},
    }
    from xtoken_loss.trainer.config import merge

    return merge(cfg, over)


def train_records(run_dir: Path) -> list[dict]:
    """The training lines of a run's metrics.jsonl."""
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def run_torchrun(nproc: int, config: dict, tmp: Path, *overrides: str, timeout: float = 240):
    """`torchrun --nproc_per_node=nproc -m xtoken_cli.train_cmd --config FILE overrides` as a
    subprocess (gloo on CPU); returns the CompletedProcess."""
    import yaml

    cfg_file = tmp / f"config-{nproc}.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "xtoken_cli.train_cmd", "--config", str(cfg_file), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
