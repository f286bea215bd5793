"""Every loss on top-k teacher outputs (docs/losses.md, "Top-k teacher outputs"): P-KL, the learned
P-KL, ULD, H-KL, GOLD against their float64 top-k references (values and student gradients); with K =
the full teacher vocabulary each equals its full-logit loss (the exactness test, also for same-vocab
KL and ALM); the refusals (public, temperature, chunk form, tail cut, no rest_logprob); garbage in
empty slots and at positions no loss reads; NaN at a read position; the same-vocab KL's use of
`rest_logprob`; the multi-teacher scores and selection with a top-k teacher.

Hand-built batches (`synthetic_batch`) and the real llama3 x qwen3 alignment (the collator's chunks,
the builder's W, restricted to a small remapped vocabulary: `real_problem_with_exact_map`)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.reference_losses import (
    chunk_units,
    dense_projection,
    is_close,
    random_logits,
    random_projection,
    real_problem_with_exact_map,
    reference_alm,
    reference_hybrid_topk,
    reference_kl,
    reference_pkl_topk,
    reference_uld_topk,
    synthetic_batch,
    topk_outputs,
)
from xtoken_loss import (
    LearnedProjection,
    LossInputError,
    LossOptionError,
    Projection,
    alm_loss,
    gold_loss,
    hkl_loss,
    kl_loss,
    learned_pkl_loss,
    pkl_loss,
    uld_loss,
)
from xtoken_loss.losses.hybrid import CommonSet, common_by_threshold, hybrid_loss
from xtoken_loss.multi_teacher.scores import SCORES, teacher_score_sums

VS, VT = 40, 50  # logits widths; the projection covers VS - 3 rows and VT - 5 columns
F64 = torch.float64


def _problem(seed=0, *, vs=VS, vt=VT, batch_size=3):
    batch = synthetic_batch(seed, batch_size=batch_size, vocab_s=vs, vocab_t=vt)
    idx, w = random_projection(seed + 1, vs - 3, vt - 5)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = random_logits(seed + 2, (B, Ls, vs))
    zt = random_logits(seed + 3, (B, Lt, vt))
    proj = Projection.from_tensors(idx, w, teacher_width=vt - 5)
    return batch, proj, dense_projection(idx, w, vs - 3, vt - 5), zs, zt


@pytest.fixture(scope="module")
def real():
    """The real llama3 x qwen3 problem: batch, projection, dense W, exact map, logits (the teacher 5
    columns wider than the projection, as Qwen3's model output is wider than its tokenizer, and leaning
    towards the tokens that follow, as a trained model would)."""
    batch, idx, w, ex, vs, vt = real_problem_with_exact_map()
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = random_logits(21, (B, Ls, vs))
    zt = random_logits(22, (B, Lt, vt + 5))
    nxt = batch["teacher_0_input_ids"][:, 1:]
    zt[:, :-1].scatter_add_(2, nxt[..., None], torch.full(nxt.shape + (1,), 6.0, dtype=F64))
    proj = Projection.from_tensors(idx, w, teacher_width=vt)
    return batch, proj, dense_projection(idx, w, vs, vt), ex, zs, zt


def _run(fn, zs, *args, **kw):
    x = zs.detach().clone().requires_grad_()
    loss, metrics = fn(x, *args, **kw)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _ref(fn, zs, *args, **kw):
    x = zs.detach().clone().requires_grad_()
    loss, count = fn(x, *args, **kw)[:2]
    loss.backward()
    return loss.detach(), x.grad, count


def _close(a, b, tol=1e-6):
    assert is_close(a[0], b[0], tol), (float(a[0]), float(b[0]))
    torch.testing.assert_close(a[1], b[1], rtol=tol, atol=tol)


def _common(seed, vs, vt):
    """A `[V_s]` common map (teacher id or -1) with collisions (the lowest student id wins)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, vt - 5, (vs,), generator=g)
    return torch.where(torch.rand(vs, generator=g) < 0.5, m, torch.full_like(m, -1))


