"""`xtoken-train plot RUN_DIR`: the curves of a run's metrics.jsonl as one PNG (training loss with
CE and each teacher's KD, held-out bits per byte, per-teacher weights)."""

from __future__ import annotations

import math
from pathlib import Path

from xtoken_core.errors import DataFileError
from xtoken_loss.trainer.metrics import METRICS_FILE, read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def _teacher_names(run: Path) -> dict[int, str]:
    """Teacher index -> name, from the run's resolved config (empty if unreadable)."""
    try:
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        return {i: str(t.get("name", i)) for i, t in enumerate(cfg.get("teachers") or [])}
    except (OSError, ValueError, AttributeError):
        return {}


def plot_run(run_dir, out=None) -> Path:
    """Write the PNG (default `RUN_DIR/curves.png`) and return its path."""
    run = Path(run_dir)
    if not (run / METRICS_FILE).is_file():
        raise DataFileError(f"{run} holds no {METRICS_FILE}: give the output_dir of an xtoken-train run")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataFileError("plotting needs matplotlib: pip install 'xtoken[plot]'") from None
    records = read_metrics(run)
    names = _teacher_names(run)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/bpb" in r]
    keys = sorted({k for r in train for k in r})
    kd_keys = [k for k in keys if k.startswith("teacher_") and k.endswith("/kd")]
    w_keys = [k for k in keys if k.startswith("teacher_") and k.endswith("/weight")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key in ["loss", "ce", *kd_keys]:
        ax.plot(*_series(train, key), label=key)
    ax.set(title="training loss", xlabel="step")
    ax.legend()
    ax = axes[1]
    ax.plot(*_series(evals, "eval/bpb"), marker="o", label="student")
    for key in sorted({k for r in evals for k in r if k.startswith("eval/teacher_") and k.endswith("/bpb")}):
        xs, ys = _series(evals, key)
        if ys:
            ax.axhline(ys[0], linestyle="--", color="gray")
            j = int(key.split("/")[1].removeprefix("teacher_"))
            ax.annotate(f"teacher {names.get(j, j)}", (0, ys[0]))
    ax.set(title="held-out bits per byte", xlabel="step")
    ax.legend()
    ax = axes[2]
    for key in w_keys:
        j = int(key.split("/")[0].removeprefix("teacher_"))
        ax.plot(*_series(train, key), label=str(names.get(j, key)))
    ax.set(title="teacher weights", xlabel="step")
    if w_keys:
        ax.legend()
    fig.tight_layout()
    path = Path(out) if out is not None else run / "curves.png"
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
