"""P-KL numerics at full llama3 x qwen3 width (issue 11), for the principled `pkl_loss` and
`learned_pkl_loss`: log space (a +100 logit, std-12 logits, on either side, float32 and bf16, both
directions) against the float64 log-space reference with a sparse W; positions the batch masks out are
never read (NaN / inf / 1e30 there change nothing, their gradient is exactly 0); a non-finite value at
a position the loss reads gives NaN, or a `LossInputError` naming it with `check_inputs=True`."""

from __future__ import annotations

import math

import pytest
import torch

from tests.reference_losses import (
    dense_projection,
    heldout_texts,
    is_close,
    random_logits,
    real_problem,
    real_tokenizers,
    reference_pkl,
    sparse_projection,
)
from xtoken_loss import LossInputError, Projection, pkl_loss
from xtoken_loss.losses import pkl as pkl_module
from xtoken_loss.losses.learned_pkl import LearnedProjection, learned_pkl_loss

VS, VT = 128256, 151936  # llama3 logits, qwen3 logits (151,669 tokens)
MAPPED_S, UNMAPPED_S = 1000, 128002  # a student row W maps (to teacher 985), a special row it does not
REACH_T, UNREACH_T = 985, 151700  # a teacher column W reaches, one past Qwen3's tokens


@pytest.fixture(scope="module")
def full():
    from xtoken_align.batch.collate import collate

    s_tok, t_tok, fwd = real_tokenizers()
    batch = dict(collate(heldout_texts(3, 28), s_tok, [t_tok]))
    idx, w = torch.as_tensor(fwd.indices), torch.as_tensor(fwd.weights)
    proj = Projection.from_tensors(idx, w, teacher_width=VT)
    mapped = ((idx >= 0) & (w > 0)).any(dim=1)
    assert bool(mapped[MAPPED_S]) and not bool(mapped[UNMAPPED_S])
    reach = proj.reachable_columns(VT)
    assert bool(reach[REACH_T]) and not bool(reach[UNREACH_T])
    return batch, proj, sparse_projection(idx, w, VS, VT)


CASES = ("student_spike", "student_spike_unmapped", "student_std12", "teacher_std12", "teacher_spike",
         "teacher_spike_unreachable")


def _logits(batch, case, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = torch.randn(B, Ls, VS, generator=g)
    zt = torch.randn(B, Lt, VT, generator=g)
    if case == "student_spike":
        zs[..., MAPPED_S] += 100.0
    elif case == "student_spike_unmapped":  # the mapped mass is e^-100 of the total
        zs[..., UNMAPPED_S] += 100.0
    elif case == "student_std12":
        zs *= 12.0
    elif case == "teacher_std12":
        zt *= 12.0
    elif case == "teacher_spike":  # the rest outside S holds e^-100
        zt[..., REACH_T] += 100.0
    elif case == "teacher_spike_unreachable":  # the reachable mass is e^-100 of the total
        zt[..., UNREACH_T] += 100.0
    return zs, zt


def _grad_close(g, ref, rtol):
    # gradients far below float32's normal range (1e-38: a +100 logit's neighbours) cannot be held
    # by float32 or bf16; below 1e-30 an absolute match is all there is to ask
    torch.testing.assert_close(g.double(), ref, rtol=rtol, atol=rtol * float(ref.abs().max()) + 1e-30)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("case", CASES)
def test_confident_and_wide_logits_match_float64(full, case, direction):
    """float32 and bf16 inputs (the same bf16-representable values) against the float64 reference."""
    batch, proj, W = full
    zs, zt = (z.to(torch.bfloat16) for z in _logits(batch, case))
    xr = zs.double().requires_grad_()
    ref, count, _ = reference_pkl(xr, zt.double(), batch, W, direction=direction)
    ref.backward()
    ref = ref.detach()
    assert count >= 8 and torch.isfinite(ref) and float(ref) > 0
    for dtype in (torch.float32, torch.bfloat16):
        x = zs.to(dtype).requires_grad_()
        loss, metrics = pkl_loss(x, zt.to(dtype), batch, projection=proj, direction=direction)
        loss.backward()
        assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all()) and x.grad.dtype == dtype
        assert all(bool(torch.isfinite(v)) for v in metrics.values())
        assert is_close(loss, ref, 1e-3 * abs(float(ref))), (dtype, float(loss), float(ref))
        _grad_close(x.grad, xr.grad, 1e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("case", ["student_spike", "student_std12", "teacher_spike", "teacher_spike_unreachable"])
def test_learned_pkl_confident_and_wide_logits_match_float64(full, case):
    batch, proj, W = full
    zs, zt = _logits(batch, case)
    lp = LearnedProjection(proj)
    x = zs.clone().requires_grad_()
    loss, _ = learned_pkl_loss(x, zt, batch, projection=lp)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all())
    assert bool(torch.isfinite(lp.theta.grad).all())
    xr = zs.double().requires_grad_()
    ref, _, _ = reference_pkl(xr, zt.double(), batch, W)
    ref.backward()
    ref = ref.detach()
    assert is_close(loss, ref, 1e-3 * abs(float(ref))), (float(loss), float(ref))
    _grad_close(x.grad, xr.grad, 1e-3)