# -------------------------------------------------------------------------------------------------
# against the float64 references


@pytest.mark.parametrize("k", [4, 13])
@pytest.mark.parametrize("top_k_columns", [None, 6])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_pkl_matches_reference(k, top_k_columns, direction):
    batch, proj, W, zs, zt = _problem(3)
    top = topk_outputs(zt, k)
    kw = dict(top_k_columns=top_k_columns, direction=direction)
    lib = _run(pkl_loss, zs, top, batch, projection=proj, check_inputs=True, **kw)
    ref = _ref(reference_pkl_topk, zs, top, batch, W, **kw)
    assert ref[2] > 5
    _close(lib, ref)
    assert set(lib[2]) == {"kl", "teacher_mass_in_columns", "teacher_reachable_mass", "student_mapped_mass"}


def test_pkl_explicit_columns_and_every_chunk_match_reference():
    batch, proj, W, zs, zt = _problem(7)
    top = topk_outputs(zt, 9)
    cols = torch.tensor([3, 1, 9, 9, 30, 44, 48])  # duplicates and unreachable ids are dropped
    lib = _run(pkl_loss, zs, top, batch, projection=proj, columns=cols, correct_only=False)
    ref = _ref(reference_pkl_topk, zs, top, batch, W, columns=cols.tolist(), correct_only=False)
    _close(lib, ref)


