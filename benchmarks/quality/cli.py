"""`python -m benchmarks.quality`: teachers and caches (once), then every arm x seed in this process through
`xtoken_loss.trainer.run.train`, then the table, the curves and REPORT.md in the run directory.

    python -m benchmarks.quality [--config default|gpu|smoke] [--seeds N] [--arms a,b,...] [--out DIR]

`--out` (default `benchmarks/quality/runs/<config>-<UTC time>`) is a new or empty folder, or one this
benchmark created with the same protocol: its finished runs are kept and the rest are run (an
interrupted benchmark continues). A complete default run (every arm, at least 3 seeds) also writes
`benchmarks/quality/REPORT.md` and `benchmarks/quality/curves.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.quality import protocol as proto
from benchmarks.quality.digits import evaluate_file, write_atomic, write_digit_subset
from benchmarks.quality.report import ArmStats, commit, machine, write_outputs
from benchmarks.quality.teachers import data_files, prepare_teachers

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MARKER = ".quality-run"  # written into every run directory this benchmark creates
DONE = "quality-run.json"  # a finished arm x seed run's record, written last


def log(msg: str) -> None:
    print(f"[quality {datetime.now(timezone.utc):%H:%M:%S}] {msg}", flush=True)


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def check_out(out: Path, marker: dict) -> None:
    """`out` is new, empty, or a run directory of this benchmark with the same protocol (SystemExit
    with one line otherwise; nothing there is touched)."""
    if out.exists() and not out.is_dir():
        sys.exit(f"error: --out {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        sys.exit(f"error: --out {out} is not empty and was not created by this benchmark (no {MARKER}); "
                 "choose another --out (nothing there is overwritten)")
    old = json.loads((out / MARKER).read_text(encoding="utf-8"))
    if old != marker:
        diff = sorted(k for k in set(old["protocol"]) | set(marker["protocol"])
                      if old["protocol"].get(k) != marker["protocol"].get(k))
        sys.exit(f"error: --out {out} holds a run of another protocol ({', '.join(diff) or 'config'} differ); "
                 "choose another --out")


def run_record(arm: proto.Arm, seed: int, run_dir: Path, cfg: dict, digits: Path, seconds: float) -> dict:
    """The finals of one finished run: held-out BPB / CE / top-1 / bytes (the trainer's last eval), the
    digit-heavy subset's, the curve and the teachers' BPB at step 0."""
    from xtoken_loss.trainer.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir) if "eval/bpb" in r]
    curve = {int(r["step"]): float(r["eval/bpb"]) for r in evals}  # a resumed run's repeated step: the last
    last = evals[-1]
    first = next((r for r in evals if r["step"] == 0), {})
    d = evaluate_file(cfg, run_dir, digits)
    names = [t.name for t in arm.teachers]
    return {"arm": arm.name, "seed": seed, "run_dir": str(run_dir), "seconds": seconds,
            "bpb": last["eval/bpb"], "ce": last["eval/ce"], "top1": last["eval/top1"], "bytes": last["eval/bytes"],
            "digit_bpb": d["eval/bpb"], "digit_top1": d["eval/top1"], "digit_bytes": d["eval/bytes"],
            "curve": sorted(curve.items()),
            "teacher_bpb": {n: first.get(f"eval/teacher_{j}/bpb") for j, n in enumerate(names)}}


def publish(out: Path) -> None:
    """Copy a complete default run's REPORT.md and curves.png into benchmarks/quality/ (the committed report)."""
    for name in ("REPORT.md", "curves.png"):
        tmp = HERE / f".{name}.tmp"
        shutil.copyfile(out / name, tmp)
        tmp.replace(HERE / name)
    log(f"wrote {HERE / 'REPORT.md'}")


def report_only(out: Path | None, p: proto.Protocol, *, complete: bool) -> int:
    if out is None or not (out / "results.json").is_file():
        sys.exit(f"error: --report-only needs --out DIR of a finished run (no results.json in {out})")
    from benchmarks.quality.report import rewrite

    line = rewrite(out, p)
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    if p.name == "default" and complete and len(data["arms"]) == len(proto.ARMS):
        publish(out)
    print(line, flush=True)
    return 0


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(proto.PROTOCOLS), default="default")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: the configuration's)")
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of {','.join(proto.ARM_NAMES)}")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default benchmarks/quality/runs/...)")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the report of the finished run in --out from its results.json (trains nothing)")
    ap.add_argument("--keep-models", action="store_true",
                    help="keep each run's final/ and checkpoints/ (default: removed once its metrics are read)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    p = proto.PROTOCOLS[args.config]
    n_seeds = args.seeds or p.seeds
    if n_seeds < 1:
        sys.exit("error: --seeds must be at least 1")
    try:
        arms = [proto.arm(a.strip()) for a in args.arms.split(",")] if args.arms else list(proto.ARMS)
    except KeyError as exc:
        sys.exit(f"error: --arms: {exc.args[0]}")
    if args.report_only:
        return report_only(args.out, p, complete=args.arms is None and n_seeds >= 3)
    started = datetime.now(timezone.utc)
    at_commit = commit()  # the code this invocation runs (edits made while it runs are not loaded)
    out = args.out or HERE / "runs" / f"{p.name}-{started:%Y%m%d-%H%M%S}"
    marker = {"config": p.name, "protocol": p.summary()}
    check_out(out, marker)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / MARKER, json.dumps(marker, indent=1))
    t_start = time.perf_counter()
    log(f"{p.name}: {len(arms)} arm(s) x {n_seeds} seed(s) into {out}")

    files = data_files(p)
    digits = out / "digits-heldout.jsonl"
    n_digit, digit_bytes = write_digit_subset(files.heldout, digits)
    log(f"held-out {files.heldout} has {files.heldout_docs} documents, {n_digit} digit-heavy "
        f"({digit_bytes} bytes) -> {digits.name}")
    if n_digit == 0:
        sys.exit("error: the held-out split has no digit-heavy document: the digit BPB is undefined")

    teachers = prepare_teachers(p, files, log=log)
    teachers_s = time.perf_counter() - t_start
    caches = {name: str(t.cache) for name, t in teachers.items()}
    models = {name: str(t.model) for name, t in teachers.items()}

    from xtoken_loss.trainer.config import TrainConfig
    from xtoken_loss.trainer.run import train

    stats = {a.name: ArmStats(a) for a in arms}
    jobs = [(a, s) for s in range(n_seeds) for a in arms]  # seed-major: every arm has a number early
    t_arms, done_here, run_s = time.perf_counter(), 0, []
    for k, (a, seed) in enumerate(jobs, 1):
        run_dir = out / "arms" / a.name / f"seed-{seed}"
        if (run_dir / DONE).is_file():
            stats[a.name].runs.append(json.loads((run_dir / DONE).read_text(encoding="utf-8")))
            continue
        cfg = proto.arm_config(p, a, seed, str(run_dir), str(files.train), str(files.heldout), models,
                               caches)
        cfg["resume"] = run_dir.exists()  # an interrupted run of ours: continue it
        t0 = time.perf_counter()
        train(TrainConfig.from_dict(cfg))
        rec = run_record(a, seed, run_dir, cfg, digits, time.perf_counter() - t0)
        rec["seconds"] = time.perf_counter() - t0
        write_atomic(run_dir / DONE, json.dumps(rec, indent=1))
        if not args.keep_models:
            for sub in ("checkpoints", "final"):  # written by this run's trainer; its numbers are read
                shutil.rmtree(run_dir / sub, ignore_errors=True)
        stats[a.name].runs.append(rec)
        done_here += 1
        run_s.append(rec["seconds"])
        left = sum(1 for b, s in jobs[k:] if not (out / "arms" / b.name / f"seed-{s}" / DONE).is_file())
        eta = left * sum(run_s) / len(run_s)
        log(f"[{k}/{len(jobs)}] arm {a.name} seed {seed}: BPB {rec['bpb']:.4f}, digits {rec['digit_bpb']:.4f}, "
            f"top-1 {rec['top1']:.3f} in {rec['seconds']:.0f} s; elapsed {_hms(time.perf_counter() - t_start)}, "
            f"ETA {_hms(eta)}")
    arms_s = time.perf_counter() - t_arms

    info = {
        "commit": at_commit, "machine": machine(), "started": f"{started:%Y-%m-%d %H:%M}", "out": str(out),
        "wall_s": time.perf_counter() - t_start, "teachers_s": teachers_s, "arms_s": arms_s,
        "teachers_built": any(t.pretrain_s is not None or t.cache_s is not None for t in teachers.values()),
        "runs_done": done_here, "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv),
        "train": _rel(files.train), "heldout": _rel(files.heldout), "heldout_docs": files.heldout_docs,
        "digit_docs": n_digit, "digit_bytes": digit_bytes,
    }
    ordered = [stats[a.name] for a in arms]
    tinfo = {name: {"heldout_bpb": t.heldout_bpb, "model": str(t.model), "cache": str(t.cache),
                    "pretrain_dir": str(t.pretrain_dir), "seen_bpb": _seen_bpb(ordered, name),
                    "pretrain_s": t.pretrain_s, "cache_s": t.cache_s} for name, t in teachers.items()}
    line = write_outputs(out, p, ordered, tinfo, info)
    print((out / "table.md").read_text(encoding="utf-8"), flush=True)
    if p.name == "default" and len(arms) == len(proto.ARMS) and n_seeds >= 3:
        publish(out)
    log(f"done in {_hms(info['wall_s'])}: {out / 'REPORT.md'}")
    print(line, flush=True)
    return 0 if all(math.isfinite(r["bpb"]) for s in ordered for r in s.runs) else 1


def _seen_bpb(stats: list[ArmStats], name: str) -> float:
    """Teacher `name`'s held-out BPB as the arms see it (on the student's windows), from the step-0
    evaluation of the first single-teacher arm that has it."""
    for s in stats:
        for r in s.runs:
            v = r["teacher_bpb"].get(name)
            if len(r["teacher_bpb"]) == 1 and v is not None:
                return float(v)
    return math.nan


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)
