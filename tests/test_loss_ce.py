"""Next-token CE against the float64 reference and torch's cross_entropy; KD + CE combination."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.reference_losses import (
    dense_projection,
    is_close,
    random_logits,
    random_projection,
    reference_ce,
    reference_kl,
    reference_pkl,
    synthetic_batch,
)
from xtoken_loss import (
    CELoss,
    KDCELoss,
    LossInputError,
    LossOptionError,
    Projection,
    ce_loss,
    combine_losses,
    count_units,
    kd_ce_loss,
)

V = 31


def _problem(seed=0, batch_size=3, v=V):
    batch = synthetic_batch(seed, batch_size=batch_size, vocab_s=v, vocab_t=40)
    B, L = batch["input_ids"].shape
    return batch, random_logits(seed + 1, (B, L, v))


def test_matches_reference_and_torch_cross_entropy():
    batch, zs = _problem(1)
    x = zs.clone().requires_grad_()
    loss, metrics = ce_loss(x, None, batch, position_chunk_size=4, check_inputs=True)
    loss.backward()
    y = zs.clone().requires_grad_()
    ref, count = reference_ce(y, batch)
    ref.backward()
    assert is_close(loss.detach(), ref.detach()) and count > 10
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-7)
    assert is_close(metrics["ce"], ref.detach())
    # torch's own CE with ignore_index on the same next-token targets
    labels = batch["input_ids"].clone()
    from xtoken_loss.units import next_token_mask

    valid = next_token_mask(batch, *labels.shape)
    tgt = torch.full_like(labels, -100)
    tgt[:, :-1] = labels[:, 1:]
    tgt[~valid] = -100
    assert is_close(loss.detach(), F.cross_entropy(zs.reshape(-1, V), tgt.reshape(-1), ignore_index=-100))


def test_gradcheck_masking_and_bf16():
    batch, zs = _problem(2, batch_size=2, v=7)
    assert torch.autograd.gradcheck(lambda x: ce_loss(x, None, batch, position_chunk_size=3)[0],
                                    (zs.clone().requires_grad_(),), eps=1e-6, atol=1e-5, fast_mode=True)
    x = zs.clone().requires_grad_()
    loss, _ = ce_loss(x, None, dict(batch, token_mask=torch.zeros_like(batch["token_mask"])))
    loss.backward()
    assert float(loss.detach()) == 0 and torch.count_nonzero(x.grad) == 0
    z = zs.clone()
    z[..., -2:] = float("-inf")  # masked vocabulary entries the targets never hit
    b = dict(batch, input_ids=batch["input_ids"] % (7 - 2))
    x = z.clone().requires_grad_()
    loss, _ = ce_loss(x, None, b)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and is_close(loss.detach(), reference_ce(z, b)[0])
    zb = zs.to(torch.bfloat16)
    lb = ce_loss(zb, None, batch)[0]
    lf = ce_loss(zb.float(), None, batch)[0]
    assert abs(float(lb) - float(lf)) < 1e-5 * abs(float(lf))


def test_errors_and_module():
    batch, zs = _problem(3)
    with pytest.raises(LossInputError, match=r"holds token id 30, beyond the student logits \(5 wide\)"):
        ce_loss(zs[..., :5], None, batch, check_inputs=True)
    with pytest.raises(LossInputError, match="needs the batch"):
        ce_loss(zs, None)
    with pytest.raises(LossInputError, match=r"token_mask'\] has shape \(3, 16\), expected \(3, 15\)"):
        ce_loss(zs[:, :-1], None, batch)
    assert float(CELoss()(zs, None, batch)[0]) == float(ce_loss(zs, None, batch)[0])


# --- combination -----------------------------------------------------------------------------


def _pkl_problem(seed=4):
    batch = synthetic_batch(seed, vocab_s=V, vocab_t=40)
    idx, w = random_projection(seed, V - 2, 38)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    return (batch, Projection.from_tensors(idx, w, teacher_width=38), dense_projection(idx, w, V - 2, 38),
            random_logits(seed + 1, (B, Ls, V)), random_logits(seed + 2, (B, Lt, 40)))


def test_principled_combination_divides_both_sums_by_one_count():
    batch, proj, W, zs, zt = _pkl_problem()
    n_tok = reference_ce(zs, batch)[1]  # next-token positions
    n_chunk = reference_pkl(zs, zt, batch, W, top_k_columns=9)[1]  # valid chunks
    assert n_tok != n_chunk
    loss, m = kd_ce_loss(zs, zt, batch, kd="pkl", kd_options={"projection": proj, "top_k_columns": 9},
                         kd_weight=0.7, ce_weight=1.3)
    kd_sum = reference_pkl(zs, zt, batch, W, top_k_columns=9, normalizer=1)[0]
    ce_sum = reference_ce(zs, batch, normalizer=1)[0]
    assert is_close(loss, (0.7 * kd_sum + 1.3 * ce_sum) / n_tok)
    assert set(m) >= {"kd", "ce", "kd_scale", "kd_kl"}
    # the caller's (global) normaliser replaces the local token count
    loss2, _ = kd_ce_loss(zs, zt, batch, normalizer=50, kd_options={"projection": proj, "top_k_columns": 9})
    assert is_close(loss2, (kd_sum + ce_sum) / 50)


def test_public_combination_normalises_each_term_by_its_own_count():
    batch, proj, W, zs, zt = _pkl_problem()
    loss, _ = kd_ce_loss(zs, zt, batch, public=True, kd_options={"projection": proj, "top_k_columns": 9})
    kd = reference_pkl(zs, zt, batch, W, top_k_columns=9, public=True)[0]
    assert is_close(loss, kd + reference_ce(zs, batch)[0])


def test_dynamic_scaling_and_gradients():
    batch, proj, W, zs, zt = _pkl_problem()
    x = zs.clone().requires_grad_()
    loss, m = kd_ce_loss(x, zt, batch, scaling="dynamic", kd_options={"projection": proj, "top_k_columns": 9})
    loss.backward()
    y = zs.clone().requires_grad_()
    n = reference_ce(zs, batch)[1]
    kd = reference_pkl(y, zt, batch, W, top_k_columns=9, normalizer=n)[0]
    ce = reference_ce(y, batch, normalizer=n)[0]
    ref = (ce.detach().abs() / kd.detach().abs()) * kd + ce
    ref.backward()
    assert is_close(loss.detach(), ref.detach()) and is_close(m["kd_scale"], ce.detach() / kd.detach())
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-8)
    # KD of zero: the KD term vanishes instead of dividing by zero
    l0, m0 = combine_losses(torch.zeros((), dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64),
                            scaling="dynamic")
    assert float(l0) == 2.0 and float(m0["kd_scale"]) == 0.0


def test_same_vocab_kd_with_ce_and_module():
    batch, zs = _problem(5)
    zt = random_logits(9, zs.shape)
    loss, _ = kd_ce_loss(zs, zt, batch, kd="kl", kd_options={"temperature": 2.0})
    n = reference_kl(zs, zt, batch, temperature=2.0)[1]
    ref = reference_kl(zs, zt, batch, temperature=2.0, normalizer=n)[0] + reference_ce(zs, batch)[0]
    assert is_close(loss, ref)
    mod = KDCELoss(kd="kl", kd_options={"temperature": 2.0})
    assert float(mod(zs, zt, batch)[0]) == float(loss)
    with pytest.raises(LossOptionError, match="'fixed', 'dynamic'"):
        KDCELoss(scaling="adaptive")
    with pytest.raises(LossOptionError, match="'pkl', 'kl'"):
        kd_ce_loss(zs, zt, batch, kd="uld")


def test_second_derivatives_raise_instead_of_returning_zeros():
    batch, zs = _problem(6, v=9)
    x = zs.clone().requires_grad_()
    (g,) = torch.autograd.grad(ce_loss(x, None, batch)[0], x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


def test_count_units_agrees_with_the_reference_counts():
    batch, proj, W, zs, zt = _pkl_problem()
    assert int(count_units(batch, "ce")) == reference_ce(zs, batch)[1]
    assert int(count_units(batch, "kl")) == reference_kl(zs, zs, batch)[1]
    assert int(count_units(batch, "pkl")) == reference_pkl(zs, zt, batch, W, top_k_columns=9)[1]
