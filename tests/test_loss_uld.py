"""ULD (`xtoken_loss.losses.uld`) against the float64 dense reference, on hand-built batches and on a
restricted, remapped real llama3 x qwen3 problem; its properties (zero for identical sorted
distributions, invariance to padding and position-chunk size) and gradients."""

from __future__ import annotations

import pytest
import torch

from tests.reference_losses import is_close, random_logits, real_problem_with_exact_map, reference_uld, synthetic_batch
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.losses.uld import uld_loss


def _shapes(batch):
    return batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]


def _check(batch, zs, zt, **opt):
    zs = zs.clone().requires_grad_()
    loss, metrics = uld_loss(zs, zt, batch, **opt)
    g = torch.Generator().manual_seed(5)
    up = torch.rand((), generator=g, dtype=torch.float64) + 0.5  # upstream gradient other than 1
    (loss * up).backward()
    zr = zs.detach().clone().requires_grad_()
    ref_opt = {k: v for k, v in opt.items() if k in ("temperature", "tail_cut", "normalizer")}
    form = opt.get("chunk_form") or ("chain" if opt.get("public") else "start")
    ref, count = reference_uld(zr, zt, batch, form=form, **ref_opt)
    (ref * up).backward()
    assert is_close(loss, ref), (float(loss), float(ref))
    assert torch.allclose(zs.grad, zr.grad, atol=1e-6, rtol=1e-6)
    assert is_close(metrics["uld"] * max(count, 1), ref * (opt.get("normalizer") or max(count, 1)))
    return loss


@pytest.mark.parametrize("public", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_uld_matches_reference_synthetic(seed, public):
    batch = synthetic_batch(seed)
    Ls, Lt = _shapes(batch)
    zs = random_logits(seed + 10, (3, Ls, 40))
    zt = random_logits(seed + 20, (3, Lt, 50))
    _check(batch, zs, zt, public=public, temperature=1.7 if seed else 1.0, position_chunk_size=3)


@pytest.mark.parametrize("form", ["start", "chain", "mean_log"])
def test_uld_matches_reference_real_vocab(form):
    batch, _idx, _w, _ex, Vs, Vt = real_problem_with_exact_map()
    Ls, Lt = _shapes(batch)
    zs = random_logits(1, (3, Ls, Vs))
    zt = random_logits(2, (3, Lt, Vt))
    _check(batch, zs, zt, chunk_form=form, tail_cut=50 if form == "mean_log" else None, normalizer=7.0)


def test_uld_zero_for_identical_sorted_distributions():
    batch = synthetic_batch(3)
    Ls, Lt = _shapes(batch)
    zs = random_logits(4, (3, Ls, 40))
    # the teacher's logits: the student's at the aligned chunk start, permuted and padded with -inf
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    zt = torch.full((3, Lt, 50), float("-inf"), dtype=torch.float64)
    from tests.reference_losses import chunk_units

    for b, _c, sp, tp in chunk_units(batch, 0, Ls, Lt):
        zt[b, tp[0], :40] = zs[b, sp[0], perm]
    zt = torch.where(torch.isinf(zt) & (torch.arange(50) < 40), torch.zeros_like(zt), zt)
    loss, _ = uld_loss(zs, zt, batch)
    assert abs(float(loss)) < 1e-12
    assert float(uld_loss(zs, zt + 0.3 * random_logits(9, zt.shape), batch)[0]) > 1e-3


def test_uld_padding_and_chunk_size_invariance():
    batch = synthetic_batch(6, pad=0)
    Ls, Lt = _shapes(batch)
    zs, zt = random_logits(1, (3, Ls, 40)), random_logits(2, (3, Lt, 50))
    base = uld_loss(zs, zt, batch)[0]
    padded = {k: (torch.nn.functional.pad(v, (0, 4)) if v.dim() == 2 and k != "alignment_0_pair_valid"
                  and "pair" not in k else v) for k, v in batch.items()}
    for k in ("alignment_0_student_chunk_id", "alignment_0_teacher_chunk_id"):
        padded[k] = torch.nn.functional.pad(batch[k], (0, 4), value=-1)
    zs_p = torch.nn.functional.pad(zs, (0, 0, 0, 4), value=7.0)
    zt_p = torch.nn.functional.pad(zt, (0, 0, 0, 4), value=-7.0)
    assert is_close(uld_loss(zs_p, zt_p, padded)[0], base, 1e-12)
    for n in (1, 2, 100):
        assert is_close(uld_loss(zs, zt, batch, position_chunk_size=n)[0], base, 1e-12)


def test_uld_gradcheck_and_errors():
    batch = synthetic_batch(2, batch_size=2, num_chunks=(3, 4), vocab_s=6, vocab_t=7)
    Ls, Lt = _shapes(batch)
    zs = random_logits(3, (2, Ls, 6)).requires_grad_()
    zt = random_logits(4, (2, Lt, 7))
    assert torch.autograd.gradcheck(lambda z: uld_loss(z, zt, batch, chunk_form="chain")[0], (zs,))
    with pytest.raises(LossOptionError, match="chunk_form"):
        uld_loss(zs, zt, batch, chunk_form="avg")
    with pytest.raises(LossInputError, match="full logits"):
        uld_loss(zs, {"topk_logprobs": zt[..., :2], "topk_indices": torch.zeros_like(zt[..., :2]).long()}, batch)
    with pytest.raises(LossOptionError, match="tail_cut"):
        uld_loss(zs, zt, batch, tail_cut=0)


def test_uld_all_masked_and_bf16():
    batch = synthetic_batch(1)
    Ls, Lt = _shapes(batch)
    masked = dict(batch, sample_mask=torch.zeros_like(batch["sample_mask"]))
    zs = random_logits(1, (3, Ls, 40)).requires_grad_()
    zt = random_logits(2, (3, Lt, 50))
    loss, _ = uld_loss(zs, zt, masked)
    loss.backward()
    assert float(loss.detach()) == 0 and torch.count_nonzero(zs.grad) == 0
    l32 = uld_loss(zs.detach().float(), zt.float(), batch)[0]
    l16 = uld_loss(zs.detach().bfloat16(), zt.bfloat16(), batch)[0]
    assert torch.isfinite(l16) and abs(float(l16) - float(l32)) < 0.05
