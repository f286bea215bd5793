"""ALM (`xtoken_loss.losses.alm`) against the float64 reference on hand-built batches and on a restricted,
remapped real llama3 x qwen3 problem; full-logit and top-k (`target_logprob`) teacher inputs agree;
debiasing drops exactly the chunks whose end is an unlikely boundary; the loss is minimised when the
student's chunk likelihoods equal the teacher's; gradients."""

from __future__ import annotations

import pytest
import torch

from tests.reference_losses import is_close, random_logits, real_problem_with_exact_map, reference_alm, synthetic_batch
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.losses.alm import alm_loss, binary_divergence


def _shapes(batch):
    return batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]


def _topk(zt, batch, k):
    lp = torch.log_softmax(zt, dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    ids = batch["teacher_0_input_ids"]
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    return {"topk_logprobs": vals.to(torch.bfloat16).to(torch.float64), "topk_indices": idx,
            "target_logprob": lp.gather(-1, nxt[..., None]).squeeze(-1)}


def _check(batch, zs, teacher, **opt):
    zs = zs.clone().requires_grad_()
    loss, metrics = alm_loss(zs, teacher, batch, **opt)
    (loss * 0.6).backward()
    zr = zs.detach().clone().requires_grad_()
    keep = ("tau", "divergence", "debias_gamma", "teacher_boundary_tokens", "student_boundary_tokens", "normalizer")
    ref, count = reference_alm(zr, teacher, batch, **{k: v for k, v in opt.items() if k in keep})
    (ref * 0.6).backward()
    assert is_close(loss, ref), (float(loss), float(ref))
    assert torch.allclose(zs.grad, zr.grad, atol=1e-6, rtol=1e-6), (zs.grad - zr.grad).abs().max()
    return loss, metrics, count


@pytest.mark.parametrize("divergence", ["bce", "kl"])
@pytest.mark.parametrize("seed", [0, 1])
def test_alm_matches_reference_synthetic(seed, divergence):
    batch = synthetic_batch(seed)
    Ls, Lt = _shapes(batch)
    zs, zt = random_logits(seed + 3, (3, Ls, 40)), random_logits(seed + 4, (3, Lt, 50))
    _check(batch, zs, zt, divergence=divergence, tau=1.0 if seed else 100.0, position_chunk_size=2)


def test_alm_matches_reference_real_vocab_with_debiasing():
    batch, _idx, _w, _ex, Vs, Vt = real_problem_with_exact_map()
    Ls, Lt = _shapes(batch)
    zs, zt = random_logits(5, (3, Ls, Vs), scale=1.0), random_logits(6, (3, Lt, Vt), scale=1.0)
    g = torch.Generator().manual_seed(0)
    tb = torch.rand(Vt, generator=g) < 0.25
    sb = torch.rand(Vs, generator=g) < 0.25
    _, m0, c0 = _check(batch, zs, zt, tau=10.0)
    _, m1, c1 = _check(batch, zs, zt, tau=10.0, debias_gamma=0.25, teacher_boundary_tokens=tb,
                       student_boundary_tokens=torch.nonzero(sb).squeeze(1), normalizer=5.0)
    assert 0 < c1 < c0 and is_close(m1["kept_fraction"], c1 / c0)
    # top-k teacher inputs: the same loss without debiasing; with it, the reference's top-k reading
    top = _topk(zt, batch, 40)
    l_full = alm_loss(zs, zt, batch, tau=10.0)[0]
    assert is_close(alm_loss(zs, top, batch, tau=10.0)[0], l_full, 1e-9)
    _check(batch, zs, top, tau=10.0, debias_gamma=0.1, teacher_boundary_tokens=tb)


def test_alm_minimised_at_equal_chunk_likelihoods():
    # per chunk: the divergence, as a function of l_s, is smallest (and stationary) at l_s = l_t
    l_t = torch.tensor([-0.5, -3.0, -40.0, -300.0], dtype=torch.float64)
    for div in ("bce", "kl"):
        for tau in (1.0, 100.0):
            at = binary_divergence(l_t, l_t.clone(), tau, div)
            for d in (-1.0, -0.1, 0.1, 1.0):
                assert torch.all(binary_divergence(l_t, (l_t + d).clamp(max=0), tau, div) > at)
            ls = l_t.clone().requires_grad_()
            binary_divergence(l_t, ls, tau, div).sum().backward()
            assert ls.grad.abs().max() < 1e-9
    # whole loss: a teacher with the student's own tokenizer and logits (1:1 chunks) -> zero gradient,
    # KL form 0, and any perturbation of the student increases it
    lengths, L, V = (10, 7), 10, 64
    ids = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(3))
    tm = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    cid = torch.where(tm, torch.arange(L)[None, :].expand(2, L), -1)
    batch = {"input_ids": ids, "token_mask": tm, "teacher_0_input_ids": ids, "teacher_0_token_mask": tm,
             "alignment_0_student_chunk_id": cid, "alignment_0_teacher_chunk_id": cid,
             "alignment_0_pair_valid": tm, "alignment_0_pair_is_correct": tm}
    zs = random_logits(1, (2, L, V))
    z = zs.clone().requires_grad_()
    loss, _ = alm_loss(z, zs, batch, divergence="kl", tau=2.0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-12 and z.grad.abs().max() < 1e-12
    base = alm_loss(zs, zs, batch, tau=2.0)[0]
    for s in range(3):
        assert float(alm_loss(zs + 0.5 * random_logits(s + 9, zs.shape), zs, batch, tau=2.0)[0]) > float(base)


def test_alm_gradcheck_errors_and_masking():
    batch = synthetic_batch(2, batch_size=2, num_chunks=(3, 4), vocab_s=6, vocab_t=7)
    Ls, Lt = _shapes(batch)
    zs = random_logits(3, (2, Ls, 6)).requires_grad_()
    zt = random_logits(4, (2, Lt, 7))
    assert torch.autograd.gradcheck(lambda z: alm_loss(z, zt, batch, tau=3.0)[0], (zs,))
    assert torch.autograd.gradcheck(
        lambda z: alm_loss(z, zt, batch, tau=3.0, divergence="kl", debias_gamma=0.2,
                           student_boundary_tokens=[0, 2], teacher_boundary_tokens=[1, 3])[0], (zs,))
    with pytest.raises(LossOptionError, match="divergence"):
        alm_loss(zs, zt, batch, divergence="js")
    with pytest.raises(LossOptionError, match="boundary_tokens"):
        alm_loss(zs, zt, batch, debias_gamma=0.1)
    with pytest.raises(LossInputError, match="target_logprob"):
        alm_loss(zs, {"topk_logprobs": zt[..., :2]}, batch)
    with pytest.raises(LossInputError, match="outside"):
        alm_loss(zs, zt, batch, debias_gamma=0.1, student_boundary_tokens=[6])
    masked = dict(batch, sample_mask=torch.zeros_like(batch["sample_mask"]))
    zs.grad = None
    loss, _ = alm_loss(zs, zt, masked)
    loss.backward()
    assert float(loss.detach()) == 0 and torch.count_nonzero(zs.grad) == 0
    l32 = alm_loss(zs.detach().float(), zt.float(), batch, tau=3.0)[0]
    l16 = alm_loss(zs.detach().bfloat16(), zt.bfloat16(), batch, tau=3.0)[0]
    assert torch.isfinite(l16) and abs(float(l16) - float(l32)) < 0.05 * max(1.0, abs(float(l32)))
