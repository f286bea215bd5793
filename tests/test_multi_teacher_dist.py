"""Multi-teacher KD under data parallelism: two `gloo` processes (CPU) holding different halves of a
real batch (llama3 student, qwen3 P-KL teacher with a small top-k column set, llama3 same-vocab
teacher). The ranks must agree on scores, weights and the selected teacher, and their losses and
gradients must add up to the single-process computation on the whole batch, because scores,
normalizers and the P-KL's column set are all reduced over the group.

The halves are built so that a rank deciding alone would choose differently: on rank 1's half the
same-vocab teacher is the better one, on the whole batch the cross-tokenizer teacher is.
"""

from __future__ import annotations

import datetime
import math

import torch
import torch.multiprocessing as mp

from tests.test_multi_teacher import problem_logits, real_problem
from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig, MultiTeacherLoss
from xtoken_loss.multi_teacher.teachers import TeacherSpec
from xtoken_loss.projection import Projection

WORLD = 2
BONUS_QWEN = (6.0, 6.0, 0.0, 0.5)
BONUS_LLAMA = (0.0, 0.0, 2.5, 2.5)
CASES = {
    "sum_static": dict(config=dict(mode="sum"), weights=(0.8, 0.2)),
    "sum_dynamic_bpb": dict(config=dict(mode="sum", weighting="dynamic", score="bpb", alpha=3.0)),
    "sum_dynamic_ce": dict(config=dict(mode="sum", weighting="dynamic", score="ce")),
    "select_ce": dict(config=dict(mode="select_teacher", score="ce")),
    "select_bpb_per_sequence": dict(config=dict(mode="select_teacher", score="bpb", per_sequence=True)),
}


def make_teachers(data, weights=(1.0, 1.0)):
    proj = Projection.from_tensors(data["proj_indices"], data["proj_weights"], teacher_width=data["V_t"])
    return [
        TeacherSpec(name="qwen3", loss="pkl", weight=weights[0], projection=proj,
                    loss_options={"top_k_columns": 16}),
        TeacherSpec(name="llama3", loss="kl", weight=weights[1]),
    ]


def run_cases(data, rows, process_group):
    """Every case on the batch rows `rows`; returns {case: (loss, grad, metrics)}."""
    batch = {k: v[rows] for k, v in data["batch"].items()}
    zs, z0, z1 = data["zs"][rows], data["z0"][rows], data["z1"][rows]
    out = {}
    for name, case in CASES.items():
        mt = MultiTeacherLoss(make_teachers(data, case.get("weights", (1.0, 1.0))),
                              MultiTeacherConfig(**case["config"]), process_group=process_group)
        x = zs.clone().requires_grad_()
        loss, metrics = mt(x, [z0, z1], batch, normalizer="global")
        loss.backward()
        out[name] = (loss.detach(), x.grad.clone(), {k: v.detach().clone() for k, v in metrics.items()})
    return out


def _worker(rank, tmpdir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmpdir}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        data = torch.load(f"{tmpdir}/problem.pt", weights_only=False)
        half = data["zs"].shape[0] // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        torch.save(run_cases(data, rows, "auto"), f"{tmpdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_and_equal_the_whole_batch(tmp_path):
    batch, proj, Vs, Vt, _ = real_problem()
    zs, z0, z1 = problem_logits(bonus0=BONUS_QWEN, bonus1=BONUS_LLAMA)
    data = {"batch": batch, "zs": zs, "z0": z0, "z1": z1, "proj_indices": proj.indices,
            "proj_weights": proj.weights, "V_t": Vt}
    torch.save(data, tmp_path / "problem.pt")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    whole = run_cases(data, slice(None), None)

    # A rank deciding alone would pick the other teacher on its half (so the reduction matters).
    rows1 = slice(2, 4)
    alone = MultiTeacherLoss(make_teachers(data), MultiTeacherConfig(mode="select_teacher", score="ce"),
                             process_group=None)
    _, m_alone = alone(zs[rows1], [z0[rows1], z1[rows1]], {k: v[rows1] for k, v in batch.items()})
    assert float(m_alone["teacher_1/selected"]) == 1.0
    assert float(whole["select_ce"][2]["teacher_0/selected"]) == 1.0

    for name in CASES:
        loss_w, grad_w, m_w = whole[name]
        # ranks agree on every global quantity, and it is the whole batch's
        for key in m_w:
            if key.endswith(("/weight", "/selected", "/projection_accuracy")) or "/score_" in key:
                for r in range(WORLD):
                    got = ranks[r][name][2][key]
                    assert math.isclose(float(got), float(m_w[key]), rel_tol=1e-9, abs_tol=1e-12), (name, key, r)
        total = sum(float(ranks[r][name][0]) for r in range(WORLD))
        assert math.isclose(total, float(loss_w), rel_tol=1e-9, abs_tol=1e-12), name
        grad = torch.cat([ranks[r][name][1] for r in range(WORLD)])
        torch.testing.assert_close(grad, grad_w, rtol=1e-7, atol=1e-12)
