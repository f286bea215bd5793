"""The run directory's outputs: `table.md`, `curves.png` (held-out BPB against steps, seed means per arm),
`results.json` and `REPORT.md` (protocol, machine, wall time, table, targets; last line `RESULT ...`)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.quality import result as res
from benchmarks.quality.digits import write_atomic
from benchmarks.quality.protocol import Arm, Protocol

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ArmStats:
    """An arm's per-seed finals and its seed-mean curve."""

    arm: Arm
    runs: list[dict] = field(default_factory=list)  # one run record per seed (cli.run_record)

    def values(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.runs if key in r]

    def mean(self, key: str) -> float:
        v = [x for x in self.values(key) if math.isfinite(x)]
        return statistics.fmean(v) if v and len(v) == len(self.runs) else math.nan

    def sd(self, key: str) -> float:
        v = self.values(key)
        return statistics.stdev(v) if len(v) >= 2 and all(map(math.isfinite, v)) else math.nan

    def curve(self) -> tuple[list[int], list[float]]:
        """Steps where every seed was evaluated, and the seed-mean held-out BPB there."""
        per_seed = [dict(map(tuple, r["curve"])) for r in self.runs]
        steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
        return steps, [statistics.fmean(c[s] for c in per_seed) for s in steps]


def _pm(mean: float, sd: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if math.isfinite(sd) else "")


def table(stats: list[ArmStats]) -> str:
    """The markdown table: one row per arm."""
    ce = next((s.mean("bpb") for s in stats if s.arm.name == "ce"), math.nan)
    rows = ["| arm | role | held-out BPB | digit BPB | top-1 | gain over CE (BPB) | seeds | s / run |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in stats:
        bpb = s.mean("bpb")
        gain = ce - bpb if s.arm.name != "ce" else math.nan
        rows.append(f"| {s.arm.label} (`{s.arm.name}`) | {s.arm.role} | {_pm(bpb, s.sd('bpb'))} | "
                    f"{_pm(s.mean('digit_bpb'), s.sd('digit_bpb'))} | {_pm(s.mean('top1'), s.sd('top1'), 3)} | "
                    f"{'—' if math.isnan(gain) else f'{gain:+.4f}'} | {len(s.runs)} | {s.mean('seconds'):.0f} |")
    return "\n".join(rows) + "\n"


def plot(stats: list[ArmStats], teachers: dict, path: Path) -> Path:
    """Held-out BPB against steps (seed means), all arms; the teachers' BPB as dashed lines. Right: the
    second half of the run, magnified."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    cmap = plt.get_cmap("tab20")
    for ax, zoom in zip(axes, (False, True)):
        last = 0
        for j, s in enumerate(stats):
            xs, ys = s.curve()
            if zoom and xs:
                keep = [k for k, x in enumerate(xs) if x >= xs[-1] / 2]
                xs, ys = [xs[k] for k in keep], [ys[k] for k in keep]
            style = "--" if s.arm.name == "ce" else "-"
            ax.plot(xs, ys, style, marker="o", markersize=3, color="black" if s.arm.name == "ce" else cmap(j % 20),
                    label=s.arm.label)
            last = max([last, *xs])
        for name, t in teachers.items():
            if math.isfinite(t["heldout_bpb"]):
                ax.axhline(t["heldout_bpb"], linestyle=":", color="gray")
                ax.annotate(f"teacher {name}", (0 if not zoom else last / 2, t["heldout_bpb"]), color="gray")
        ax.set(xlabel="student step", ylabel="held-out bits per byte",
               title="held-out BPB (mean over seeds)" + (", second half" if zoom else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def commit() -> str:
    """HEAD's hash, with "+dirty" when tracked files differ from it."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    import torch

    dev = (f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA device")
    return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} cores "
            f"(torch threads {torch.get_num_threads()}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {dev}")


