"""The RESULT line's definitions (issue 15), fixed before any run, on seed-mean held-out BPB per arm.

    recovery                     = (BPB[ce] - BPB[best cross]) / (BPB[ce] - BPB[same_kl])
    best_cross_minus_uld_bpb     = BPB[best cross] - BPB[uld]
    best_cross_minus_gold_bpb    = BPB[best cross] - BPB[gold]           (the principled GOLD arm)
    multi_minus_best_single_bpb  = BPB[multi] - min(BPB[same_kl], BPB[best cross])
    pkl_minus_public_pkl_bpb     = BPB[pkl] - BPB[public_pkl]
    cache_minus_full_bpb         = BPB[pkl] - BPB[pkl_full]              (top-K cache vs full logits)

*best cross* is the lowest of the principled P-KL, H-KL and ALM arms (ULD, GOLD and the public forms
are comparisons, not candidates); *multi* the lowest of the three two-teacher arms. Differences are in
bits per byte, negative = the first is better. `recovery` is NaN when same-vocab KD gains nothing over
CE only (no gain to recover: the ratio would mean nothing, its sign least of all).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

CROSS_CANDIDATES = ("pkl", "hkl", "alm")
MULTI_ARMS = ("sum_static", "sum_dynamic", "select")
KEYS = ("recovery", "best_cross_minus_uld_bpb", "best_cross_minus_gold_bpb", "multi_minus_best_single_bpb",
        "pkl_minus_public_pkl_bpb", "cache_minus_full_bpb")
NEEDED = ("ce", "same_kl", *CROSS_CANDIDATES, "gold", "uld", "public_pkl", "pkl_full", *MULTI_ARMS)


def best_of(bpb: Mapping[str, float], arms) -> str:
    """The arm of `arms` with the lowest BPB (ties: the first listed)."""
    return min(arms, key=lambda a: (bpb[a], list(arms).index(a)))


def result_values(bpb: Mapping[str, float]) -> dict[str, float]:
    """The six RESULT numbers from the seed-mean held-out BPB of each arm (module doc). An arm missing
    from `bpb` or a non-finite value makes the numbers that read it NaN (never a silently wrong value)."""
    b = {a: float(bpb[a]) if a in bpb and math.isfinite(float(bpb[a])) else math.nan for a in NEEDED}
    nan = math.nan
    if any(math.isnan(b[a]) for a in CROSS_CANDIDATES):
        best = nan
    else:
        best = b[best_of(b, CROSS_CANDIDATES)]
    same_gain = b["ce"] - b["same_kl"]
    recovery = (b["ce"] - best) / same_gain if same_gain > 0 else nan  # NaN stays NaN
    multi = nan if any(math.isnan(b[a]) for a in MULTI_ARMS) else min(b[a] for a in MULTI_ARMS)
    single = nan if math.isnan(best) or math.isnan(b["same_kl"]) else min(b["same_kl"], best)
    return {
        "recovery": recovery,
        "best_cross_minus_uld_bpb": best - b["uld"],
        "best_cross_minus_gold_bpb": best - b["gold"],
        "multi_minus_best_single_bpb": multi - single,
        "pkl_minus_public_pkl_bpb": b["pkl"] - b["public_pkl"],
        "cache_minus_full_bpb": b["pkl"] - b["pkl_full"],
    }


def targets(values: Mapping[str, float]) -> list[tuple[str, bool | None]]:
    """The issue's targets, each (statement, met?; None: not measurable)."""
    def check(v, ok):
        return None if math.isnan(v) else bool(ok(v))

    return [
        ("the best cross-tokenizer loss recovers >= 80% of same-vocab KD's BPB gain over CE only",
         check(values["recovery"], lambda v: v >= 0.8)),
        ("the best cross-tokenizer loss beats ULD (lower BPB)",
         check(values["best_cross_minus_uld_bpb"], lambda v: v < 0)),
        ("the best cross-tokenizer loss beats the GOLD hybrid",
         check(values["best_cross_minus_gold_bpb"], lambda v: v < 0)),
        ("two teachers are at least as good as the best single teacher",
         check(values["multi_minus_best_single_bpb"], lambda v: v <= 0)),
    ]


def _fmt(v: float, digits: int) -> str:
    return "nan" if math.isnan(v) else f"{v:.{digits}f}"


def result_line(values: Mapping[str, float]) -> str:
    """`RESULT recovery=<r> best_cross_minus_uld_bpb=<d> ...` (recovery 3 decimals, differences 4)."""
    return "RESULT " + " ".join(f"{k}={_fmt(values[k], 3 if k == 'recovery' else 4)}" for k in KEYS)
