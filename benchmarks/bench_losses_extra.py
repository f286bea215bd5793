"""Forward + backward time of the issue-6 losses (H-KL, GOLD, ULD, ALM) beside P-KL on CPU, same shapes
as `bench_losses.py`: 1024 student positions of real text (llama3 student, qwen3 teacher, aligned by the
collator), V_s = 128,256, V_t = 151,936 (Qwen3's model width), P-KL on the batch's top 8192 teacher
columns, the real rule-based projection (top_k 4). The problem (text, W, random logits with the
teacher leaning towards the tokens that follow) is built by `bench_losses.py`'s own helpers.

Each loss runs in the principled (default) form, and the hybrids/ULD also in the public form. Times are
the best of `--repeats` interleaved rounds (default 2), each a fresh forward + backward, after one
untimed P-KL run (first-touch allocation and thread-pool start-up would otherwise land on the first
case).
Ends with `RESULT hkl_vs_pkl=<x> gold_vs_pkl=<x> uld_vs_pkl=<x> alm_vs_pkl=<x>` (time ratios of the
principled forms to principled P-KL).
Run: `python benchmarks/bench_losses_extra.py [--positions N] [--repeats R] [--principled-only]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

TOP_K_COLUMNS = 8192


def setup(positions: int):
    """(batch, student logits, teacher logits, Projection, exact map): `bench_losses.py`'s problem
    (its `build_problem` / `load_problem`: same text, shapes, W and logits) plus the exact-match map
    GOLD needs, from the real artifact's `row_kind`."""
    import tempfile

    import bench_losses
    from reference_losses import real_tokenizers
    from xtoken_align.projection.artifacts import ROW_EXACT

    path = Path(tempfile.mkdtemp(prefix="bench_losses_extra-")) / "problem.pt"
    bench_losses.build_problem(positions, path)
    batch, proj, zs, zt = bench_losses.load_problem(path)
    fwd = real_tokenizers()[2]
    exact = torch.as_tensor(fwd.row_kind).to(torch.int64) == ROW_EXACT
    ex = torch.where(exact, torch.as_tensor(fwd.indices)[:, 0], -1)
    return batch, zs, zt, proj, ex


def timed(fn, zs, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        x = zs.detach().requires_grad_()
        t0 = time.perf_counter()
        loss, _ = fn(x)
        loss.backward()
        best = min(best, time.perf_counter() - t0)
        del x, loss
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--principled-only", action="store_true", help="skip the public forms")
    args = ap.parse_args()

    from xtoken_loss.losses.alm import alm_loss
    from xtoken_loss.losses.hybrid import CommonSet, common_by_threshold, gold_loss, hkl_loss
    from xtoken_loss.losses.pkl import pkl_loss
    from xtoken_loss.losses.uld import uld_loss

    torch.manual_seed(0)
    t0 = time.perf_counter()
    batch, zs, zt, proj, ex = setup(args.positions)
    hkl_common = common_by_threshold(proj, 0.6)
    gold_common = CommonSet.from_map(ex, method="exact")
    print(f"setup {time.perf_counter() - t0:.1f} s; student {tuple(zs.shape)}, teacher {tuple(zt.shape)}; "
          f"H-KL common pairs {hkl_common.size}, GOLD common pairs {gold_common.size}; {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cases = [
        ("pkl", "principled", lambda x: pkl_loss(x, zt, batch, projection=proj, top_k_columns=TOP_K_COLUMNS)),
        ("hkl", "principled", lambda x: hkl_loss(x, zt, batch, common=hkl_common)),
        ("gold", "principled", lambda x: gold_loss(x, zt, batch, common=gold_common)),
        ("uld", "principled", lambda x: uld_loss(x, zt, batch)),
        ("alm", "principled", lambda x: alm_loss(x, zt, batch)),
        ("pkl", "public", lambda x: pkl_loss(x, zt, batch, projection=proj, top_k_columns=TOP_K_COLUMNS, public=True)),
        ("hkl", "public", lambda x: hkl_loss(x, zt, batch, common=hkl_common, public=True)),
        ("gold", "public", lambda x: gold_loss(x, zt, batch, common=gold_common, public=True)),
        ("uld", "public", lambda x: uld_loss(x, zt, batch, public=True)),
    ]
    if args.principled_only:
        cases = [c for c in cases if c[1] == "principled"]
    timed(cases[0][2], zs, 1)  # warm-up
    # Interleaved rounds (every case once per round), best per case: on a shared machine the load
    # changes over minutes, and this keeps each ratio's two sides measured under similar load.
    times = {}
    for _ in range(args.repeats):
        for name, form, fn in cases:
            t = timed(fn, zs, 1)
            times[(name, form)] = min(t, times.get((name, form), float("inf")))
    print(f"{'loss':<6}{'form':<12}{'fwd+bwd s':>10}{'vs pkl':>8}")
    for name, form, _ in cases:
        t, base = times[(name, form)], times[("pkl", form)]
        print(f"{name:<6}{form:<12}{t:>10.2f}{t / base:>8.2f}")
    p = times[("pkl", "principled")]
    r = {k: times[(k, "principled")] / p for k in ("hkl", "gold", "uld", "alm")}
    print(f"RESULT hkl_vs_pkl={r['hkl']:.2f} gold_vs_pkl={r['gold']:.2f} uld_vs_pkl={r['uld']:.2f} "
          f"alm_vs_pkl={r['alm']:.2f}")


if __name__ == "__main__":
    main()
