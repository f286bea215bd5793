"""The learned projection (`xtoken_loss.losses.learned_pkl`): starts at the artifact's W, its P-KL
matches the shared float64 P-KL reference and `pkl_loss` on the current W (hand-built and restricted
real llama3 x qwen3 problems), the gradient for W matches finite differences, rows stay stochastic
after optimiser steps, and it saves back to an artifact with provenance."""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference_losses import (
    dense_projection,
    is_close,
    random_logits,
    random_projection,
    real_problem_with_exact_map,
    reference_pkl,
    synthetic_batch,
)
from xtoken_core.errors import ProjectionArtifactError
from xtoken_loss.losses.learned_pkl import LearnedPKLLoss, LearnedProjection, learned_pkl_loss
from xtoken_loss.losses.pkl import pkl_loss
from xtoken_loss.projection import Projection, load_projection


def _shapes(batch):
    return batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]


def _perturbed(idx, w, seed=0, scale=0.7):
    lp = LearnedProjection((idx, w))
    with torch.no_grad():
        lp.theta.add_(scale * torch.randn(lp.theta.shape, generator=torch.Generator().manual_seed(seed)))
    return lp


def test_starts_at_the_artifact_weights():
    idx, w = random_projection(0, 40, 50)
    lp = LearnedProjection((idx, w))
    assert torch.allclose(lp.weights(), w, atol=1e-7)
    assert torch.equal(lp.to_projection().indices, torch.where(w > 0, idx, -1))


@pytest.mark.parametrize("top_k", [None, 7])
def test_learned_pkl_matches_reference_and_pkl_loss(top_k):
    batch = synthetic_batch(1)
    Ls, Lt = _shapes(batch)
    idx, w = random_projection(1, 40, 50)
    lp = _perturbed(idx, w).double()
    zs, zt = random_logits(2, (3, Ls, 40)), random_logits(3, (3, Lt, 50))
    z = zs.clone().requires_grad_()
    loss, m = learned_pkl_loss(z, zt, batch, projection=lp, temperature=1.5, top_k_columns=top_k,
                               position_chunk_size=3)
    (loss * 0.8).backward()
    W = dense_projection(lp.indices, lp.weights().detach(), 40, 50)
    zr = zs.clone().requires_grad_()
    ref, _, _ = reference_pkl(zr, zt, batch, W, temperature=1.5, top_k_columns=top_k)
    (ref * 0.8).backward()
    assert is_close(loss, ref), (float(loss), float(ref))
    assert torch.allclose(z.grad, zr.grad, atol=1e-6, rtol=1e-6)
    fixed, _ = pkl_loss(zs, zt, batch, projection=lp.to_projection(), temperature=1.5, top_k_columns=top_k)
    assert is_close(fixed, loss, 1e-5)


def test_learned_pkl_real_vocab_matches_reference():
    batch, idx, w, _ex, Vs, Vt = real_problem_with_exact_map()
    Ls, Lt = _shapes(batch)
    lp = _perturbed(idx, w, 4).double()
    zs, zt = random_logits(5, (3, Ls, Vs)), random_logits(6, (3, Lt, Vt))
    loss, _ = learned_pkl_loss(zs, zt, batch, projection=lp, top_k_columns=64)
    ref, count, _ = reference_pkl(zs, zt, batch, dense_projection(lp.indices, lp.weights().detach(), Vs, Vt),
                                  top_k_columns=64)
    assert count > 50 and is_close(loss, ref)


def test_weight_gradient_matches_finite_differences():
    batch = synthetic_batch(2, batch_size=2, num_chunks=(3, 5), vocab_s=8, vocab_t=9)
    Ls, Lt = _shapes(batch)
    idx, w = random_projection(2, 8, 9, top_k=3, empty_rows=1, unreachable=1)
    lp = _perturbed(idx, w, 1).double()
    zs, zt = random_logits(7, (2, Ls, 8)).requires_grad_(), random_logits(8, (2, Lt, 9))

    def f():
        return learned_pkl_loss(zs, zt, batch, projection=lp, temperature=1.3, top_k_columns=5)[0]

    lp.zero_grad()
    (f() * 1.9).backward()
    g = lp.theta.grad.clone()
    h = 1e-6
    num = torch.zeros_like(g)
    with torch.no_grad():
        for r, k in lp.slot_mask.nonzero().tolist():
            lp.theta[r, k] += h
            up = f()
            lp.theta[r, k] -= 2 * h
            down = f()
            lp.theta[r, k] += h
            num[r, k] = 1.9 * (up - down) / (2 * h)
    assert torch.allclose(g, num, atol=1e-6, rtol=1e-5), (g - num).abs().max()
    assert torch.count_nonzero(g[~lp.slot_mask]) == 0
    assert torch.autograd.gradcheck(
        lambda z: learned_pkl_loss(z, zt, batch, projection=lp, temperature=1.3, top_k_columns=5)[0], (zs,))