def _minutes(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def _n_runs(stats: list[ArmStats]) -> int:
    return sum(len(s.runs) for s in stats)


def _run_seconds(stats: list[ArmStats]) -> float:
    return sum(float(r.get("seconds", 0.0)) for s in stats for r in s.runs)


def paired(stats: list[ArmStats], a: str, b: str, key: str = "bpb") -> tuple[float, float, int]:
    """Per-seed differences `a - b` (the same seed: same initialisation and data order): `(mean,
    standard error, seeds)`; NaN where fewer than 2 seeds are shared."""
    by = {s.arm.name: {r["seed"]: float(r[key]) for r in s.runs if key in r} for s in stats}
    if a not in by or b not in by:
        return math.nan, math.nan, 0
    seeds = sorted(set(by[a]) & set(by[b]))
    d = [by[a][k] - by[b][k] for k in seeds]
    if len(d) < 2 or not all(map(math.isfinite, d)):
        return math.nan, math.nan, len(d)
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)), len(d)


def noise(stats: list[ArmStats], bpb: dict, best: str) -> list[str]:
    """The "Noise" section: each compared pair's paired per-seed difference with its standard error,
    flagged as resolved when |mean| > 2 SE (a rough guide with 3 seeds, not a test)."""
    multi = min(res.MULTI_ARMS, key=lambda a: bpb.get(a, math.inf))
    single = min(("same_kl", best), key=lambda a: bpb.get(a, math.inf)) if best in bpb else "same_kl"
    pairs = [("same_kl", "ce", "same-vocab KD vs CE (recovery's denominator)"),
             (best, "ce", "best cross vs CE (recovery's numerator)"),
             (best, "uld", "best cross vs ULD"), (best, "gold", "best cross vs GOLD"),
             (multi, single, "best multi vs best single"), ("pkl", "public_pkl", "P-KL vs public P-KL"),
             ("pkl", "pkl_full", "cached top-K P-KL vs full logits")]
    rows = ["## Noise", "",
            "Paired per-seed differences of held-out BPB (each seed has the same initialisation and data order in",
            "every arm), mean ± standard error; *resolved* when |mean| > 2 SE. With few seeds this is a rough",
            "guide: a target met by an unresolved difference is met by the means, not shown.", "",
            "| pair | difference (BPB) | resolved |", "| --- | ---: | --- |"]
    for a, b, what in pairs:
        m, se, n = paired(stats, a, b)
        if math.isnan(m):
            continue
        rows.append(f"| {what}: `{a}` - `{b}` | {m:+.4f} ± {se:.4f} | {'yes' if abs(m) > 2 * se else 'no'} |")
    return rows


