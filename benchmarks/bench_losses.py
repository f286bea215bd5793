"""Forward + backward time and memory of the xtoken losses at a realistic shape, against peers.

Shape (issue 5): 1024 student positions of real held-out text, llama3 student (V_s =
128,256) and qwen3 teacher (V_t = 151,936 model logits) aligned by the collator, the projection
builder's real W (top_k 4), teacher top-k 8192. Logits are random (no model), with the teacher
leaning towards the tokens that actually follow.

Measured in one run (best of `--reps` after one warm-up; each forward + backward from fresh leaf
logits):
- xtoken P-KL (principled default, and `public=True`);
- xtoken H-KL, GOLD hybrid, ULD and ALM (principled forms), and H-KL, GOLD and ULD in their public
  forms too (`--principled-only` skips those three); the table gives each time against P-KL in the
  same form;
- xtoken same-vocab KL against per-position teacher top-k 8192 (same student logits shape);
- `torch.nn.functional.cross_entropy` on the same student logits: the floor (any loss reads the
  logits and writes their gradient);
- a straightforward `torch.sparse.mm` P-KL (the public approach: dense softmax, sparse W over the
  batch's top-k teacher columns, autograd);
- TRL's `ULDLoss` (GOLD, extended ULD with byte-offset alignment, the same text): slow, so it is timed
  once on `--trl-positions` student positions (default 384, the nearer to 1024 the less linear scaling
  understates it) and scaled linearly to 1024, as the output says. Its
  backward grows about quadratically with length (measured here, 1 thread: 0.9 s at 48 positions,
  6.2 s at 96, 27.5 s at 192: every merged group's in-place copy into a [groups, V] tensor is an
  autograd node that handles the whole tensor), so linear scaling understates it.
Memory: peak resident memory a loss adds during forward + backward beyond its inputs and the logits'
gradient, each loss in a fresh subprocess (Linux: VmHWM reset through /proc/self/clear_refs), divided
by the student logits' size.

    python -m benchmarks.bench_losses            # from the repository root; ends with the RESULT line

It imports the float64 references' problem builders from the `tests` package, so it runs as a module
of the `benchmarks` package (run by path, it stops with a message saying so).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run it from the repository root as a module: python -m benchmarks.bench_losses [options]")

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from xtoken_loss import Projection, alm_loss, ce_loss, gold_loss, hkl_loss, kl_loss, pkl_loss, uld_loss  # noqa: E402
from xtoken_loss.losses.hybrid import CommonSet, common_by_threshold  # noqa: E402
from xtoken_loss.units import chunk_units  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the repository root: the memory child runs there
VS, VT, TOPK = 128256, 151936, 8192


# --------------------------------------------------------------------------------------------
# inputs


def build_problem(positions: int, path: Path) -> None:
    """Align real text (one sample cut at `positions` student tokens) and save batch + W."""
    from tests.reference_losses import heldout_texts, real_tokenizers
    from xtoken_align.batch.collate import collate

    s_tok, t_tok, forward = real_tokenizers()
    text = "\n\n".join(heldout_texts(40, 2000))
    batch = dict(collate([text], s_tok, [t_tok], max_length=positions))
    torch.save({"batch": batch, "indices": torch.as_tensor(forward.indices),
                "weights": torch.as_tensor(forward.weights),
                "row_kind": torch.as_tensor(forward.row_kind).to(torch.int64)}, path)


def common_sets(path: Path, proj):
    """(H-KL common set: top W weight >= 0.6, GOLD common set: exact byte matches from the
    artifact's `row_kind`) for the problem saved at `path`."""
    from xtoken_core.artifact_format import ROW_EXACT

    data = torch.load(path)
    exact = torch.where(data["row_kind"] == ROW_EXACT, data["indices"][:, 0], -1)
    return common_by_threshold(proj, 0.6), CommonSet.from_map(exact)


def load_problem(path: Path, seed: int = 0):
    data = torch.load(path)
    batch = data["batch"]
    proj = Projection.from_tensors(data["indices"], data["weights"], teacher_width=VT)
    g = torch.Generator().manual_seed(seed)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = torch.randn(B, Ls, VS, generator=g) * 2
    zt = torch.randn(B, Lt, VT, generator=g) * 2
    nxt = batch["teacher_0_input_ids"][:, 1:]
    zt[:, :-1].scatter_add_(2, nxt[..., None], torch.full(nxt.shape + (1,), 8.0))
    return batch, proj, zs, zt


def same_vocab_teacher(batch, seed: int = 1):
    """Per-position teacher top-k 8192 log-probs over the student vocabulary."""
    g = torch.Generator().manual_seed(seed)
    B, L = batch["input_ids"].shape
    z = torch.randn(B, L, VS, generator=g) * 2
    nxt = batch["input_ids"][:, 1:]
    z[:, :-1].scatter_add_(2, nxt[..., None], torch.full(nxt.shape + (1,), 8.0))
    out = {"topk_logprobs": [], "topk_indices": []}
    for b in range(B):  # row by row keeps the peak low
        lp = torch.log_softmax(z[b], dim=-1)
        top = lp.topk(TOPK, dim=-1)
        out["topk_logprobs"].append(top.values)
        out["topk_indices"].append(top.indices)
    return {k: torch.stack(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# peers


def sparse_mm_pkl(zs, zt, batch, proj, temperature=1.0, top_k=TOPK, eps=1e-10):
    """A straightforward public-style P-KL: top-k teacher columns by max logit, dense student
    softmax, `torch.sparse.mm` with W restricted to those columns, chunk means, autograd."""
    B, Ls, Vs = zs.shape
    Lt, Vt = zt.shape[1], zt.shape[2]
    cols = zt.reshape(-1, Vt).amax(dim=0).topk(top_k).indices
    col_of = torch.full((Vt,), -1, dtype=torch.int64)
    col_of[cols] = torch.arange(top_k)
    idx, w = proj.indices, proj.weights
    slot = torch.where(idx >= 0, col_of[idx.clamp(min=0)], -1)
    keep = slot >= 0
    rows = keep.nonzero()[:, 0]
    w_t = torch.sparse_coo_tensor(torch.stack([slot[keep], rows]), w[keep], (top_k, Vs),
                                  check_invariants=False).coalesce()  # [k, V_s]
    u = chunk_units(batch, 0, B, Ls, Lt, mode="mean")
    p = torch.softmax(zs.reshape(-1, Vs)[u.student_rows] / temperature, dim=-1)  # [N, V_s]
    q = torch.sparse.mm(w_t, p.t()).t()  # [N, k]
    U = u.student_count.shape[0]
    qc = torch.zeros(U, top_k).index_add(0, u.student_unit, q)
    qc = qc / qc.sum(dim=1, keepdim=True)
    lt = torch.log_softmax(zt.reshape(-1, Vt)[u.teacher_rows][:, cols] / temperature, dim=-1)
    lc = torch.zeros(U, top_k).index_add(0, u.teacher_unit, lt) / u.teacher_count[:, None]
    kl = (lc.exp() * (lc - torch.log(qc.clamp_min(eps)))).sum()
    return kl * temperature**2 / max(U, 1)


def trl_uld_setup(batch, zs, zt, positions):
    """TRL's ULDLoss on the first `positions` student tokens and the teacher tokens of the same bytes."""
    from types import SimpleNamespace

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gold.gold_trainer import ULDLoss

    cfg = SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
        use_extended_uld=True, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False, beta=1.0,
    )
    loss = ULDLoss(cfg)
    sb = batch["token_bytes"][0].long()
    tb = batch["teacher_0_token_bytes"][0].long()
    s_end = torch.cumsum(sb, 0)
    t_end = torch.cumsum(tb, 0)
    n_s = positions
    cut = int(s_end[n_s - 1])
    n_t = int((t_end <= cut).sum())
    s_off = torch.stack([s_end - sb, s_end], dim=1)[:n_s][None]
    t_off = [torch.stack([t_end - tb, t_end], dim=1)[:n_t].tolist()]
    s_ids = batch["input_ids"][:, :n_s]
    t_ids = batch["teacher_0_input_ids"][:, :n_t]
    zt_cut = zt[:, :n_t].contiguous()
    # teacher offsets are read with tensor slicing too
    t_off_t = torch.tensor(t_off)

    def run(x):
        return loss(x, zt_cut, s_ids, t_ids, s_ids, t_ids, student_byte_offsets=s_off, teacher_byte_offsets=t_off_t)

    return run, zs[:, :n_s].contiguous(), n_s


# --------------------------------------------------------------------------------------------
# measurement


def timed(fn, x, reps, warmup=True):
    """Best forward + backward time over `reps` runs after one warm-up, fresh leaf each time."""
    best = float("inf")
    for i in range(reps + int(warmup)):
        leaf = x.detach().clone().requires_grad_()
        t0 = time.perf_counter()
        loss = fn(leaf)
        loss.backward()
        dt = time.perf_counter() - t0
        if i >= int(warmup):
            best = min(best, dt)
        del leaf, loss
    return best


# The public forms of the hybrids and ULD (`public=True`), timed when not `--principled-only`;
# each is compared with the public P-KL.
PUBLIC_EXTRA = ("hkl_public", "gold_public", "uld_public")


def losses(batch, proj, zs, zt, same, commons):
    ids = batch["input_ids"]
    tgt = torch.full_like(ids, -100)
    tgt[:, :-1] = torch.where(batch["token_mask"][:, 1:] & batch["token_mask"][:, :-1], ids[:, 1:], -100)
    return {
        "cross_entropy": lambda x: F.cross_entropy(x.reshape(-1, VS), tgt.reshape(-1), ignore_index=-100),
        "xtoken_ce": lambda x: ce_loss(x, None, batch)[0],
        "pkl": lambda x: pkl_loss(x, zt, batch, projection=proj, top_k_columns=TOPK)[0],
        "pkl_public": lambda x: pkl_loss(x, zt, batch, projection=proj, top_k_columns=TOPK, public=True)[0],
        "samevocab_topk_kl": lambda x: kl_loss(x, same, batch)[0],
        "torch_sparse_pkl": lambda x: sparse_mm_pkl(x, zt, batch, proj),
        "hkl": lambda x: hkl_loss(x, zt, batch, common=commons[0])[0],
        "gold": lambda x: gold_loss(x, zt, batch, common=commons[1])[0],
        "uld": lambda x: uld_loss(x, zt, batch)[0],
        "alm": lambda x: alm_loss(x, zt, batch)[0],
        "hkl_public": lambda x: hkl_loss(x, zt, batch, common=commons[0], public=True)[0],
        "gold_public": lambda x: gold_loss(x, zt, batch, common=commons[1], public=True)[0],
        "uld_public": lambda x: uld_loss(x, zt, batch, public=True)[0],
    }


def _rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(problem: Path, name: str) -> None:
    batch, proj, zs, zt = load_problem(problem)
    same = same_vocab_teacher(batch) if name == "samevocab_topk_kl" else None
    fn = losses(batch, proj, zs, zt, same, common_sets(problem, proj))[name]
    leaf = zs.clone().requires_grad_()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _rss_kib("VmRSS")
    fn(leaf).backward()
    peak = _rss_kib("VmHWM")
    grad_bytes = leaf.grad.numel() * leaf.grad.element_size()
    print(json.dumps({"extra_bytes": peak * 1024 - base * 1024 - grad_bytes, "logits_bytes": grad_bytes}))


def memory(problem: Path, name: str):
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_losses", "--memory-child", name,
                          "--problem", str(problem)], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"  memory of {name} failed: {out.stderr.strip().splitlines()[-1:]}")
        return float("nan")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["extra_bytes"] / r["logits_bytes"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--trl-positions", type=int, default=384)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--principled-only", action="store_true",
                    help="skip the public forms of H-KL, GOLD and ULD (the public P-KL is always timed)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--problem", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(Path(args.problem), args.memory_child)
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench_losses-"))
    problem = tmp / "problem.pt"
    t0 = time.perf_counter()
    build_problem(args.positions, problem)
    batch, proj, zs, zt = load_problem(problem)
    same = same_vocab_teacher(batch)
    n_s = int(batch["token_mask"].sum())
    n_t = int(batch["teacher_0_token_mask"].sum())
    n_chunks = int(chunk_units(batch, 0, *batch["input_ids"].shape, zt.shape[1]).num_units)
    print(f"problem: {n_s} student / {n_t} teacher positions of real text, {n_chunks} P-KL chunk units, "
          f"V_s={VS}, V_t={VT}, teacher top-k {TOPK}, projection top_k {proj.top_k}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads (setup {time.perf_counter() - t0:.1f} s)")

    fns = losses(batch, proj, zs, zt, same, common_sets(problem, proj))
    if args.principled_only:
        fns = {name: fn for name, fn in fns.items() if name not in PUBLIC_EXTRA}
    times = {name: timed(fn, zs, args.reps) for name, fn in fns.items()}

    trl_note = ""
    if args.skip_trl:
        times["trl_uld"] = float("nan")
        trl_note = "skipped (--skip-trl)"
    else:
        try:
            run, zs_cut, n = trl_uld_setup(batch, zs, zt, args.trl_positions)
            t = timed(run, zs_cut, 1, warmup=False)
            times["trl_uld"] = t * n_s / n
            trl_note = (f"timed once on {n} positions ({t:.2f} s), scaled linearly to {n_s}; its backward grows "
                        "about quadratically with length, so this understates it")
        except Exception as exc:  # TRL absent or changed: report it, keep the rest
            times["trl_uld"] = float("nan")
            trl_note = f"could not run: {type(exc).__name__}: {exc}"

    mem = {name: memory(problem, name) for name in ("cross_entropy", "xtoken_ce", "pkl", "pkl_public",
                                                    "samevocab_topk_kl", "torch_sparse_pkl")}
    ce = times["cross_entropy"]
    pkl = times["pkl"]
    print(f"\n{'loss (forward + backward)':34s} {'time s':>9s} {'vs CE':>7s} {'vs P-KL':>8s} "
          f"{'extra mem / logits':>19s}")
    for name, t in times.items():
        m = mem.get(name, float("nan"))
        base = times["pkl_public"] if name.endswith("_public") else pkl  # P-KL in the same form
        note = f"  {trl_note}" if name == "trl_uld" else ""
        print(f"{name:34s} {t:9.3f} {t / ce:7.2f} {t / base:8.2f} {m:19.2f}{note}")
    print(f"\nlogits {zs.numel() * 4 / 2**20:.0f} MiB; times are the best of {args.reps} after a warm-up; "
          f"TRL's memory is not measured. Load average during the run: {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other processes inflate and scatter the times).")
    print(
        f"RESULT pkl_vs_ce={pkl / ce:.2f} samevocab_vs_ce={times['samevocab_topk_kl'] / ce:.2f} "
        f"torch_sparse_vs_pkl={times['torch_sparse_pkl'] / pkl:.2f} trl_uld_vs_pkl={times['trl_uld'] / pkl:.1f} "
        f"extra_mem_vs_logits={mem['pkl']:.2f} hkl_vs_pkl={times['hkl'] / pkl:.2f} "
        f"gold_vs_pkl={times['gold'] / pkl:.2f} uld_vs_pkl={times['uld'] / pkl:.2f} alm_vs_pkl={times['alm'] / pkl:.2f}"
    )


if __name__ == "__main__":
    main()
