"""KD + CE in one pass: `kl_loss(ce_weight=)` and `MultiTeacherLoss(..., ce_weight=)` against the
float64 references (`reference_kl + c * reference_ce`), on real llama3 / qwen3 batches for the
multi-teacher case; the fused path must equal computing the CE apart, value and gradient."""

from __future__ import annotations

import pytest
import torch

from tests.reference_losses import is_close, random_logits, reference_ce, reference_kl, synthetic_batch
from tests.test_multi_teacher import build, real_problem, ref_kd, sharpened_logits, teacher_specs
from xtoken_loss import LossOptionError, ce_loss, kl_loss
from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig

V = 41


def _problem(seed, *, scale=3.0, teacher_width=None, dtype=torch.float64):
    batch = synthetic_batch(seed, batch_size=3, vocab_s=V)
    B, L = batch["input_ids"].shape
    zs = random_logits(seed + 1, (B, L, V), scale=scale, dtype=dtype)
    zt = random_logits(seed + 2, (B, L, teacher_width or V), scale=scale, dtype=dtype)
    return batch, zs, zt


def _fused_vs_reference(zs, zt, batch, c, normalizer=None, tol=1e-6, **kw):
    x = zs.detach().clone().requires_grad_()
    loss, m = kl_loss(x, zt, batch, normalizer=normalizer, ce_weight=c, **kw)
    loss.backward()
    y = zs.detach().clone().requires_grad_()
    kl, count = reference_kl(y, zt, batch, normalizer=normalizer)
    ce, _ = reference_ce(y, batch, normalizer=normalizer)
    ref = kl + c * ce
    ref.backward()
    assert is_close(loss.detach(), ref.detach(), tol), (float(loss), float(ref))
    torch.testing.assert_close(x.grad.double(), y.grad.double(), rtol=tol, atol=tol)
    if c:
        assert is_close(m["kl_term"], kl.detach(), tol) and is_close(m["ce_term"], ce.detach(), tol)
    return m, count


@pytest.mark.parametrize("c", [0.0, 0.3, 2.0])
@pytest.mark.parametrize("chunk", [None, 4])
def test_kl_with_ce_matches_reference(c, chunk):
    batch, zs, zt = _problem(1)
    m, count = _fused_vs_reference(zs, zt, batch, c, position_chunk_size=chunk, normalizer=7.0)
    assert count > 10 and ("ce" in m) == (c > 0)


def test_kl_with_ce_narrower_teacher_and_confident_float32_logits():
    batch, zs, zt = _problem(2, scale=60.0, teacher_width=V - 5, dtype=torch.float32)
    _fused_vs_reference(zs, zt, batch, 0.5, tol=2e-4)


def test_kl_with_ce_padding_never_matters_and_nan_where_read_is_nan():
    batch, zs, zt = _problem(3)
    pad = ~batch["token_mask"]
    assert pad.any()
    zs2, zt2 = zs.clone(), zt.clone()
    zs2[pad] = float("nan")
    zt2[pad] = float("inf")
    x, y = zs.clone().requires_grad_(), zs2.clone().requires_grad_()
    a, _ = kl_loss(x, zt, batch, ce_weight=0.5)
    b, _ = kl_loss(y, zt2, batch, ce_weight=0.5)
    a.backward(), b.backward()
    assert torch.isfinite(b) and is_close(a.detach(), b.detach(), 1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=0, atol=0)
    read = batch["token_mask"].nonzero()[0]
    zs2[read[0], read[1], 3] = float("nan")  # a row the loss reads
    loss, m = kl_loss(zs2, zt, batch, ce_weight=0.5)
    assert torch.isnan(loss) and torch.isnan(m["ce"])


def test_kl_with_ce_matches_ce_loss_in_bf16():
    batch, zs, zt = _problem(4, dtype=torch.bfloat16)
    _, m = kl_loss(zs, zt, batch, ce_weight=1.0)
    ce, cm = ce_loss(zs, None, batch)
    assert is_close(m["ce"], cm["ce"], 1e-5)


@pytest.mark.parametrize("kw", [{"direction": "reverse"}, {"temperature": 2.0}])
def test_kl_with_ce_refuses_other_forms(kw):
    batch, zs, zt = _problem(5)
    with pytest.raises(LossOptionError, match="ce_weight"):
        kl_loss(zs, zt, batch, ce_weight=1.0, **kw)
    top = torch.log_softmax(zt, -1).topk(5, -1)
    with pytest.raises(LossOptionError, match="ce_weight needs full teacher logits"):
        kl_loss(zs, {"topk_logprobs": top.values, "topk_indices": top.indices}, batch, ce_weight=1.0)


# -------------------------------------------------------------------------------------------------
# MultiTeacherLoss: qwen3 P-KL (teacher 0) + llama3 same-vocab KL (teacher 1), real batch