def test_exact_paths_match_the_reference(monkeypatch):
    """Every row through the exact recomputation (student rest / mapped mass by logsumexp, teacher
    reachable and rest mass recomputed, down to the masked logsumexp): same values as the fast path."""
    batch, idx, w, vs, vt = real_problem()
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs, zt = random_logits(21, (B, Ls, vs + 3)), random_logits(22, (B, Lt, vt + 5))
    proj = Projection.from_tensors(idx, w, teacher_width=vt)
    W = dense_projection(idx, w, vs, vt)
    for direction in ("forward", "reverse"):
        for top_k in (None, 40):
            kw = dict(direction=direction, top_k_columns=top_k, temperature=1.3)
            x = zs.clone().requires_grad_()
            fast, _ = pkl_loss(x, zt, batch, projection=proj, **kw)
            fast.backward()
            with monkeypatch.context() as m:
                m.setattr(pkl_module, "_log_floor", lambda *a: math.inf)  # every mass "underflows"
                m.setattr(pkl_module, "REST_EXACT_BELOW", 2.0)  # every teacher rest recomputed
                y = zs.clone().requires_grad_()
                exact, _ = pkl_loss(y, zt, batch, projection=proj, **kw)
                exact.backward()
            xr = zs.clone().requires_grad_()
            ref, _, _ = reference_pkl(xr, zt, batch, W, **kw)
            ref.backward()
            for got, g in ((fast, x.grad), (exact, y.grad)):
                assert is_close(got, ref, 1e-9)
                torch.testing.assert_close(g, xr.grad, rtol=1e-7, atol=1e-9)


# --- positions the batch masks out are never read ---------------------------------------------


def _masked_out(batch):
    """A copy of `batch` with sample 2 dropped and chunks 1 and 3 of sample 0 invalid, and the
    `[B, L]` bool masks of the positions it masks out on each side: padding (token_mask False), the
    dropped sample, and positions whose next token lies in an invalid chunk. Read from the batch
    keys, not from the library."""
    b = {k: v.clone() for k, v in batch.items()}
    b["sample_mask"][2] = False
    b["alignment_0_pair_valid"][0, [1, 3]] = False
    out = {}
    for side, prefix in (("student", ""), ("teacher", "teacher_0_")):
        cid = b[f"alignment_0_{side}_chunk_id"]
        nxt = torch.full_like(cid, -1)
        nxt[:, :-1] = cid[:, 1:]
        ok = b["alignment_0_pair_valid"] & b["alignment_0_pair_is_correct"]
        invalid_next = (nxt >= 0) & ~ok.gather(1, nxt.clamp(min=0))
        mask = ~b[f"{prefix}token_mask"] | ~b["sample_mask"][:, None] | invalid_next
        assert bool(mask.any()) and not bool(mask.all())
        out[side] = mask
    return b, out["student"], out["teacher"]


