"""The offline teacher cache (docs/teacher_cache.md): its size on disk and how fast it serves batches,
against the teacher forward it replaces.

Teacher: the demo's qwen3 teacher (data/configs/demo.yaml: qwen3 tokenizer, hidden 192, 3 layers,
MLP 512, its restricted output rows), random-init (its pre-training does not change sizes or
speeds); student tokenizer: llama3; data: the first `--lines` lines of the bundled training corpus,
read as the trainer reads them (pieces of at most 4 * max_length characters); one process.

    python -m benchmarks.bench_teacher_cache            # from the repository root; ends with the RESULT line

Figures (one function each):
- `bytes_per_token`: `cache.json`'s `bytes_per_token` (shard bytes on disk / cached positions) at
  K = 16, 64, 256; target <= 4.5 K + 16.
- `read_throughput`: teacher positions per second delivered by the cached collate path
  (`TrainCollate` with a `CachedTeacher`: read, align, truncate, pad, remap) against the online path
  it replaces (`TrainCollate` + the teacher forward + `topk_outputs`), same batches, same machine.
- `cached_step_vs_online_step`: the demo student's step (data wait + step, median) with both demo
  teachers (qwen3 P-KL, llama3 KL; random-init) read from K = 64 caches / run online with full
  logits, as the demo runs them.

RESULT: `bytes_per_token_k64`, `cached_step_vs_online_step` (target <= 0.5),
`cache_read_tokens_per_s`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run it from the repository root as a module: python -m benchmarks.bench_teacher_cache [options]")

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KS = (16, 64, 256)


def demo_config(root: Path, lines: int) -> dict:
    """The demo config with only its qwen3 teacher, not pre-trained, on the first `lines` lines."""
    import yaml

    cfg = yaml.safe_load((REPO / "data" / "configs" / "demo.yaml").read_text())
    train = root / "train.jsonl"
    with open(REPO / "data" / "corpus" / "train.jsonl", encoding="utf-8") as f:
        train.write_text("".join(line for _, line in zip(range(lines), f)), encoding="utf-8")
    teacher = dict(cfg["teachers"][0])
    teacher.pop("pretrain")
    cfg.update(output_dir=str(root / "run"), teachers=[teacher])
    cfg["data"].update(train=str(train), eval=None, num_workers=0)
    cfg["log"] = {"progress": False}
    return cfg


def bytes_per_token(cfg, root: Path) -> dict[int, dict]:
    """K -> cache.json of a cache built at K (and the build's seconds)."""
    from xtoken_loss.trainer.teacher_cache.writer import write_cache

    out = {}
    for k in KS:
        t0 = time.perf_counter()
        info = write_cache(cfg, 0, root / f"cache-k{k}", top_k=k)
        out[k] = dict(info, build_s=time.perf_counter() - t0)
    return out


def _collates(cfg, cache_dir: Path):
    from xtoken_loss.trainer.data import TrainCollate
    from xtoken_loss.trainer.distributed import init_distributed
    from xtoken_loss.trainer.prepare import preflight
    from xtoken_loss.trainer.run import _build_remaps, build_side, sample_max_chars, teacher_source
    from xtoken_loss.trainer.teacher_cache.collate import CachedTeacher

    dist = init_distributed("cpu")
    sides = preflight(cfg)
    remaps = _build_remaps(cfg, sides, dist, sample_max_chars(cfg))
    s_remap, t_remap = remaps.get(sides.student.fingerprint), remaps.get(sides.teachers[0].fingerprint)
    kw = dict(max_length=cfg.data.max_length, teacher_max_length=cfg.data.teacher_max_length,
              train_on=cfg.data.train_on, student_remap=s_remap, teacher_remaps=[t_remap])
    online = TrainCollate(sides.student, sides.teachers, **kw)
    cached = TrainCollate(sides.student, sides.teachers, teacher_caches=[CachedTeacher(cache_dir, remap=t_remap)],
                          **kw)
    model = build_side(teacher_source(cfg, 0, dist), sides.teachers[0], t_remap, seed=cfg.seed, dist=dist, cfg=cfg,
                       trainable=False, shard=False)
    return online, cached, model


def read_throughput(cfg, cache_dir: Path, k: int, repeats: int) -> dict[str, float]:
    """Teacher positions per second: the cached collate path, the online collate alone, and the online
    collate + teacher forward + `topk_outputs` (what the cache replaces)."""
    import torch

    from xtoken_loss.trainer.data import read_samples
    from xtoken_loss.trainer.run import sample_max_chars
    from xtoken_loss.trainer.teacher_cache import topk_outputs

    online, cached, model = _collates(cfg, cache_dir)
    samples = read_samples(cfg.data.train, max_chars=sample_max_chars(cfg))
    b = cfg.data.batch_size
    batches = [samples[a:a + b] for a in range(0, len(samples), b)]
    cached(batches[0])  # open the cache, build its hash table (once per process)
    online(batches[0])

    def timed(fn) -> tuple[float, float]:
        tokens, t0 = 0.0, time.perf_counter()
        for _ in range(repeats):
            for part in batches:
                tokens += fn(part)
        return tokens, time.perf_counter() - t0

    def via_cache(part):
        return float(cached(part)["teacher_0_token_mask"].sum())

    def collate_only(part):
        return float(online(part)["teacher_0_token_mask"].sum())

    def via_teacher(part):
        batch = online(part)
        ids, mask = batch["teacher_0_input_ids"], batch["teacher_0_token_mask"]
        with torch.no_grad():
            logits = model(input_ids=torch.where(mask, ids, 0), attention_mask=mask.long(), use_cache=False).logits
        topk_outputs(logits, ids, mask, k)
        return float(mask.sum())

    out = {}
    for name, fn in (("cached", via_cache), ("online_collate", collate_only), ("online_teacher", via_teacher)):
        tokens, seconds = timed(fn)
        out[name] = tokens / seconds
    out["tokens"] = tokens / repeats
    return out


def step_config(root: Path, lines: int, steps: int) -> dict:
    """The demo config with both its teachers (qwen3 P-KL, llama3 KL), random-init (pre-training
    changes no size or speed), `steps` steps on the first `lines` lines, no evaluation."""
    import yaml

    cfg = demo_config(root, lines)
    full = yaml.safe_load((REPO / "data" / "configs" / "demo.yaml").read_text())
    teachers = [{k: v for k, v in t.items() if k != "pretrain"} for t in full["teachers"]]
    cfg.update(teachers=teachers, max_steps=steps, resume=False)
    cfg["checkpoint"] = {"every": 10 * steps}
    return cfg


def cached_step_vs_online_step(root: Path, lines: int, k: int, steps: int) -> dict:
    """Median demo step time (data wait + step) of the student with both teachers online (full
    logits, as the demo runs) and read from K-slot caches (`teachers.I.cache`), same data and seed;
    the first step warms up and is not counted."""
    import statistics

    from xtoken_loss.trainer.config import TrainConfig
    from xtoken_loss.trainer.metrics import read_metrics
    from xtoken_loss.trainer.run import train
    from xtoken_loss.trainer.teacher_cache.writer import write_cache

    base = step_config(root, lines, steps)
    for i in range(len(base["teachers"])):
        write_cache(TrainConfig.from_dict(base), i, root / f"step-cache{i}", top_k=k)
    out = {}
    for mode in ("online", "cached"):
        cfg = dict(base, output_dir=str(root / f"step-{mode}"))
        if mode == "cached":
            cfg["teachers"] = [dict(t, cache=str(root / f"step-cache{i}")) for i, t in enumerate(base["teachers"])]
        train(TrainConfig.from_dict(cfg))
        recs = [r for r in read_metrics(cfg["output_dir"]) if "loss" in r][1:]
        out[mode] = statistics.median(r["time/step"] + r.get("time/data", 0.0) for r in recs)
        out[f"{mode}_teacher_forward"] = statistics.median(r.get("time/teacher_forward", 0.0) for r in recs)
        out[f"{mode}_data"] = statistics.median(r.get("time/data", 0.0) for r in recs)
    out["ratio"] = out["cached"] / out["online"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=120, help="lines of data/corpus/train.jsonl used")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the data per throughput figure")
    ap.add_argument("--steps", type=int, default=6, help="demo steps per step-time run (the first is not counted)")
    args = ap.parse_args()
    from xtoken_loss.trainer.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("XTOKEN_CACHE", str(root / "xcache"))
        cfg = TrainConfig.from_dict(demo_config(root, args.lines))
        m = cfg.teachers[0].model
        sizes = bytes_per_token(cfg, root)
        info = sizes[64]
        print(f"teacher: demo qwen3 (hidden {m['hidden_size']}, {m['num_layers']} layers, MLP "
              f"{m['intermediate_size']}, {info['teacher']['model_vocab_size']} restricted output rows), "
              f"student tokenizer llama3; {info['splits']['train']['num_docs']} documents, "
              f"{info['num_positions']} cached positions (teacher budget {info['positions_budget']})")
        print(f"{'K':>5}{'bytes/token':>14}{'target 4.5K+16':>16}{'cache MiB':>11}{'build s':>9}")
        for k, s in sizes.items():
            print(f"{k:>5}{s['bytes_per_token']:>14.1f}{4.5 * k + 16:>16.1f}{s['bytes'] / 2**20:>11.2f}"
                  f"{s['build_s']:>9.1f}")
        tp = read_throughput(cfg, root / "cache-k64", 64, args.repeats)
        print(f"teacher positions per second ({tp['tokens']:.0f} per pass, batches of {cfg.data.batch_size}, K=64):")
        print(f"  cached collate path                    {tp['cached']:>10.0f}")
        print(f"  online collate alone                   {tp['online_collate']:>10.0f}")
        print(f"  online collate + teacher + topk_outputs {tp['online_teacher']:>9.0f}")
        st = cached_step_vs_online_step(root, args.lines, 64, args.steps)
        ratio = st["ratio"]
        s, t = cfg.student.model, [dict(x) for x in step_config(root, args.lines, 1)["teachers"]]
        print(f"demo step (student hidden {s['hidden_size']} x {s['num_layers']} layers; teachers "
              + ", ".join(f"{x['name']} hidden {x['model']['hidden_size']} x {x['model']['num_layers']} layers"
                          for x in t) + f"; batch {cfg.data.batch_size} x {cfg.data.max_length} tokens), "
              f"median of {args.steps - 1} steps, seconds:")
        for mode, label in (("online", "online teachers (full logits)"), ("cached", "cached teachers (K=64)")):
            print(f"  {label:<31}{st[mode]:.3f} (teacher forwards {st[f'{mode}_teacher_forward']:.3f}, "
                  f"data wait {st[f'{mode}_data']:.3f})")
        print(f"  cached / online                {ratio:.3f} (target <= 0.5)")
    print(f"RESULT bytes_per_token_k64={info['bytes_per_token']:.2f} cached_step_vs_online_step={ratio:.3f} "
          f"cache_read_tokens_per_s={tp['cached']:.0f}")


if __name__ == "__main__":
    main()
