"""`metrics.jsonl` (one JSON object per line, rank 0 writes) and the progress display.

Train lines: `step` (1-based), `loss`, `ce`, `teacher_{i}/kd`, `teacher_{i}/weight`, `lr`,
`grad_norm`, `tokens_per_s`, `bytes_per_s`, `world_size`, `skipped` and the step-time breakdown
(`time/*` seconds). Eval lines: `step` and `eval/*` keys only. A resumed run first drops the lines
of steps after its checkpoint (they were written by the interrupted run and will be redone), then
appends.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; "nan" / "inf" keep the line valid and the fact visible
    return v


class MetricsLog:
    """Appends metric lines to `run_dir/metrics.jsonl` (rank 0 only; other ranks get a no-op)."""

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int):
        """`start_step`: the step the run continues from (0: a fresh start). Lines of later steps
        (and, on a fresh start in a directory of ours, every line: a run killed before its first
        checkpoint) were written by an interrupted run and are dropped; they will be redone."""
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled and self.path.exists():
            self._truncate_after(start_step)

    def _truncate_after(self, step: int) -> None:
        kept = [rec for rec in read_metrics(self.path.parent) if step > 0 and int(rec.get("step", 0)) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(rec) + "\n" for rec in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in record.items()})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


def read_metrics(run_dir) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (lines cut by a kill are skipped)."""
    path = Path(run_dir) / METRICS_FILE
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


class Progress:
    """Rank 0's progress: a rich bar on a terminal, a plain line every `every` steps otherwise."""

    def __init__(self, *, total: int, start: int, enabled: bool, label: str):
        self.enabled = enabled
        self.total, self.label = total, label
        self.tty = enabled and sys.stderr.isatty()
        self.last_print = 0.0
        self._bar = None
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._task = self._bar.add_task(label, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
            return
        now = time.monotonic()
        if now - self.last_print >= 10 or step == self.total:
            self.last_print = now
            print(f"{self.label} step {step}/{self.total} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