@pytest.mark.parametrize("kind", ["pkl", "pkl_reverse", "learned"])
def test_garbage_where_the_batch_masks_out_changes_nothing(full, kind):
    batch, proj, _ = full
    b, ms, mt = _masked_out(batch)
    zs, zt = _logits(batch, "plain")
    lp = LearnedProjection(proj) if kind == "learned" else None

    def run(zs_, zt_):
        x = zs_.clone().requires_grad_()
        if kind == "learned":
            loss, metrics = learned_pkl_loss(x, zt_, b, projection=lp, check_inputs=True)
        else:
            loss, metrics = pkl_loss(x, zt_, b, projection=proj, check_inputs=True,
                                     direction="reverse" if kind == "pkl_reverse" else "forward")
        loss.backward()
        return loss.detach(), metrics, x.grad

    base_loss, base_metrics, base_grad = run(zs, zt)
    assert torch.isfinite(base_loss) and float(base_loss) > 0
    for value in (float("nan"), float("inf"), float("-inf"), 1e30):
        zs2, zt2 = zs.clone(), zt.clone()
        zs2[ms] = value
        zt2[mt] = value
        b0, p0 = ms.nonzero()[0].tolist()  # and a masked row of ordinary logits with a few NaN
        zs2[b0, p0] = zs[b0, p0]
        zs2[b0, p0, ::7] = float("nan")
        loss, metrics, grad = run(zs2, zt2)
        assert torch.equal(loss, base_loss), (value, float(loss), float(base_loss))
        assert metrics.keys() == base_metrics.keys()
        assert all(torch.equal(metrics[k], base_metrics[k]) for k in metrics)
        assert bool((grad[ms] == 0).all())
        assert torch.equal(grad, base_grad)


# --- a non-finite value the loss reads is never hidden ----------------------------------------


def _read_rows(batch):
    from xtoken_loss.units import chunk_units

    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    u = chunk_units(batch, 0, B, Ls, Lt)
    return [divmod(int(r), Ls) for r in u.student_rows[[0, -1]]], [divmod(int(r), Lt) for r in u.teacher_rows[[0, -1]]]


@pytest.mark.parametrize("kind", ["pkl", "pkl_reverse", "learned"])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nonfinite_at_a_read_position_gives_nan_or_names_it(full, kind, side):
    batch, proj, _ = full
    zs, zt = _logits(batch, "plain")
    s_rows, t_rows = _read_rows(batch)
    lp = LearnedProjection(proj) if kind == "learned" else None

    def run(zs_, zt_, **kw):
        x = zs_.clone().requires_grad_()
        if kind == "learned":
            return learned_pkl_loss(x, zt_, batch, projection=lp, **kw)
        return pkl_loss(x, zt_, batch, projection=proj, direction="reverse" if kind == "pkl_reverse" else "forward",
                        **kw)

    for value in ("nan", "inf", "all_-inf"):
        zs2, zt2 = zs.clone(), zt.clone()
        z, (b, p) = (zs2, s_rows[-1]) if side == "student" else (zt2, t_rows[-1])
        if value == "all_-inf":
            z[b, p] = float("-inf")
        else:
            z[b, p, 17] = float(value)
        loss, metrics = run(zs2, zt2)
        assert torch.isnan(loss), (value, float(loss))
        assert torch.isnan(metrics["kl"])
        name = "student_logits" if side == "student" else "teacher logits"
        what = {"nan": "NaN", "inf": r"\+inf", "all_-inf": "only -inf"}[value]
        with pytest.raises(LossInputError, match=f"{name} holds {what} at sample {b}, position {p} "):
            run(zs2, zt2, check_inputs=True)
    zs2, zt2 = zs.clone(), zt.clone()  # masked vocabulary entries are legitimate
    zs2[s_rows[0][0], s_rows[0][1], UNMAPPED_S] = float("-inf")
    zt2[t_rows[0][0], t_rows[0][1], UNREACH_T:] = float("-inf")
    loss, _ = run(zs2, zt2, check_inputs=True)
    assert torch.isfinite(loss)