def test_learned_pkl_matches_pkl_and_finite_differences():
    batch, proj, W, zs, zt = _problem(4)
    top = topk_outputs(zt, 7)
    lp = LearnedProjection(proj).double()
    with torch.no_grad():
        lp.theta.add_(torch.randn(lp.theta.shape, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.3)
    a = _run(learned_pkl_loss, zs, top, batch, projection=lp, top_k_columns=8)
    b = _run(pkl_loss, zs, top, batch, projection=lp.to_projection(), top_k_columns=8)
    _close(a, b)
    lp.zero_grad()
    loss, _ = learned_pkl_loss(zs, top, batch, projection=lp, top_k_columns=8)
    loss.backward()
    g = lp.theta.grad.clone()
    rows = [r for r in range(lp.num_rows) if int(lp.slot_mask[r].sum()) > 1][:3]
    for r in rows:
        e, h = torch.zeros_like(lp.theta), 1e-6
        e[r, 0] = h
        with torch.no_grad():
            lp.theta.add_(e)
            up = float(learned_pkl_loss(zs, top, batch, projection=lp, top_k_columns=8)[0])
            lp.theta.sub_(2 * e)
            down = float(learned_pkl_loss(zs, top, batch, projection=lp, top_k_columns=8)[0])
            lp.theta.add_(e)
        assert math.isclose(float(g[r, 0]), (up - down) / (2 * h), rel_tol=1e-5, abs_tol=1e-8)
    assert float(g.abs().sum()) > 0


@pytest.mark.parametrize("k", [3, 12])
@pytest.mark.parametrize("vs", [VS, 6])  # 6: a student narrower than the teacher's top-k
def test_uld_matches_reference(k, vs):
    batch, _, _, zs, zt = _problem(5, vs=vs)
    top = topk_outputs(zt, k)
    lib = _run(uld_loss, zs, top, batch, check_inputs=True)
    ref = _ref(reference_uld_topk, zs, top, batch)
    assert ref[2] > 5
    _close(lib, ref)


@pytest.mark.parametrize("k", [3, 12])
def test_hybrids_match_reference(k):
    batch, proj, W, zs, zt = _problem(6)
    top = topk_outputs(zt, k)
    cs = CommonSet.from_map(_common(1, VS, VT))
    pairs = (cs.student_ids, cs.teacher_ids)
    lib = _run(gold_loss, zs, top, batch, common=cs, common_weight=0.7, uncommon_weight=1.3, check_inputs=True)
    ref = _ref(reference_hybrid_topk, zs, top, batch, pairs, common_weight=0.7, uncommon_weight=1.3)
    _close(lib, ref)
    h = common_by_threshold(proj, 0.6)
    lib = _run(hkl_loss, zs, top, batch, projection=proj)
    ref = _ref(reference_hybrid_topk, zs, top, batch, (h.student_ids, h.teacher_ids))
    _close(lib, ref)
    assert set(lib[2]) == {"common_kl", "uncommon_l1", "teacher_common_mass", "student_common_mass"}


def test_real_alignment_matches_references(real):
    """bf16-rounded top-16 outputs (as a cache stores them) on the real llama3 x qwen3 alignment."""
    batch, proj, W, ex, zs, zt = real
    top = topk_outputs(zt, 16, dtype=torch.bfloat16)
    assert int(batch["alignment_0_pair_valid"].sum()) > 60
    lib = _run(pkl_loss, zs, top, batch, projection=proj, top_k_columns=64)
    ref = _ref(reference_pkl_topk, zs, top, batch, W, top_k_columns=64)
    assert ref[2] > 50
    _close(lib, ref)
    _close(_run(uld_loss, zs, top, batch), _ref(reference_uld_topk, zs, top, batch))
    cs = CommonSet.from_map(ex)
    assert cs.size > 100
    _close(_run(gold_loss, zs, top, batch, common=ex),
           _ref(reference_hybrid_topk, zs, top, batch, (cs.student_ids, cs.teacher_ids)))


# -------------------------------------------------------------------------------------------------
# K = the full teacher vocabulary: the full-logit loss, exactly


def _full_cases(real):
    batch, proj, W, ex, zs, zt = real
    lp = LearnedProjection(proj).double()
    hk = common_by_threshold(proj, 0.6)
    return {
        "pkl": lambda z, t, **kw: pkl_loss(z, t, batch, projection=proj, top_k_columns=None, **kw),
        "pkl_top64_reverse": lambda z, t, **kw: pkl_loss(z, t, batch, projection=proj, top_k_columns=64,
                                                         direction="reverse", **kw),
        "learned_pkl": lambda z, t, **kw: learned_pkl_loss(z, t, batch, projection=lp, top_k_columns=64, **kw),
        "uld": lambda z, t, **kw: uld_loss(z, t, batch, **kw),
        "hkl": lambda z, t, **kw: hybrid_loss(z, t, batch, common=hk, common_weight=0.7, uncommon_weight=1.3,
                                              loss_name="hkl", **kw),
        "gold": lambda z, t, **kw: gold_loss(z, t, batch, common=ex, **kw),
        "alm": lambda z, t, **kw: alm_loss(z, t, batch, **kw),
    }


@pytest.mark.parametrize("name", ["pkl", "pkl_top64_reverse", "learned_pkl", "uld", "hkl", "gold", "alm"])
def test_full_vocabulary_topk_equals_full_logits(real, name):
    batch, proj, W, ex, zs, zt = real
    fn = _full_cases(real)[name]
    top = topk_outputs(zt, zt.shape[-1], ids=batch["teacher_0_input_ids"])
    full = _run(fn, zs, zt)
    topk = _run(fn, zs, top)
    _close(topk, full, 1e-9)
    for key, value in full[2].items():
        assert is_close(topk[2][key], value, 1e-9), key
    if name == "learned_pkl":  # theta's gradient too
        lp = LearnedProjection(proj).double()
        grads = []
        for t in (zt, top):
            lp.zero_grad()
            learned_pkl_loss(zs, t, batch, projection=lp, top_k_columns=64)[0].backward()
            grads.append(lp.theta.grad.clone())
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_full_vocabulary_same_vocab_kl(direction):
    batch, _, _, zs, _ = _problem(8)
    zt = random_logits(9, zs.shape)
    full = _run(kl_loss, zs, zt, batch, direction=direction)
    topk = _run(kl_loss, zs, topk_outputs(zt, VS), batch, direction=direction)
    _close(topk, full, 1e-9)


# -------------------------------------------------------------------------------------------------
# refusals


def _refusal_calls(batch, proj, zs):
    lp = LearnedProjection(proj).double()
    cs = CommonSet.from_map(_common(1, VS, VT))
    return {
        "pkl": lambda t, **kw: pkl_loss(zs, t, batch, projection=proj, **kw),
        "learned_pkl": lambda t, **kw: learned_pkl_loss(zs, t, batch, projection=lp, **kw),
        "uld": lambda t, **kw: uld_loss(zs, t, batch, **kw),
        "hkl": lambda t, **kw: hkl_loss(zs, t, batch, projection=proj, **kw),
        "gold": lambda t, **kw: gold_loss(zs, t, batch, common=cs, **kw),
    }


@pytest.mark.parametrize("kind", ["pkl", "learned_pkl", "uld", "hkl", "gold"])
def test_refusals_are_one_line(kind):
    batch, proj, _, zs, zt = _problem(10)
    call = _refusal_calls(batch, proj, zs)[kind]
    top = topk_outputs(zt, 5)
    cases = [({"temperature": 2.0}, r"temperature=2.0 with top-k teacher outputs: their log-probabilities are at "
                                    r"temperature 1")]
    if kind != "learned_pkl":
        cases.append(({"public": True}, r"public=True reads the teacher's whole distribution .* outputs are top-k"))
    if kind in ("uld", "hkl", "gold"):
        cases += [({"chunk_form": "chain"}, r"chunk_form='chain' with top-k teacher outputs"),
                  ({"tail_cut": 5}, r"tail_cut=5 with top-k teacher outputs")]
    for kw, msg in cases:
        with pytest.raises(LossOptionError, match=rf"^{kind}: {msg}") as err:
            call(top, **kw)
        assert "\n" not in str(err.value)
    no_rest = {k: v for k, v in top.items() if k != "rest_logprob"}
    with pytest.raises(LossInputError, match=rf"^{kind}: teacher_outputs have no 'rest_logprob'"):
        call(no_rest)
    bad_ids = dict(top, topk_indices=top["topk_indices"].clone())
    bad_ids["topk_indices"][:, :, 0] = -3
    with pytest.raises(LossInputError, match=rf"^{kind}: topk_indices hold ids in \[-3, "):
        call(bad_ids)


def test_same_vocab_kl_temperature_needs_renormalize():
    batch, _, _, zs, _ = _problem(11)
    top = topk_outputs(random_logits(12, zs.shape), 6)
    with pytest.raises(LossOptionError, match="temperature != 1 with top-k teacher log-probs needs "
                                              "tail='renormalize'"):
        kl_loss(zs, top, batch, temperature=2.0)
    kl_loss(zs, top, batch, temperature=2.0, tail="renormalize")  # conditioned on the listed ids: any T


# -------------------------------------------------------------------------------------------------
# empty slots, unread positions and NaN


def _read_rows(batch, Ls, Lt, kind):
    """Flat student and teacher rows a loss of `kind` reads (from the reference's reading of the batch)."""
    if kind == "kl":
        tm = batch["token_mask"]
        rows = {b * Ls + p for b in range(tm.shape[0]) for p in range(Ls - 1)
                if bool(tm[b, p]) and bool(tm[b, p + 1]) and bool(batch["sample_mask"][b])}
        return rows, rows
    starts = kind != "alm"
    units = chunk_units(batch, 0, Ls, Lt, starts=starts)
    if starts:
        return {b * Ls + sp[0] for b, _, sp, _ in units}, {b * Lt + tp[0] for b, _, _, tp in units}
    return {b * Ls + p for b, _, sp, _ in units for p in sp}, {b * Lt + p for b, _, _, tp in units for p in tp}


def _kinds(batch, proj, zs_shape):
    lp = LearnedProjection(proj).double()
    cs = CommonSet.from_map(_common(1, VS, VT))
    return {
        "pkl": lambda z, t, **kw: pkl_loss(z, t, batch, projection=proj, top_k_columns=9, **kw),
        "learned_pkl": lambda z, t, **kw: learned_pkl_loss(z, t, batch, projection=lp, top_k_columns=9, **kw),
        "uld": lambda z, t, **kw: uld_loss(z, t, batch, **kw),
        "hkl": lambda z, t, **kw: hkl_loss(z, t, batch, projection=proj, **kw),
        "gold": lambda z, t, **kw: gold_loss(z, t, batch, common=cs, **kw),
        "kl": lambda z, t, **kw: kl_loss(z, t, batch, **kw),
        "alm": lambda z, t, **kw: alm_loss(z, t, batch, **kw),
    }


def _teacher_for(kind, batch, zs, zt, k=6):
    if kind == "kl":
        return topk_outputs(random_logits(31, zs.shape), k, ids=batch["input_ids"])
    return topk_outputs(zt, k, ids=batch["teacher_0_input_ids"])


def _with_empty_slots(top, value):
    """Slots 1 and 4 of every position emptied (-1), holding `value`."""
    out = {k: v.clone() for k, v in top.items()}
    out["topk_indices"][:, :, [1, 4]] = -1
    out["topk_logprobs"][:, :, [1, 4]] = value
    return out


@pytest.mark.parametrize("kind", ["pkl", "learned_pkl", "uld", "hkl", "gold", "kl", "alm"])
def test_empty_slots_and_unread_positions_never_matter(kind):
    batch, proj, _, zs, zt = _problem(12)
    fn = _kinds(batch, proj, zs.shape)[kind]
    B, Ls, Lt = zs.shape[0], zs.shape[1], zt.shape[1]
    s_read, t_read = _read_rows(batch, Ls, Lt, kind)
    top = _teacher_for(kind, batch, zs, zt)
    clean = _with_empty_slots(top, float("-inf"))
    dirty = _with_empty_slots(top, float("nan"))
    dirty["topk_logprobs"][:, :, 4] = float("inf")
    L = Ls if kind == "kl" else Lt
    unread = [r for r in range(B * L) if r not in t_read]
    assert unread and len(t_read) > 5
    for key, value in (("topk_logprobs", float("nan")), ("rest_logprob", float("nan")),
                       ("target_logprob", float("inf")), ("topk_indices", 10 ** 9)):
        flat = dirty[key].reshape(B * L, -1)
        flat[unread] = value
    dirty["topk_indices"].reshape(B * L, -1)[unread[::2], 0] = -7
    z_dirty = zs.clone()
    s_unread = [r for r in range(B * Ls) if r not in s_read]
    z_dirty.reshape(B * Ls, -1)[s_unread] = float("nan")
    a = _run(fn, zs, clean)
    b = _run(fn, z_dirty, dirty)
    assert math.isfinite(float(b[0]))
    assert float(a[0]) == float(b[0])
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    assert float(b[1].reshape(B * Ls, -1)[s_unread].abs().sum()) == 0.0
    for key in a[2]:
        assert float(a[2][key]) == float(b[2][key]), key


@pytest.mark.parametrize("kind", ["pkl", "learned_pkl", "uld", "hkl", "gold", "kl"])
def test_nan_at_a_read_position_is_never_finite(kind):
    batch, proj, _, zs, zt = _problem(13)
    fn = _kinds(batch, proj, zs.shape)[kind]
    B, Ls, Lt = zs.shape[0], zs.shape[1], zt.shape[1]
    _, t_read = _read_rows(batch, Ls, Lt, kind)
    r = min(t_read)
    L = Ls if kind == "kl" else Lt
    top = _teacher_for(kind, batch, zs, zt)
    for key, slot, value, name in (("topk_logprobs", 2, float("nan"), "topk_logprobs"),
                                   ("topk_logprobs", 0, float("inf"), "topk_logprobs"),
                                   ("rest_logprob", None, float("nan"), "rest_logprob"),
                                   ("rest_logprob", None, float("inf"), "rest_logprob")):
        bad = {k: v.clone() for k, v in top.items()}
        flat = bad[key].reshape(B * L, -1)
        flat[r, slot if slot is not None else 0] = value
        loss, _ = fn(zs, bad)
        assert math.isnan(float(loss.detach())), (key, value)
        with pytest.raises(LossInputError, match=rf"{name} holds (NaN|.*\+inf).* at sample {r // L}, position "
                                                 rf"{r % L} \(a position the loss reads\)"):
            fn(zs, bad, check_inputs=True)
    if kind != "kl":  # a read row without any mass (every listed value and the rest -inf)
        bad = {k: v.clone() for k, v in top.items()}
        bad["topk_logprobs"].reshape(B * L, -1)[r] = float("-inf")
        bad["rest_logprob"].reshape(B * L)[r] = float("-inf")
        assert math.isnan(float(fn(zs, bad)[0].detach()))
        with pytest.raises(LossInputError, match="no mass"):
            fn(zs, bad, check_inputs=True)


# -------------------------------------------------------------------------------------------------
# same-vocab KL with rest_logprob


def _reference_kl_rest(zs, top, batch, direction):
    """Same-vocab KL, the teacher as its listed probabilities plus exp(rest_logprob), renormalised."""
    z = zs.to(F64)
    B, L, V = z.shape
    total, count = torch.zeros((), dtype=F64), 0
    for b in range(B):
        for p in range(L - 1):
            if not (bool(batch["token_mask"][b, p]) and bool(batch["token_mask"][b, p + 1])
                    and bool(batch["sample_mask"][b])):
                continue
            count += 1
            ids = [int(i) for i in top["topk_indices"][b, p]]
            P = torch.cat([torch.exp(top["topk_logprobs"][b, p].to(F64)), torch.exp(top["rest_logprob"][b, p].to(F64))
                           .reshape(1)])
            P = P / P.sum()
            q = torch.softmax(z[b, p], dim=0)
            rest = torch.ones(V, dtype=torch.bool)
            rest[ids] = False
            Q = torch.cat([q[ids], q[rest].sum().reshape(1)])
            A, Bv = (P, Q) if direction == "forward" else (Q, P)
            total = total + (A * (torch.log(A) - torch.log(Bv))).sum()
    return total / count, count


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_same_vocab_kl_reads_rest_logprob(direction):
    batch, _, _, zs, _ = _problem(14)
    top = topk_outputs(random_logits(15, zs.shape), 6, dtype=torch.bfloat16)  # rounded, as a cache stores it
    _close(_run(kl_loss, zs, top, batch, direction=direction), _ref(_reference_kl_rest, zs, top, batch, direction))
    # without rest_logprob: 1 - sum exp(topk_logprobs), as before
    no_rest = {k: v for k, v in top.items() if k != "rest_logprob"}
    _close(_run(kl_loss, zs, no_rest, batch, direction=direction),
           _ref(reference_kl, zs, no_rest, batch, direction=direction))


# -------------------------------------------------------------------------------------------------
# ALM and the multi-teacher scores


def test_alm_takes_target_logprob(real):
    batch, _, _, _, zs, zt = real
    top = topk_outputs(zt, 4, ids=batch["teacher_0_input_ids"], dtype=torch.bfloat16)
    target = {"target_logprob": top["target_logprob"]}
    _close(_run(alm_loss, zs, target, batch, divergence="kl"),
           _ref(reference_alm, zs, {**target, "logits": None}, batch, divergence="kl"))


def test_scores_on_topk_outputs(real):
    batch, _, _, _, _, zt = real
    ids = batch["teacher_0_input_ids"]
    full = topk_outputs(zt, zt.shape[-1], ids=ids)
    for score in SCORES:
        a = teacher_score_sums(zt, batch, score=score, teacher_index=0)
        b = teacher_score_sums(full, batch, score=score, teacher_index=0)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # entropy at K < V: the coarsened distribution, the rest read from rest_logprob
    top = topk_outputs(zt, 5, ids=ids, dtype=torch.bfloat16)
    sums, counts = teacher_score_sums(top, batch, score="entropy", teacher_index=0)
    p = torch.cat([torch.exp(top["topk_logprobs"].to(F64)), torch.exp(top["rest_logprob"].to(F64))[..., None]], -1)
    ent = -(p * torch.log(p)).sum(-1)
    tm = batch["teacher_0_token_mask"]
    valid = torch.zeros_like(tm)
    valid[:, :-1] = tm[:, :-1] & tm[:, 1:]
    torch.testing.assert_close(sums, torch.where(valid, ent, 0.0).sum(1))
    assert torch.equal(counts, valid.sum(1).to(F64))


@pytest.mark.parametrize("config", [dict(mode="select_teacher"), dict(weighting="dynamic", score="bpb", alpha=2.0)])
def test_multi_teacher_with_a_topk_teacher(config):
    """A cross-tokenizer P-KL teacher given as top-k outputs (K = its full vocabulary) and a same-vocab
    teacher: scores (bits per byte from target_logprob), weights / selection and the loss equal the
    full-logit run."""
    from tests.test_multi_teacher import problem_logits, teacher_specs
    from tests.test_multi_teacher import real_problem as mt_problem
    from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig, MultiTeacherLoss

    batch, proj, Vs, Vt, info = mt_problem()
    zs, z0, z1 = problem_logits(bonus0=(3.0,) * 4, bonus1=(1.0,) * 4)
    mt = MultiTeacherLoss(teacher_specs(), MultiTeacherConfig(**config), student_fingerprint=info["llama"],
                          student_vocab_size=info["V_llama"], process_group=None)
    t0 = topk_outputs(z0, Vt, ids=batch["teacher_0_input_ids"])
    a = _run(mt, zs, [z0, z1], batch)
    b = _run(mt, zs, [t0, z1], batch)
    _close(b, a, 1e-9)
    for key, value in a[2].items():
        assert is_close(b[2][key], value, 1e-9), key


# -------------------------------------------------------------------------------------------------
# low precision


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spread", ["spike", "std12"])
def test_low_precision_student_stays_finite_and_close(real, dtype, spread):
    """A +100 student spike or std-12 student logits in float32 / bf16: every top-k form stays finite
    and within 1e-3 of float64 on the same (rounded) inputs, gradients included."""
    batch, proj, W, ex, zs, zt = real
    z = zs * 4.0 if spread == "std12" else zs.clone()
    if spread == "spike":
        z[..., 7] += 100.0
    z = z.to(dtype)
    top = topk_outputs(zt * 2.0, 16, dtype=torch.bfloat16)
    hk = common_by_threshold(proj, 0.6)
    for fn in (lambda x: pkl_loss(x, top, batch, projection=proj, top_k_columns=64),
               lambda x: pkl_loss(x, top, batch, projection=proj, direction="reverse"),
               lambda x: uld_loss(x, top, batch),
               lambda x: hybrid_loss(x, top, batch, common=hk, loss_name="hkl"),
               lambda x: gold_loss(x, top, batch, common=ex)):
        lo = _run(fn, z)
        hi = _run(fn, z.to(F64))
        assert math.isfinite(float(lo[0])) and bool(torch.isfinite(lo[1]).all())
        assert is_close(lo[0], hi[0], 1e-3), (float(lo[0]), float(hi[0]))
        scale = float(hi[1].abs().max())
        assert scale > 0
        atol = (1e-4 if dtype == torch.float32 else 1e-2) * scale  # bf16 gradients carry 8 bits
        torch.testing.assert_close(lo[1].to(F64), hi[1], rtol=0, atol=atol)


def test_modules_and_kd_ce_take_topk():
    from xtoken_loss import GOLDLoss, HKLLoss, LearnedPKLLoss, PKLLoss, ULDLoss, kd_ce_loss

    batch, proj, _, zs, zt = _problem(16)
    top = topk_outputs(zt, 8)
    cmap = _common(1, VS, VT)
    pairs = [
        (PKLLoss(proj, top_k_columns=9), lambda: pkl_loss(zs, top, batch, projection=proj, top_k_columns=9)),
        (LearnedPKLLoss(proj).double(), lambda: pkl_loss(zs, top, batch, projection=proj)),
        (ULDLoss(), lambda: uld_loss(zs, top, batch)),
        (HKLLoss(proj), lambda: hkl_loss(zs, top, batch, projection=proj)),
        (GOLDLoss(cmap), lambda: gold_loss(zs, top, batch, common=cmap)),
    ]
    for module, fn in pairs:
        assert is_close(module(zs, top, batch)[0], fn()[0]), type(module).__name__  # learned: softmax(log W)
    loss, m = kd_ce_loss(zs, top, batch, kd="pkl", kd_options={"projection": proj, "top_k_columns": 9})
    assert is_close(m["kd_kl"], pkl_loss(zs, top, batch, projection=proj, top_k_columns=9)[1]["kl"], 1e-12)
    with pytest.raises(LossOptionError, match=r"^pkl: public=True reads the teacher's whole distribution"):
        kd_ce_loss(zs, top, batch, kd="pkl", public=True, kd_options={"projection": proj})


def test_scores_and_projection_accuracy_ignore_empty_slots_and_unread_positions(real):
    from xtoken_loss.multi_teacher.scores import projection_accuracy_counts

    batch, proj, W, _, zs, zt = real
    B, Ls = zs.shape[:2]
    Lt = zt.shape[1]
    zt = zt.clone()  # the teacher agrees with the projected student at the chunk starts: hits to count
    for b, _c, sp, tp in chunk_units(batch, 0, Ls, Lt, starts=True):
        zt[b, tp[0], int((torch.softmax(zs[b, sp[0]], 0) @ W).argmax())] += 50.0
    top = topk_outputs(zt, 6, ids=batch["teacher_0_input_ids"])
    clean = _with_empty_slots(top, float("-inf"))
    dirty = _with_empty_slots(top, float("nan"))
    tm = batch["teacher_0_token_mask"]
    unread = ~torch.cat([tm[:, :-1] & tm[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], dim=1)
    for key in ("topk_logprobs", "rest_logprob", "target_logprob"):
        dirty[key][unread] = float("nan")
    assert bool(unread.any())
    for score in SCORES:
        a = teacher_score_sums(clean, batch, score=score, teacher_index=0)
        b = teacher_score_sums(dirty, batch, score=score, teacher_index=0)
        assert all(bool(torch.isfinite(x).all()) for x in b), score
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    hits = [projection_accuracy_counts(zs, t, batch, proj, teacher_index=0) for t in (clean, dirty)]
    assert float(hits[0][0]) == float(hits[1][0]) and float(hits[0][0]) > 0


@pytest.mark.parametrize("kind", ["pkl", "learned_pkl", "uld", "hkl", "gold"])
def test_all_masked_batch_gives_zero_loss_and_zero_gradient(kind):
    batch, proj, _, zs, zt = _problem(17)
    batch = dict(batch, sample_mask=torch.zeros_like(batch["sample_mask"]))
    loss, grad, metrics = _run(_kinds(batch, proj, zs.shape)[kind], zs, topk_outputs(zt, 5))
    assert float(loss) == 0.0 and float(grad.abs().sum()) == 0.0
    assert all(float(v) == 0.0 for v in metrics.values())
