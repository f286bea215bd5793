"""P-KL: against the float64 dense reference (hand-built and real llama3 x qwen3 batches), gradients,
and the properties docs/losses.md promises for the principled and the public form."""

from __future__ import annotations

import pytest
import torch

from tests.reference_losses import (
    dense_projection,
    is_close,
    random_logits,
    random_projection,
    real_problem,
    reference_pkl,
    synthetic_batch,
)
from xtoken_loss import LossInputError, LossOptionError, PKLLoss, Projection, pkl_loss

VS, VT = 40, 50  # logits widths; the projection covers VS - 3 rows and VT - 5 columns


def _problem(seed=0, *, batch_size=3, dtype=torch.float64, vs=VS, vt=VT, **kw):
    batch = synthetic_batch(seed, batch_size=batch_size, vocab_s=vs, vocab_t=vt, **kw)
    idx, w = random_projection(seed + 1, vs - 3, vt - 5)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = random_logits(seed + 2, (B, Ls, vs), dtype=dtype)
    zt = random_logits(seed + 3, (B, Lt, vt), dtype=dtype)
    proj = Projection.from_tensors(idx, w, teacher_width=vt - 5)
    return batch, proj, dense_projection(idx, w, vs - 3, vt - 5), zs, zt


def _lib(zs, zt, batch, proj, **kw):
    x = zs.detach().clone().requires_grad_()
    loss, metrics = pkl_loss(x, zt, batch, projection=proj, check_inputs=True, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _ref(zs, zt, batch, W, **kw):
    x = zs.detach().clone().requires_grad_()
    loss, count, cols = reference_pkl(x, zt, batch, W, **kw)
    loss.backward()
    return loss.detach(), x.grad, count


def _assert_grads(g1, g2, tol=1e-6):
    torch.testing.assert_close(g1, g2, rtol=tol, atol=tol)


@pytest.mark.parametrize("public", [False, True])
@pytest.mark.parametrize("top_k", [None, 6, 25])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_reference_on_hand_built_batches(public, top_k, temperature):
    batch, proj, W, zs, zt = _problem(3)
    kw = dict(public=public, top_k_columns=top_k, temperature=temperature)
    l1, g1, _ = _lib(zs, zt, batch, proj, position_chunk_size=4, **kw)
    l2, g2, count = _ref(zs, zt, batch, W, **kw)
    assert count > 5
    assert is_close(l1, l2)
    _assert_grads(g1, g2)


@pytest.mark.parametrize("top_k", [None, 7])
def test_reverse_direction_matches_reference(top_k):
    batch, proj, W, zs, zt = _problem(5)
    l1, g1, _ = _lib(zs, zt, batch, proj, direction="reverse", top_k_columns=top_k)
    l2, g2, _ = _ref(zs, zt, batch, W, direction="reverse", top_k_columns=top_k)
    assert is_close(l1, l2)
    _assert_grads(g1, g2)


def test_all_chunks_and_explicit_columns_match_reference():
    batch, proj, W, zs, zt = _problem(7)
    cols = torch.tensor([3, 1, 9, 9, 30, 44, 48])  # duplicates and unreachable ids are dropped
    for public in (False, True):
        l1, g1, _ = _lib(zs, zt, batch, proj, columns=cols, public=public, correct_only=False)
        l2, g2, _ = _ref(zs, zt, batch, W, columns=cols.tolist(), public=public, correct_only=False)
        assert is_close(l1, l2)
        _assert_grads(g1, g2)


@pytest.fixture(scope="module")
def real():
    batch, idx, w, vs, vt = real_problem()
    # model output widths wider than the tokenizers (as Qwen3's 151,936 > 151,669)
    Vs, Vt = vs + 3, vt + 5
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = random_logits(11, (B, Ls, Vs))
    zt = random_logits(12, (B, Lt, Vt))
    # the teacher leans towards the tokens that actually follow, as a trained model would
    nxt = batch["teacher_0_input_ids"][:, 1:]
    zt[:, :-1].scatter_add_(2, nxt[..., None], torch.full(nxt.shape + (1,), 6.0, dtype=zt.dtype))
    proj = Projection.from_tensors(idx, w, teacher_width=vt)
    return batch, proj, dense_projection(idx, w, vs, vt), zs, zt


@pytest.mark.parametrize("public", [False, True])
@pytest.mark.parametrize("top_k", [None, 64])
def test_matches_reference_on_real_llama3_qwen3_alignment(real, public, top_k):
    batch, proj, W, zs, zt = real
    assert int(batch["alignment_0_pair_valid"].sum()) > 60
    l1, g1, m = _lib(zs, zt, batch, proj, public=public, top_k_columns=top_k, temperature=1.5)
    l2, g2, count = _ref(zs, zt, batch, W, public=public, top_k_columns=top_k, temperature=1.5)
    assert count > 50
    assert is_close(l1, l2)
    _assert_grads(g1, g2)
    assert set(m) >= {"kl", "teacher_mass_in_columns"}


def test_gradcheck_small():
    batch, proj, _, zs, zt = _problem(9, batch_size=2, num_chunks=(3, 4), vs=14, vt=16)
    for public in (False, True):
        for direction in (("forward",) if public else ("forward", "reverse")):
            def f(x):
                return pkl_loss(x, zt, batch, projection=proj, public=public, direction=direction,
                                top_k_columns=8, temperature=1.7, position_chunk_size=2)[0]
            x0 = zs.detach().clone().requires_grad_()
            assert torch.autograd.gradcheck(f, (x0,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_upstream_gradient_other_than_one():
    batch, proj, W, zs, zt = _problem(4)
    x = zs.detach().clone().requires_grad_()
    (pkl_loss(x, zt, batch, projection=proj)[0] * -2.5).backward()
    _, g_ref, _ = _ref(zs, zt, batch, W)
    _assert_grads(x.grad, -2.5 * g_ref)


# --- properties of the principled form --------------------------------------------------------


def _teacher_equal_to_projected_student(zs, batch, W, vt_width):
    """Teacher logits whose chunk-start distribution, renormalised over reachable columns, equals
    the student's projected one (unreachable columns get arbitrary logits)."""
    B, Lt = batch["teacher_0_input_ids"].shape
    zt = random_logits(99, (B, Lt, vt_width))
    from xtoken_loss.units import chunk_units

    u = chunk_units(batch, 0, B, zs.shape[1], Lt)
    reach = torch.zeros(vt_width, dtype=torch.bool)
    reach[: W.shape[1]] = W.sum(0) > 0
    Wp = torch.zeros(zs.shape[2], vt_width, dtype=torch.float64)
    Wp[: W.shape[0], : W.shape[1]] = W
    for s_row, t_row in zip(u.student_rows.tolist(), u.teacher_rows.tolist()):
        b, ps = divmod(s_row, zs.shape[1])
        _, pt = divmod(t_row, Lt)
        q = torch.softmax(zs[b, ps], 0) @ Wp
        zt[b, pt, reach] = torch.log(q[reach])
    return zt, u


@pytest.mark.parametrize("top_k", [None, 5])
def test_principled_kl_is_zero_when_student_equals_projected_teacher_and_positive_otherwise(top_k):
    batch, proj, W, zs, _ = _problem(13)
    zt, u = _teacher_equal_to_projected_student(zs, batch, W, VT)
    assert int(u.num_units) > 5
    for direction in ("forward", "reverse"):
        loss, _ = pkl_loss(zs, zt, batch, projection=proj, top_k_columns=top_k, direction=direction)
        assert abs(float(loss)) < 1e-12
        per_unit = []
        for j in range(int(u.num_units)):  # perturb one chunk start at a time: the KL becomes > 0
            z2 = zs.clone()
            b, p = divmod(int(u.student_rows[j]), zs.shape[1])
            z2[b, p, :5] += torch.tensor([1.0, -0.5, 0.3, 0.0, 2.0], dtype=torch.float64)
            per_unit.append(float(pkl_loss(z2, zt, batch, projection=proj, top_k_columns=top_k,
                                           direction=direction)[0]))
        assert min(per_unit) > 0


def test_principled_kl_is_nonnegative_on_random_inputs():
    for seed in range(5):
        batch, proj, _, zs, zt = _problem(20 + seed)
        for k in (None, 3, 12):
            kl = pkl_loss(zs, zt, batch, projection=proj, top_k_columns=k)[1]["kl"]
            assert float(kl) > 0


def _pad(batch, zs, zt, extra_s=4, extra_t=3):
    """The same batch with more padded positions (random logits there)."""
    out = {}
    for k, v in batch.items():
        if v.dim() == 2 and k.endswith(("chunk_id",)):
            fill = -1
        else:
            fill = 0
        if v.dim() == 2 and not k.startswith("alignment_0_pair") and k != "alignment_0_chunk_bytes":
            extra = extra_t if k.startswith(("teacher_0", "alignment_0_teacher")) else extra_s
            v = torch.cat([v, torch.full((v.shape[0], extra), fill, dtype=v.dtype)], dim=1)
        out[k] = v
    zs2 = torch.cat([zs, random_logits(7, (zs.shape[0], extra_s, zs.shape[2])) * 5], dim=1)
    zt2 = torch.cat([zt, random_logits(8, (zt.shape[0], extra_t, zt.shape[2])) * 5], dim=1)
    return out, zs2, zt2


def test_principled_is_invariant_to_padding_batch_order_and_chunk_size():
    batch, proj, _, zs, zt = _problem(31, batch_size=4)
    base = float(pkl_loss(zs, zt, batch, projection=proj, top_k_columns=6)[0])
    b2, zs2, zt2 = _pad(batch, zs, zt)
    assert is_close(pkl_loss(zs2, zt2, b2, projection=proj, top_k_columns=6)[0], base, 1e-12)
    perm = torch.tensor([2, 0, 3, 1])
    b3 = {k: v[perm] for k, v in batch.items()}
    assert is_close(pkl_loss(zs[perm], zt[perm], b3, projection=proj, top_k_columns=6)[0], base, 1e-12)
    for n in (1, 3, 1000):
        assert is_close(pkl_loss(zs, zt, batch, projection=proj, top_k_columns=6, position_chunk_size=n)[0],
                        base, 1e-12)


def test_public_form_depends_on_padding_through_its_column_choice():
    """Docs: the public form picks its columns from every position, padding included."""
    batch, proj, _, zs, zt = _problem(31, batch_size=4)
    b2, zs2, zt2 = _pad(batch, zs, zt)
    zt2[:, -1, :] = -50.0
    zt2[0, -1, 40] = 100.0  # a padded position's huge logit claims a column
    pub = [float(pkl_loss(z, t, b, projection=proj, top_k_columns=6, public=True)[0])
           for b, z, t in ((batch, zs, zt), (b2, zs2, zt2))]
    pri = [float(pkl_loss(z, t, b, projection=proj, top_k_columns=6)[0])
           for b, z, t in ((batch, zs, zt), (b2, zs2, zt2))]
    assert not is_close(pub[0], pub[1])
    assert is_close(pri[0], pri[1], 1e-12)


def test_public_form_can_be_negative_as_documented():
    """A chunk with two teacher positions: the public teacher side is the unnormalised geometric
    mean G of their distributions; a student matching G / sum(G) gets sum(G) log sum(G) < 0."""
    V = 6
    batch = {
        "input_ids": torch.tensor([[0, 1]]), "token_mask": torch.ones(1, 2, dtype=torch.bool),
        "teacher_0_input_ids": torch.tensor([[0, 1, 2]]), "teacher_0_token_mask": torch.ones(1, 3, dtype=torch.bool),
        "alignment_0_student_chunk_id": torch.tensor([[0, 1]]),
        "alignment_0_teacher_chunk_id": torch.tensor([[0, 1, 1]]),
        "alignment_0_pair_valid": torch.ones(1, 2, dtype=torch.bool),
        "alignment_0_pair_is_correct": torch.ones(1, 2, dtype=torch.bool),
    }
    proj = Projection.from_tensors(torch.arange(V)[:, None], torch.ones(V, 1))  # identity W
    zt = random_logits(1, (1, 3, V))
    log_g = torch.log_softmax(zt[0, :2], dim=-1).mean(0)
    zs = log_g.reshape(1, 1, V).repeat(1, 2, 1)
    loss, metrics = pkl_loss(zs, zt, batch, projection=proj, public=True, top_k_columns=None)
    z = float(torch.exp(log_g).sum())
    assert is_close(loss, z * torch.log(torch.tensor(z)))
    assert float(loss) < 0
    principled = pkl_loss(zs, zt, batch, projection=proj, top_k_columns=None)[0]
    assert float(principled) >= 0


# --- masking, dtypes, widths, errors -----------------------------------------------------------


@pytest.mark.parametrize("public", [False, True])
def test_all_masked_gives_zero_loss_and_zero_grads(public):
    batch, proj, _, zs, zt = _problem(2)
    for masked in ("sample", "tokens"):
        b = dict(batch)
        if masked == "sample":
            b["sample_mask"] = torch.zeros_like(batch["sample_mask"])
        else:
            b["token_mask"] = torch.zeros_like(batch["token_mask"])
        x = zs.clone().requires_grad_()
        loss, metrics = pkl_loss(x, zt, b, projection=proj, public=public)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.count_nonzero(x.grad) == 0
        assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("public", [False, True])
def test_masked_vocabulary_entries_are_exact(public):
    """-inf on the student's unmapped rows / extra width and on unreachable teacher columns."""
    batch, proj, W, zs, zt = _problem(6)
    zs = zs.clone()
    zs[..., VS - 3:] = float("-inf")
    unmapped = (W.sum(1) == 0).nonzero().squeeze(1)
    zs[..., unmapped] = float("-inf")
    zt = zt.clone()
    zt[..., VT - 5:] = float("-inf")
    l1, g1, _ = _lib(zs, zt, batch, proj, public=public, top_k_columns=9)
    l2, g2, _ = _ref(zs, zt, batch, W, public=public, top_k_columns=9)
    assert torch.isfinite(l1) and is_close(l1, l2)
    assert torch.isfinite(g1).all()
    _assert_grads(g1, g2)


def test_reverse_kl_is_inf_where_the_teacher_masks_what_the_student_projects_to():
    batch, proj, W, zs, zt = _problem(6)
    zt = zt.clone()
    zt[..., :] = float("-inf")
    zt[..., 0] = 0.0  # the teacher puts all its mass on one column
    loss = pkl_loss(zs, zt, batch, projection=proj, direction="reverse", top_k_columns=None)[0]
    assert float(loss) == float("inf")


@pytest.mark.parametrize("public", [False, True])
def test_bf16_is_finite_and_close_to_float32(public):
    batch, proj, _, zs, zt = _problem(8)
    out = {}
    zs, zt = zs.to(torch.bfloat16), zt.to(torch.bfloat16)  # same (bf16-representable) values for both runs
    for dt in (torch.float32, torch.bfloat16):
        x = zs.to(dt).clone().requires_grad_()
        loss, _ = pkl_loss(x, zt.to(dt), batch, projection=proj, public=public, top_k_columns=10)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and x.grad.dtype == dt
        out[dt] = (float(loss.detach()), x.grad.float())
    assert abs(out[torch.float32][0] - out[torch.bfloat16][0]) < 1e-5 * abs(out[torch.float32][0]) + 1e-6
    # the gradient is rounded to bf16 once, at the end
    torch.testing.assert_close(out[torch.bfloat16][1], out[torch.float32][1], rtol=1e-2, atol=1e-4)


def test_normalizer_and_metrics():
    batch, proj, W, zs, zt = _problem(12)
    loss, m = pkl_loss(zs, zt, batch, projection=proj, temperature=2.0)
    loss7, _ = pkl_loss(zs, zt, batch, projection=proj, temperature=2.0, normalizer=7)
    n = reference_pkl(zs, zt, batch, W, temperature=2.0)[1]  # valid chunks, counted by the reference
    assert is_close(loss7 * 7, loss * n)
    assert is_close(loss, 4.0 * m["kl"])  # T^2 * mean KL
    assert 0 < float(m["teacher_mass_in_columns"]) <= 1 + 1e-12
    assert 0 < float(m["student_mapped_mass"]) <= 1 + 1e-12


def test_process_group_max_reduces_column_scores(monkeypatch):
    import torch.distributed as dist

    batch, proj, W, zs, zt = _problem(14)
    calls = []

    def fake_all_reduce(t, op=None, group=None):
        calls.append((op, group))
        t[3] = 0.0  # another rank saw column 3 with probability 1: it must be chosen

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    group = object()
    with_group = pkl_loss(zs, zt, batch, projection=proj, top_k_columns=4, process_group=group)[0]
    assert calls == [(dist.ReduceOp.MAX, group)]
    top3 = reference_pkl(zs, zt, batch, W, top_k_columns=3)[2]
    assert 3 not in top3
    forced = reference_pkl(zs, zt, batch, W, columns=top3 + [3])[0]
    assert is_close(with_group, forced)


def test_errors_are_clear():
    batch, proj, _, zs, zt = _problem(1)
    bad = zs.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(LossInputError, match="NaN"):
        pkl_loss(bad, zt, batch, projection=proj, check_inputs=True)
    no_ids = {k: v for k, v in batch.items() if not k.endswith("input_ids")}  # else the ids' check speaks first
    with pytest.raises(LossInputError, match="student logits have 30 columns"):
        pkl_loss(zs[..., :30], zt, no_ids, projection=proj)
    with pytest.raises(LossInputError, match="teacher logits have 20 columns"):
        pkl_loss(zs, zt[..., :20], no_ids, projection=proj)
    with pytest.raises(LossInputError, match="alignment_0_student_chunk_id"):
        pkl_loss(zs[:, :-1], zt, batch, projection=proj)
    with pytest.raises(LossInputError, match="missing"):
        pkl_loss(zs, zt, {k: v for k, v in batch.items() if k != "alignment_0_pair_valid"}, projection=proj)
    with pytest.raises(LossOptionError, match="'forward', 'reverse'"):
        pkl_loss(zs, zt, batch, projection=proj, direction="sideways")
    with pytest.raises(LossOptionError, match="temperature"):
        pkl_loss(zs, zt, batch, projection=proj, temperature=0)
    with pytest.raises(LossInputError, match="top-k"):
        pkl_loss(zs, {"topk_logprobs": zt, "topk_indices": zt.long()}, batch, projection=proj)


def test_module_wrapper_matches_function():
    batch, proj, _, zs, zt = _problem(15)
    mod = PKLLoss(proj, temperature=1.5, top_k_columns=7)
    a = mod(zs, zt, batch)[0]
    b = pkl_loss(zs, zt, batch, projection=proj, temperature=1.5, top_k_columns=7)[0]
    assert float(a) == float(b)
    with pytest.raises(LossOptionError):
        PKLLoss(proj, direction="both")