def report(p: Protocol, stats: list[ArmStats], teachers: dict, info: dict) -> str:
    """REPORT.md's text; its last line is the RESULT line."""
    bpb = {s.arm.name: s.mean("bpb") for s in stats}
    values = res.result_values(bpb)
    best = (res.best_of(bpb, res.CROSS_CANDIDATES)
            if all(math.isfinite(bpb.get(a, math.nan)) for a in res.CROSS_CANDIDATES) else "n/a")
    seeds = sorted({r["seed"] for s in stats for r in s.runs})
    lines = [
        f"# Distillation quality benchmark: `{p.name}` configuration",
        "",
        f"- Commit: `{info['commit']}`" + (f" ({info['commit_note']})" if info.get("commit_note") else "")
        + f"; run {info['started']} (UTC) into `{info['out']}`.",
        f"- Machine: {info['machine']}.",
        f"- Wall time: {_minutes(info['wall_s'])} in all; teachers and caches {_minutes(info['teachers_s'])} "
        f"({'built in this invocation' if info['teachers_built'] else 'found cached'}); student runs "
        f"{_minutes(info['arms_s'])} ({info['runs_done']} run(s) in this invocation); all {_n_runs(stats)} student "
        f"runs together, over every invocation: {_minutes(_run_seconds(stats))}.",
        f"- Command: `{info['command']}`.",
        "",
        "## Protocol",
        "",
        "The protocol below (sizes, steps, learning rate, batch) was chosen for the CE-only student before any",
        "KD arm was looked at (the demo's CE-only student of `data/configs/demo.yaml`) and is identical for",
        "every arm and seed; only the teachers and the loss differ. Nothing was tuned to the KD arms.",
        "",
        f"- Student: llama3 tokenizer, {json.dumps(p.student)}, restricted vocabulary; {p.steps} steps of "
        f"{p.batch_size} x {p.max_length} tokens, AdamW lr {p.lr} (warmup {p.warmup}, cosine to 10%), "
        f"CE weight 1, KD weight 1; seeds {seeds}.",
        f"- Teachers qwen3 (cross-tokenizer) and llama3 (same-vocab): {json.dumps(p.teacher)}, restricted "
        f"vocabularies, pre-trained CE only by the trainer (`teachers.N.pretrain`) for {p.teacher_steps} steps "
        f"(lr {p.teacher_lr}) on the train split in windows of {p.teacher_max_length} tokens "
        f"({max(1, p.batch_size * p.max_length // p.teacher_max_length)} per step: the student's tokens per step); "
        "outputs cached once (top-K = "
        f"{p.top_k}, bf16 log-probabilities) and read by every cached arm and seed; teacher budget "
        f"{p.teacher_max_length} tokens (never cuts the student short).",
        f"- Data: train `{info['train']}`, held-out `{info['heldout']}` ({info['heldout_docs']} documents); "
        f"digit-heavy subset (>= 20% ASCII-digit bytes): {info['digit_docs']} documents, {info['digit_bytes']} "
        "bytes.",
        f"- Evaluation: held-out BPB = the trainer's final `eval/bpb` on the whole held-out file (every "
        f"{p.eval_every} steps for the curves); digit BPB = the final student (`final/`, float32) on the "
        "digit-heavy subset; top-1 on the student's tokens. Mean ± sample standard deviation over seeds.",
        "",
        "| teacher | held-out BPB, its pre-training run | held-out BPB on the student's windows (arms, step 0) |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {t['heldout_bpb']:.4f} | {t.get('seen_bpb', math.nan):.4f} |" for name, t in teachers.items()],
        "",
        "## Results",
        "",
        table(stats).rstrip("\n"),
        "",
        "Gain over CE: CE-only BPB minus the arm's (positive = better). Curves: `curves.png`.",
        "",
        "## Targets",
        "",
        f"Best cross-tokenizer arm (lowest of P-KL, H-KL, ALM): `{best}`.",
        "",
    ]
    for text, ok in res.targets(values):
        lines.append(f"- {'met' if ok else 'not measured' if ok is None else 'MISSED'}: {text}.")
    lines += ["", *noise(stats, bpb, best)]
    definitions = res.__doc__.strip().split("\n\n", 1)[1].rstrip()
    lines += ["", "## RESULT definitions", "", "Fixed before any run (`benchmarks/quality/result.py`):", "",
              "```text", definitions, "```", "", res.result_line(values)]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, p: Protocol, stats: list[ArmStats], teachers: dict, info: dict) -> str:
    """table.md, curves.png, results.json, REPORT.md in `out`; returns the RESULT line."""
    write_atomic(out / "table.md", table(stats))
    plot(stats, teachers, out / "curves.png")
    bpb = {s.arm.name: s.mean("bpb") for s in stats}
    values = res.result_values(bpb)
    payload = {"protocol": p.summary(), "info": info, "teachers": teachers, "result": values,
               "arms": {s.arm.name: {"label": s.arm.label, "runs": s.runs} for s in stats}}
    write_atomic(out / "results.json", json.dumps(payload, indent=1, default=str, allow_nan=True))
    text = report(p, stats, teachers, info)
    write_atomic(out / "REPORT.md", text)
    return text.rstrip("\n").splitlines()[-1]


def rewrite(out: Path, p: Protocol) -> str:
    """Rebuild table.md, curves.png and REPORT.md of a finished run directory from its results.json
    (the run's own info: commit, machine, times); returns the RESULT line."""
    from benchmarks.quality import protocol as proto

    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    stats = [ArmStats(proto.arm(name), list(a["runs"])) for name, a in data["arms"].items()]
    return write_outputs(out, p, stats, data["teachers"], data["info"])
