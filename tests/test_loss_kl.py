"""Same-vocab KL: full teacher logits and per-position teacher top-k, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from tests.reference_losses import is_close, random_logits, real_problem, reference_kl, synthetic_batch
from xtoken_loss import KLLoss, LossInputError, LossOptionError, kl_loss

V = 37


def _problem(seed=0, *, batch_size=3, v=V, teacher_width=None):
    batch = synthetic_batch(seed, batch_size=batch_size, vocab_s=v)
    B, L = batch["input_ids"].shape
    zs = random_logits(seed + 1, (B, L, v))
    zt = random_logits(seed + 2, (B, L, teacher_width or v))
    return batch, zs, zt


def _topk(zt, k):
    top = torch.log_softmax(zt, dim=-1).topk(k, dim=-1)
    return {"topk_logprobs": top.values, "topk_indices": top.indices}


def _both(zs, teacher, batch, **kw):
    x = zs.detach().clone().requires_grad_()
    loss, metrics = kl_loss(x, teacher, batch, check_inputs=True, **kw)
    loss.backward()
    y = zs.detach().clone().requires_grad_()
    ref, count = reference_kl(y, teacher, batch, **{k: v for k, v in kw.items() if k != "position_chunk_size"})
    ref.backward()
    assert is_close(loss.detach(), ref.detach())
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)
    return loss, metrics, count


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_logits_match_reference(direction, temperature):
    batch, zs, zt = _problem(1)
    _, _, count = _both(zs, zt, batch, direction=direction, temperature=temperature, position_chunk_size=5)
    assert count > 10


def test_narrower_teacher_is_padded_with_minus_inf():
    batch, zs, zt = _problem(2, teacher_width=V - 4)
    _both(zs, zt, batch)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_topk_matches_reference(direction, tail):
    batch, zs, zt = _problem(3)
    teacher = _topk(zt, 6)
    teacher["topk_indices"][0, 1, -2:] = -1  # empty slots
    _both(zs, teacher, batch, direction=direction, tail=tail, position_chunk_size=7)


def test_topk_renormalized_with_temperature_matches_reference():
    batch, zs, zt = _problem(4)
    _both(zs, _topk(zt, 5), batch, tail="renormalize", temperature=3.0)


def test_topk_bucket_with_all_columns_equals_full_kl():
    batch, zs, zt = _problem(5)
    full = kl_loss(zs, zt, batch)[0]
    topk = kl_loss(zs, _topk(zt, V), batch)[0]
    assert is_close(full, topk, 1e-10)


def test_real_batch_matches_reference():
    batch, _, _, vs, _ = real_problem()
    B, L = batch["input_ids"].shape
    zs = random_logits(21, (B, L, vs))
    zt = random_logits(22, (B, L, vs))
    _both(zs, zt, batch, temperature=1.3)
    _both(zs, _topk(zt, 40), batch)


def test_gradcheck_small():
    batch, zs, zt = _problem(6, batch_size=2, v=9)
    for teacher, kw in ((zt, {"direction": "forward"}), (zt, {"direction": "reverse", "temperature": 2.0}),
                        (_topk(zt, 4), {"direction": "forward"}), (_topk(zt, 4), {"direction": "reverse"}),
                        (_topk(zt, 4), {"tail": "renormalize", "temperature": 1.5})):
        def f(x):
            return kl_loss(x, teacher, batch, position_chunk_size=3, **kw)[0]
        assert torch.autograd.gradcheck(f, (zs.clone().requires_grad_(),), eps=1e-6, atol=1e-5, fast_mode=True)


def test_zero_when_equal_positive_otherwise():
    batch, zs, _ = _problem(7)
    for direction in ("forward", "reverse"):
        assert abs(float(kl_loss(zs, zs, batch, direction=direction)[0])) < 1e-12
        assert abs(float(kl_loss(zs, _topk(zs, 5), batch, direction=direction)[0])) < 1e-12
        z2 = zs.clone()
        z2[0, 0, 0] += 1.0  # a valid position (synthetic batches start with a real token)
        assert float(kl_loss(z2, zs, batch, direction=direction)[0]) > 0
        assert float(kl_loss(z2, _topk(zs, 5), batch, direction=direction)[0]) > 0


def test_invariant_to_padding_order_and_chunk_size():
    batch, zs, zt = _problem(8, batch_size=4)
    base = float(kl_loss(zs, zt, batch)[0])
    perm = torch.tensor([3, 1, 0, 2])
    assert is_close(kl_loss(zs[perm], zt[perm], {k: v[perm] for k, v in batch.items()})[0], base, 1e-12)
    B, L, _ = zs.shape
    padded = {k: (torch.cat([v, torch.zeros(B, 3, dtype=v.dtype)], 1) if k in ("input_ids", "token_mask") else v)
              for k, v in batch.items()}
    zs2 = torch.cat([zs, 9 * random_logits(1, (B, 3, V))], 1)
    zt2 = torch.cat([zt, 9 * random_logits(2, (B, 3, V))], 1)
    assert is_close(kl_loss(zs2, zt2, padded)[0], base, 1e-12)
    for n in (1, 4, 999):
        assert is_close(kl_loss(zs, zt, batch, position_chunk_size=n)[0], base, 1e-12)


def test_all_masked_and_masked_vocabulary():
    batch, zs, zt = _problem(9)
    b = dict(batch, sample_mask=torch.zeros_like(batch["sample_mask"]))
    for teacher in (zt, _topk(zt, 4)):
        x = zs.clone().requires_grad_()
        loss, _ = kl_loss(x, teacher, b)
        loss.backward()
        assert float(loss.detach()) == 0 and torch.count_nonzero(x.grad) == 0
    zs, zt = zs.clone(), zt.clone()
    zt[..., -5:] = float("-inf")
    zs[..., -5:] = float("-inf")
    zs[..., 0] = float("-inf")  # the student masks more than the teacher: reverse KL is finite
    _both(zs, zt, batch, direction="reverse")
    zs[..., 0] = 0.0
    zt[..., 1] = float("-inf")  # the teacher masks more than the student: forward KL is finite
    _both(zs, zt, batch, direction="forward")
    # mass on one side where the other has none: +inf, the true value
    assert float(kl_loss(zs, zt, batch, direction="reverse")[0]) == float("inf")
    zs[..., 2] = float("-inf")
    assert float(kl_loss(zs, zt, batch)[0]) == float("inf")


def test_bf16_close_to_float32():
    batch, zs, zt = _problem(10)
    zs, zt = zs.to(torch.bfloat16), zt.to(torch.bfloat16)
    res = {}
    top = _topk(zt.float(), 6)
    top["topk_logprobs"] = top["topk_logprobs"].to(torch.bfloat16)  # same inputs for both runs
    for dt in (torch.float32, torch.bfloat16):
        topk = {"topk_logprobs": top["topk_logprobs"].to(dt), "topk_indices": top["topk_indices"]}
        for name, teacher in (("full", zt.to(dt)), ("topk", topk)):
            x = zs.to(dt).clone().requires_grad_()
            loss, _ = kl_loss(x, teacher, batch)
            loss.backward()
            assert torch.isfinite(x.grad).all() and x.grad.dtype == dt
            res[dt, name] = (float(loss.detach()), x.grad.float())
    for name in ("full", "topk"):
        a, b = res[torch.float32, name], res[torch.bfloat16, name]
        assert abs(a[0] - b[0]) < 1e-5 * abs(a[0]) + 1e-6
        torch.testing.assert_close(b[1], a[1], rtol=1e-2, atol=1e-4)  # rounded to bf16 once, at the end


def test_errors_and_module():
    batch, zs, zt = _problem(11)
    with pytest.raises(LossOptionError, match="tail='renormalize'"):
        kl_loss(zs, _topk(zt, 3), batch, temperature=2.0)
    with pytest.raises(LossOptionError, match="'bucket', 'renormalize'"):
        kl_loss(zs, zt, batch, tail="drop")
    with pytest.raises(LossInputError, match="wider"):
        kl_loss(zs[..., :-2], zt, batch)
    with pytest.raises(LossInputError, match="expected"):
        kl_loss(zs[:, :-1], zt, batch)
    nan = zt.clone()
    nan[1, 2, 3] = float("nan")
    with pytest.raises(LossInputError, match="NaN"):
        kl_loss(zs, nan, batch, check_inputs=True)
    with pytest.raises(LossInputError, match="teacher_outputs"):
        kl_loss(zs, {"topk_logprobs": zt}, batch)
    assert float(KLLoss(temperature=2.0)(zs, zt, batch)[0]) == float(kl_loss(zs, zt, batch, temperature=2.0)[0])
