"""Loader and overlap-report speed (issue: "a 200k vocabulary in about a second"; "overlap-report
over all fixture tokenizers in under a minute").

Prints one row per fixture tokenizer (load time: canonical bytes + description, no encoding), the
time of the full overlap report over all of them, and ends with
`RESULT load_200k_seconds=<gpt-oss load> max_load_seconds=<x> overlap_report_seconds=<x>`.
Run: `python benchmarks/bench_loader.py` (after `python data/build_tokenizers.py`).
"""

from __future__ import annotations

import time

from xtoken_align import load_tokenizer
from xtoken_align.tokenizer.fixtures import FIXTURE_NAMES
from xtoken_align.tokenizer.overlap import overlap_report


def main() -> None:
    print(f"{'tokenizer':<14}{'ids':>9}{'load s':>9}")
    times = {}
    for name in FIXTURE_NAMES:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            tok = load_tokenizer(name)
            best = min(best, time.perf_counter() - t0)
        times[name] = best
        print(f"{name:<14}{tok.vocab_size:>9}{best:>9.3f}")
    t0 = time.perf_counter()
    toks = [load_tokenizer(n) for n in FIXTURE_NAMES]
    report = overlap_report(toks)
    total = time.perf_counter() - t0
    print(f"overlap report over {len(toks)} tokenizers ({len(report.coverage)} ordered pairs), "
          f"loading included: {total:.2f} s")
    print(f"RESULT load_200k_seconds={times['gpt-oss']:.3f} max_load_seconds={max(times.values()):.3f} "
          f"overlap_report_seconds={total:.2f}")


if __name__ == "__main__":
    main()