def test_rows_stay_stochastic_under_training():
    batch = synthetic_batch(3)
    Ls, Lt = _shapes(batch)
    idx, w = random_projection(3, 40, 50)
    module = LearnedPKLLoss((idx, w), top_k_columns=None)
    opt = torch.optim.Adam(module.parameters(), lr=0.3)
    zs, zt = random_logits(4, (3, Ls, 40)), random_logits(5, (3, Lt, 50))
    first = None
    for _ in range(8):
        opt.zero_grad()
        loss, _ = module(zs, zt, batch)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    W = module.projection.weights().detach()
    mapped = module.projection.slot_mask.any(dim=1)
    assert torch.allclose(W[mapped].sum(dim=1), torch.ones(int(mapped.sum())), atol=1e-6)
    assert bool((W >= 0).all()) and bool((W[~module.projection.slot_mask] == 0).all())
    assert float(module(zs, zt, batch)[0].detach()) < first
    assert not torch.allclose(W, w, atol=1e-3)


def test_save_round_trip_with_provenance(tmp_path):
    from safetensors.torch import save_file

    idx, w = random_projection(6, 40, 50)
    meta = {"schema_version": 1, "kind": "projection", "direction": "student_to_teacher", "top_k": 4,
            "student": {"name": "s", "fingerprint": "sha256:aa", "vocab_size": 40, "model_vocab_size": 40},
            "teacher": {"name": "t", "fingerprint": "sha256:bb", "vocab_size": 50, "model_vocab_size": 50},
            "method": {"name": "xtoken_rule_based", "params": {"reverse": True}}, "stats": {"rows": 40},
            "created_with": "xtoken 0.1.0"}
    parent = tmp_path / "parent"
    parent.mkdir()
    row_kind = torch.randint(0, 4, (40,), dtype=torch.uint8)
    save_file({"indices": idx, "weights": w, "row_kind": row_kind}, str(parent / "projection.safetensors"))
    (parent / "projection.json").write_text(json.dumps(meta))
    lp = LearnedProjection.from_artifact(parent, student_fingerprint="sha256:aa")
    with torch.no_grad():
        lp.theta.add_(torch.randn(lp.theta.shape, generator=torch.Generator().manual_seed(0)))
    out = lp.save(tmp_path / "learned", params={"steps": 8, "lr": 0.3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned", "parent"]  # no temporary left behind
    back = load_projection(out, student_fingerprint="sha256:aa", teacher_fingerprint="sha256:bb")
    assert torch.allclose(back.dense(40, 50), lp.to_projection().dense(40, 50), atol=1e-7)
    assert bool((back.weights[:, :-1] >= back.weights[:, 1:]).all())  # slots by descending weight
    got = json.loads((out / "projection.json").read_text())
    assert got["method"]["name"] == "learned" and got["method"]["params"]["steps"] == 8
    assert got["parent"]["method"] == meta["method"] and got["parent"]["stats"] == meta["stats"]
    assert got["student"] == meta["student"] and got["teacher"] == meta["teacher"]
    again = LearnedProjection.from_artifact(out)
    assert torch.equal(again.row_kind, row_kind)
    assert torch.allclose(again.weights(), back.weights, atol=1e-6)
    with pytest.raises(ProjectionArtifactError, match="overwrite"):
        lp.save(out)
    lp.save(out, overwrite=True)
    assert isinstance(load_projection(out), Projection)


def test_save_writes_the_shared_format(tmp_path):
    """`save` goes through the artifact format's writer: the same tensors, dtypes and JSON keys as the
    builder's artifacts, readable by both readers (`load_projection` and `read_projection`)."""
    from safetensors.numpy import load_file

    from xtoken_align.projection.artifacts import read_projection

    idx, w = random_projection(8, 30, 35)
    row_kind = torch.randint(0, 4, (30,), dtype=torch.uint8)
    lp = LearnedProjection(Projection.from_tensors(idx, w, teacher_width=35, row_kind=row_kind))
    assert torch.equal(lp.row_kind, row_kind)  # picked up from the Projection
    out = lp.save(tmp_path / "learned", params={"steps": 0})
    tensors = load_file(str(out / "projection.safetensors"))
    assert {k: str(v.dtype) for k, v in tensors.items()} == {"indices": "int64", "weights": "float32",
                                                             "row_kind": "uint8"}
    assert tensors["row_kind"].tolist() == row_kind.tolist()
    meta = json.loads((out / "projection.json").read_text())
    assert set(meta) == {"schema_version", "kind", "direction", "top_k", "student", "teacher", "method", "parent",
                         "stats", "created_with", "tensors_sha256"}
    assert (meta["schema_version"], meta["kind"], meta["direction"]) == (1, "projection", "student_to_teacher")
    assert meta["method"]["name"] == "learned" and meta["top_k"] == 4
    art = read_projection(out)
    assert art.row_kind.tolist() == row_kind.tolist()
    torch.testing.assert_close(torch.as_tensor(art.weights), load_projection(out).weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learned"]
