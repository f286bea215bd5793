"""The digit-heavy part of the held-out split, and the held-out metrics of a finished student on any
JSONL file.

"Digit-heavy" (issue 15): a held-out document (one JSONL line) with at least 20% ASCII-digit bytes of
its UTF-8 text. That is where the tokenizers differ most (qwen3 spends one token per digit, llama3 one
per up to three).

`evaluate_file` loads a run's `final/` student, restricts it to the run's vocabulary remap (the rows
it was trained with, so the softmax is the trained model's), and runs the trainer's own `evaluate` on
the file's samples collated as the run collates them: on the run's held-out file it gives the run's
final `eval/bpb` (the tests check it).
"""

from __future__ import annotations

import json
from pathlib import Path

DIGIT_HEAVY = 0.2


def digit_fraction(text: str) -> float:
    """ASCII-digit bytes / UTF-8 bytes of `text` (0 for an empty text)."""
    data = text.encode("utf-8")
    return sum(48 <= c <= 57 for c in data) / len(data) if data else 0.0


def is_digit_heavy(record: dict) -> bool:
    return isinstance(record.get("text"), str) and digit_fraction(record["text"]) >= DIGIT_HEAVY


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` under a temporary name, renamed last (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_digit_subset(heldout: Path, out: Path) -> tuple[int, int]:
    """The digit-heavy documents of `heldout`, in order, as the JSONL `out`; returns (documents, UTF-8
    bytes of their texts)."""
    lines = [line for line in Path(heldout).read_text(encoding="utf-8").splitlines(keepends=True)
             if line.strip() and is_digit_heavy(json.loads(line))]
    write_atomic(Path(out), "".join(lines))
    return len(lines), sum(len(json.loads(line)["text"].encode("utf-8")) for line in lines)


def evaluate_file(cfg_dict: dict, run_dir: Path, path: Path) -> dict:
    """`eval/bpb`, `eval/ce`, `eval/top1`, `eval/bytes` of run `run_dir`'s final student (config
    `cfg_dict`, as trained) on the JSONL `path` (float32 parameters)."""
    from xtoken_loss.trainer import data as data_mod
    from xtoken_loss.trainer.config import TrainConfig
    from xtoken_loss.trainer.distributed import init_distributed
    from xtoken_loss.trainer.evaluate import evaluate
    from xtoken_loss.trainer.prepare import _load_tok, cache_root
    from xtoken_loss.trainer.run import build_side, sample_max_chars
    from xtoken_loss.trainer.vocab_remap import build_remap

    cfg = TrainConfig.from_dict(cfg_dict)
    dist = init_distributed(cfg.parallel.device)
    tok = _load_tok(cfg.student.tokenizer, "student.tokenizer")
    max_chars = sample_max_chars(cfg)
    remap = None
    if cfg.student.restrict_vocab:  # the run's remap (cached): the same files, the same pieces
        files = [cfg.data.train] + ([cfg.data.eval] if cfg.data.eval else [])
        remap = build_remap(tok, files, max_chars=max_chars, cache_dir=cache_root() / "remaps")
    model = build_side(str(Path(run_dir) / "final"), tok, remap, seed=cfg.seed, dist=dist, cfg=cfg,
                       trainable=False, shard=False).to(dist.device)
    collate = data_mod.TrainCollate(tok, [], max_length=cfg.data.max_length, train_on=cfg.data.train_on,
                                    student_remap=remap)
    samples = data_mod.read_samples(path, max_chars=max_chars)
    batches = list(data_mod.eval_batches(samples, collate, cfg.eval.batch_size))
    return evaluate(model, [], None, batches, dist)