@pytest.mark.parametrize("config,fused", [
    (MultiTeacherConfig(), True),                                        # sum, static weights: fused into KL
    (MultiTeacherConfig(weighting="dynamic", score="ce"), False),        # tensor weights: CE apart
    (MultiTeacherConfig(mode="select_teacher", score="ce"), None),       # fused only when KL is selected
])
def test_multi_teacher_ce_equals_ce_apart(config, fused):
    batch, proj, Vs, Vt, _ = real_problem()
    zs = sharpened_logits(1, batch["input_ids"], batch["token_mask"], Vs, [0.5] * 4)
    z0 = sharpened_logits(2, batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], Vt, [1.0] * 4)
    z1 = sharpened_logits(3, batch["input_ids"], batch["token_mask"], Vs, [2.0] * 4)
    mt = build(config, weights=(1.0, 1.0) if config.mode == "select_teacher" else (0.8, 0.2))
    norms, ce_norm = [11.0, 13.0], 17.0
    x = zs.clone().requires_grad_()
    loss, m = mt(x, [z0, z1], batch, normalizer=norms, ce_weight=0.6, ce_normalizer=ce_norm)
    loss.backward()
    y = zs.clone().requires_grad_()
    kd, m_apart = mt(y, [z0, z1], batch, normalizer=norms)
    ce, _ = ce_loss(y, None, batch, normalizer=ce_norm)
    ref = kd + 0.6 * ce
    ref.backward()
    assert is_close(loss.detach(), ref.detach(), 1e-9)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)
    assert is_close(m["ce"], ce.detach(), 1e-9) and is_close(m["kd"], kd.detach(), 1e-9)
    for k in ("teacher_0/kd", "teacher_1/kd"):
        if k in m_apart:
            assert is_close(m[k], m_apart[k], 1e-9)
    if fused is not None:
        assert float(m["ce_fused"]) == float(fused)


def test_multi_teacher_fused_ce_matches_float64_reference():
    batch, proj, Vs, Vt, _ = real_problem()
    zs = sharpened_logits(4, batch["input_ids"], batch["token_mask"], Vs, [0.5] * 4)
    z0 = sharpened_logits(5, batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], Vt, [1.0] * 4)
    z1 = sharpened_logits(6, batch["input_ids"], batch["token_mask"], Vs, [2.0] * 4)
    mt = build(MultiTeacherConfig(), weights=(0.8, 0.2))
    loss, m = mt(zs, [z0, z1], batch, normalizer=[9.0, 9.0], ce_weight=1.0, ce_normalizer=9.0)
    k0, k1 = ref_kd(zs, z0, z1, batch, proj, Vs, Vt, norms=(9.0, 9.0))
    ce, _ = reference_ce(zs, batch, normalizer=9.0)
    assert float(m["ce_fused"]) == 1.0
    assert is_close(loss, 0.8 * k0 + 0.2 * k1 + ce, 1e-6)


def test_multi_teacher_without_a_kl_teacher_computes_ce_apart():
    batch, proj, Vs, Vt, _ = real_problem()
    zs = sharpened_logits(7, batch["input_ids"], batch["token_mask"], Vs, [0.5] * 4)
    z0 = sharpened_logits(8, batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], Vt, [1.0] * 4)
    z1 = sharpened_logits(9, batch["input_ids"], batch["token_mask"], Vs, [2.0] * 4)
    specs = teacher_specs(weights=(0.8, 0.2))
    specs[1].loss_options["direction"] = "reverse"  # no forward KL to hold the CE
    mt = build(MultiTeacherConfig(), teachers=specs)
    loss, m = mt(zs, [z0, z1], batch, ce_weight=0.5)
    kd, _ = mt(zs, [z0, z1], batch)
    ce, _ = reference_ce(zs, batch)
    assert float(m["ce_fused"]) == 0.0 and is_close(loss, kd + 0.5 * ce, 1e-9)


@pytest.mark.parametrize("teacher_form", ["tensor", "dict"])
def test_kd_ce_loss_with_kl_fuses_and_matches_reference(teacher_form):
    from xtoken_loss import kd_ce_loss

    batch, zs, zt = _problem(6)
    x = zs.clone().requires_grad_()
    teacher = zt if teacher_form == "tensor" else {"logits": zt}
    loss, m = kd_ce_loss(x, teacher, batch, kd="kl", kd_weight=0.7, ce_weight=1.3)
    loss.backward()
    y = zs.clone().requires_grad_()
    count = reference_ce(y, batch)[1]
    kl, _ = reference_kl(y, zt, batch, normalizer=count)
    ce, _ = reference_ce(y, batch, normalizer=count)
    ref = 0.7 * kl + 1.3 * ce
    ref.backward()
    assert is_close(loss.detach(), ref.detach()) and is_close(m["kd"], kl.detach()) and is_close(m["ce"], ce.detach())
    assert "kd_kl" in m and float(m["kd_scale"]) == pytest.approx(0.7)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-9)
