"""Forward + backward time of the issue-6 losses (H-KL, GOLD, ULD, ALM) beside P-KL on CPU, same shapes
as `bench_losses.py`: 1024 student positions of real text (llama3 student, qwen3 teacher, aligned by the
collator), V_s = 128,256, V_t = 151,936 (Qwen3's model width), P-KL on the batch's top 8192 teacher
columns, the real rule-based projection (top_k 4).

Each loss runs in the principled (default) form, and the hybrids/ULD also in the public form. Times are
the best of `--repeats` runs (default 2), each a fresh forward + backward, after one untimed
P-KL run (first-touch allocation and thread-pool start-up would otherwise land on the first case). When
`bench_losses.py` provides the shared setup (`setup()` returning its batch and logits), it is used,
so both benchmarks time the same problem; otherwise the same shapes are built here.
Ends with `RESULT hkl_vs_pkl=<x> gold_vs_pkl=<x> uld_vs_pkl=<x> alm_vs_pkl=<x>` (time ratios of the
principled forms to principled P-KL).
Run: `python benchmarks/bench_losses_extra.py [--positions N] [--repeats R]`.
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

V_S, V_T = 128_256, 151_936
TOP_K_COLUMNS = 8192


def _own_setup(positions: int):
    """(batch, student_logits, teacher_logits, Projection, exact map) on real text."""
    import json

    from xtoken_align import load_tokenizer
    from xtoken_align.artifacts import ROW_EXACT
    from xtoken_align.collate import collate
    from xtoken_align.projection import ProjectionConfig, build_projection

    from xtoken_loss.projection import Projection

    s_tok, t_tok = load_tokenizer("llama3"), load_tokenizer("qwen3")
    fwd = build_projection(s_tok, t_tok, ProjectionConfig(teacher_model_vocab_size=V_T)).forward
    text = []
    with open(REPO / "data" / "corpus" / "heldout.jsonl", encoding="utf-8") as fh:
        for line in fh:
            text.append(json.loads(line)["text"])
            if sum(map(len, text)) > positions * 8:
                break
    batch = collate(["\n".join(text)], s_tok, [t_tok], max_length=positions)
    g = torch.Generator().manual_seed(0)
    Ls, Lt = batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]
    zs = torch.randn(1, Ls, V_S, generator=g) * 2.0
    zt = torch.randn(1, Lt, V_T, generator=g) * 2.0
    proj = Projection.from_tensors(torch.as_tensor(fwd.indices), torch.as_tensor(fwd.weights), teacher_width=V_T)
    exact = torch.as_tensor(fwd.row_kind).to(torch.int64) == ROW_EXACT
    ex = torch.where(exact, torch.as_tensor(fwd.indices)[:, 0], -1)
    return batch, zs, zt, proj, ex


def setup(positions: int):
    try:  # the shared setup of bench_losses.py, when it offers one
        import bench_losses  # noqa: F401

        shared = getattr(bench_losses, "setup", None)
    except ImportError:
        shared = None
    if shared is None:
        return _own_setup(positions)
    return shared(positions)


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
    args = ap.parse_args()

    from xtoken_loss.alm import alm_loss
    from xtoken_loss.hybrid import CommonSet, common_by_threshold, gold_loss, hkl_loss
    from xtoken_loss.pkl import pkl_loss
    from xtoken_loss.uld import uld_loss

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
    timed(cases[0][2], zs, 1)  # warm-up
    times = {}
    print(f"{'loss':<6}{'form':<12}{'fwd+bwd s':>10}{'vs pkl':>8}")
    for name, form, fn in cases:
        t = timed(fn, zs, args.repeats)
        times[(name, form)] = t
        base = times[("pkl", form)]
        print(f"{name:<6}{form:<12}{t:>10.2f}{t / base:>8.2f}", flush=True)
    p = times[("pkl", "principled")]
    r = {k: times[(k, "principled")] / p for k in ("hkl", "gold", "uld", "alm")}
    print(f"RESULT hkl_vs_pkl={r['hkl']:.2f} gold_vs_pkl={r['gold']:.2f} uld_vs_pkl={r['uld']:.2f} "
          f"alm_vs_pkl={r['alm']:.2f}")


if __name__ == "__main__":
    main()
