"""Numerics of the chunk-unit losses (principled H-KL, GOLD, ULD; every chunk form) on the real llama3 ->
qwen3 batch and projection at full width (V_s = 128,256, V_t = 151,936): finite in float32 and bf16 on
confident or widely spread logits and close to the float64 references; nothing at masked positions
matters (loss, metrics, gradient exactly 0 there); a non-finite value at a position the loss reads
gives a NaN loss, or with `check_inputs=True` an error naming the tensor and the position; the sorted
L1's histogram-table gradient against a sort on hard cases (ties, zeros, curves crossing often)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.reference_losses import chunk_units, heldout_texts, real_tokenizers, reference_hybrid, reference_uld
from xtoken_core.artifact_format import ROW_EXACT
from xtoken_core.errors import LossInputError
from xtoken_loss.losses.hybrid import CommonSet, common_by_threshold, gold_loss, hkl_loss
from xtoken_loss.losses.uld import uld_loss
from xtoken_loss.projection import Projection
from xtoken_loss.sorted_l1 import sorted_l1, sorted_l1_signs

VS, VT = 128256, 151936
_CACHE: dict = {}


def _problem():
    """A real two-sample batch (padding in the shorter one) and both common sets, full width."""
    if "p" not in _CACHE:
        from xtoken_align.batch.collate import collate

        s_tok, t_tok, fwd = real_tokenizers()
        texts = [t + " 12345 tokens." for t in heldout_texts(2, 24)]
        texts[1] = texts[1][:14]
        batch = dict(collate(texts, s_tok, [t_tok]))
        proj = Projection.from_tensors(torch.as_tensor(fwd.indices), torch.as_tensor(fwd.weights), teacher_width=VT)
        exact = torch.where(torch.as_tensor(fwd.row_kind).to(torch.int64) == ROW_EXACT,
                            torch.as_tensor(fwd.indices)[:, 0].to(torch.int64), -1)
        commons = {"hkl": common_by_threshold(proj), "gold": CommonSet.from_map(exact)}
        _CACHE["p"] = (batch, commons)
    return _CACHE["p"]


def _logits(kind: str, batch, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = torch.randn(B, Ls, VS, generator=g, dtype=torch.float64)
    zt = torch.randn(B, Lt, VT, generator=g, dtype=torch.float64)
    if kind == "student_spike":
        zs[..., 791] += 100.0  # a common token on both sets
        zs[..., 128000] += 100.0 * (torch.rand(B, Ls, generator=g, dtype=torch.float64) > 0.5)  # or a special one
    elif kind == "student_std12":
        zs *= 12
    elif kind == "teacher_std12":
        zt *= 12
    return zs.to(dtype), zt.to(dtype)


def _loss(name, zs, zt, batch, commons, **opt):
    if name == "uld":
        return uld_loss(zs, zt, batch, **opt)
    fn = hkl_loss if name == "hkl" else gold_loss
    return fn(zs, zt, batch, common=commons[name], **opt)


def _reference(name, zs, zt, batch, commons, form):
    if name == "uld":
        return reference_uld(zs, zt, batch, form=form)[0]
    cs = commons[name]
    return reference_hybrid(zs, zt, batch, (cs.student_ids.tolist(), cs.teacher_ids.tolist()), chunk_form=form)[0]


@pytest.mark.parametrize("form", ["start", "mean_log", "chain"])
@pytest.mark.parametrize("kind", ["student_spike", "student_std12", "teacher_std12"])
def test_finite_and_close_to_float64_at_full_width(kind, form):
    batch, commons = _problem()
    zs64, zt64 = _logits(kind, batch, torch.float64)
    for name in ("hkl", "gold", "uld"):
        ref = float(_reference(name, zs64, zt64, batch, commons, form))
        for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, None))[: 2 if form == "start" else 1]:
            zs = zs64.to(dtype).requires_grad_()
            loss, metrics = _loss(name, zs, zt64.to(dtype), batch, commons, chunk_form=form)
            loss.backward()
            assert math.isfinite(float(loss.detach())), (name, dtype, float(loss.detach()))
            assert all(math.isfinite(float(v)) for v in metrics.values()), (name, dtype, metrics)
            assert bool(torch.isfinite(zs.grad).all()), (name, dtype)
            if tol is not None:  # float32 inputs are the float64 ones rounded: the loss must follow
                assert math.isclose(float(loss), ref, rel_tol=tol), (name, form, float(loss), ref)
            else:  # bf16 rounds the logits themselves: against the float64 loss of those rounded logits
                ref16 = float(_reference(name, zs.detach().double(), zt64.to(dtype).double(), batch, commons, form))
                assert math.isclose(float(loss), ref16, rel_tol=1e-3), (name, form, float(loss), ref16)


def test_float32_gradient_follows_float64():
    batch, commons = _problem()
    zs64, zt64 = _logits("student_std12", batch, torch.float64, seed=3)
    for name in ("hkl", "gold", "uld"):
        grads = []
        for dtype in (torch.float64, torch.float32):
            zs = zs64.to(dtype).detach().clone().requires_grad_()
            _loss(name, zs, zt64.to(dtype), batch, commons)[0].backward()
            grads.append(zs.grad.double())
        scale = float(grads[0].abs().max())
        assert scale > 0 and float((grads[0] - grads[1]).abs().max()) < 1e-3 * scale, name


def _masked_positions(batch):
    """(student, teacher) boolean `[B, L]` masks of the padded positions."""
    return ~batch["token_mask"].bool(), ~batch["teacher_0_token_mask"].bool()


@pytest.mark.parametrize("form", ["start", "mean_log", "chain"])
def test_garbage_at_masked_positions_changes_nothing(form):
    batch, commons = _problem()
    pad_s, pad_t = _masked_positions(batch)
    assert pad_s.any() and pad_t.any()
    zs0, zt0 = _logits("plain", batch)
    for name in ("hkl", "gold", "uld"):
        x = zs0.clone().requires_grad_()
        clean, m_clean = _loss(name, x, zt0, batch, commons, chunk_form=form)
        clean.backward()
        for fill in (float("nan"), float("inf"), -float("inf"), 3e38):
            zs, zt = zs0.clone(), zt0.clone()
            zs[pad_s] = fill
            zt[pad_t] = fill
            zs[pad_s.nonzero()[0, 0], pad_s.nonzero()[0, 1], 5] = float("nan")  # mixed garbage too
            zs.requires_grad_()
            loss, metrics = _loss(name, zs, zt, batch, commons, chunk_form=form, check_inputs=True)
            loss.backward()
            assert float(loss) == float(clean), (name, form, fill, float(loss), float(clean))
            assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in m_clean.items()}
            assert torch.equal(zs.grad, x.grad), (name, form, fill)
            assert int(torch.count_nonzero(zs.grad[pad_s])) == 0


def _read_position(batch, side):
    """A (sample, position) the "start" form reads, from the reference's own reading of the batch."""
    Ls, Lt = batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]
    b, _c, sp, tp = chunk_units(batch, 0, Ls, Lt, starts=True)[2]
    return (b, sp[0]) if side == "student" else (b, tp[0])


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_non_finite_at_a_read_position_gives_nan_or_a_named_error(side):
    batch, commons = _problem()
    b, p = _read_position(batch, side)
    zs0, zt0 = _logits("plain", batch)
    for name in ("hkl", "gold", "uld"):
        for form in ("start", "mean_log", "chain"):
            for value in (float("nan"), float("inf")):
                zs, zt = zs0.clone(), zt0.clone()
                (zs if side == "student" else zt)[b, p, 1234] = value
                loss, metrics = _loss(name, zs, zt, batch, commons, chunk_form=form)
                assert math.isnan(float(loss)), (name, form, side, value, float(loss))
                with pytest.raises(LossInputError, match=rf"{'student' if side == 'student' else 'teacher'}.*"
                                                         rf"sample {b}, position {p}"):
                    _loss(name, zs, zt, batch, commons, chunk_form=form, check_inputs=True)
    # -inf at single vocabulary entries (masked vocabulary) is legitimate
    zs, zt = zs0.clone(), zt0.clone()
    zs[..., 7:20] = -float("inf")
    zt[..., 7:20] = -float("inf")
    for name in ("hkl", "gold", "uld"):
        loss, _ = _loss(name, zs, zt, batch, commons, check_inputs=True)
        assert math.isfinite(float(loss)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sorted_l1_table_gradient_matches_a_sort(dtype):
    g = torch.Generator().manual_seed(0)
    cases = []
    for vs, vt in ((300, 500), (500, 300), (4000, 4000)):
        zs = torch.randn(5, vs, generator=g, dtype=torch.float64) * 2
        zt = torch.randn(5, vt, generator=g, dtype=torch.float64) * 2
        cases.append((torch.softmax(zs, 1), torch.softmax(zt, 1)))  # generic
        w = min(vs, vt)  # nearly the same sorted curve: it crosses the other one very often
        zn = torch.cat([zs[:, :w] + 1e-3 * torch.randn(5, w, generator=g, dtype=torch.float64),
                        torch.full((5, vt - w), -40.0, dtype=torch.float64)], 1)
        cases.append((torch.softmax(zs, 1), torch.softmax(zn, 1)))
        q = torch.softmax(zs, 1).clone()
        q[:, ::3] = 0.0  # exact zeros (underflow)
        cases.append((q, torch.softmax(zt * 12, 1)))
    for ps, pt in cases:
        ps, pt = ps.to(dtype), pt.to(dtype)
        l1, sigma = sorted_l1_signs(ps, pt)
        x = ps.double().clone().requires_grad_()
        a = torch.sort(x, dim=1, descending=True).values
        b = torch.sort(pt.double(), dim=1, descending=True).values
        n = max(a.shape[1], b.shape[1])
        ref = (torch.nn.functional.pad(a, (0, n - a.shape[1])) - torch.nn.functional.pad(b, (0, n - b.shape[1])))
        ref = ref.abs().sum(dim=1)
        (gref,) = torch.autograd.grad(ref.sum(), x)
        assert torch.allclose(l1.double(), ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
        live = ps > 0  # the gradient at an exact zero is multiplied by q = 0 anyway
        assert torch.equal(sigma.double()[live], gref[live])
        # the autograd wrapper gives the same
        y = ps.clone().requires_grad_()
        sorted_l1(y, pt).sum().backward()
        assert torch.equal(y.grad, sigma)
