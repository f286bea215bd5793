"""Projection build speed and memory: llama3 -> qwen3, both directions (issue target: under 10 s and
under 1.5 GB peak RSS without a corpus on a 2-core CPU machine).

Each build runs in a fresh subprocess (tokenizer loading, both directions, writing the artifact),
so its peak RSS is that process's own (`os.wait4` rusage). "process s" is the subprocess's whole
wall time (interpreter start and imports included); "build s" is load + build + write, timed
inside it. Prints a table and ends with `RESULT seconds=<process s> peak_rss_mb=<mb>` for the
no-corpus build (best of the repeats).
Run: `python benchmarks/bench_projection.py` (after `python data/build_tokenizers.py`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus" / "train.jsonl"

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from xtoken_align import load_tokenizer
from xtoken_align.projection.builder import ProjectionConfig, build_projection
from xtoken_align.projection.refine import read_corpus
out, corpus = sys.argv[1], sys.argv[2] or None
student, teacher = load_tokenizer("llama3"), load_tokenizer("qwen3")
texts = read_corpus(corpus) if corpus else None
b = build_projection(student, teacher, ProjectionConfig(both_directions=True, teacher_model_vocab_size=151936),
                     corpus=texts)
b.save(out)
print(json.dumps({"build_s": time.perf_counter() - t0, "stats": b.forward.meta["stats"]}))
"""


def run_once(corpus: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(tmp) / "proj"), str(corpus or "")],
                                stdout=subprocess.PIPE, cwd=REPO, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"build failed (exit {proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    return {"process_s": wall, "build_s": res["build_s"], "rss_mb": usage.ru_maxrss / 1024, "stats": res["stats"]}


def main(repeats: int = 2) -> None:
    print(f"llama3 -> qwen3, both directions, teacher width 151936; {os.cpu_count()} CPUs")
    print(f"{'case':<12}{'process s':>11}{'build s':>9}{'peak RSS MB':>13}  rows exact/decomposed/refined")
    best = None
    for label, corpus in [("no corpus", None), ("corpus", CORPUS)]:
        runs = [run_once(corpus) for _ in range(repeats if corpus is None else 1)]
        r = min(runs, key=lambda x: x["process_s"])
        st = r["stats"]
        print(f"{label:<12}{r['process_s']:>11.2f}{r['build_s']:>9.2f}{r['rss_mb']:>13.0f}  "
              f"{st['exact_rows']}/{st['decomposed_rows']}/{st['corpus_refined_rows']}")
        if corpus is None:
            best = r
    print(f"RESULT seconds={best['process_s']:.2f} peak_rss_mb={best['rss_mb']:.0f}")


if __name__ == "__main__":
    main()
