"""H-KL and GOLD hybrid (`xtoken_loss.losses.hybrid`) against the float64 dense reference, on hand-built
batches and on a restricted, remapped real llama3 x qwen3 problem (real alignment from the collator,
real projection from the builder, real exact map); the collision rule; the principled common-set KL
is a true KL (>= 0, zero at equality); the public form's partial KL can go negative; gradients."""

from __future__ import annotations

import pytest
import torch

from tests.reference_losses import (
    chunk_units,
    dense_projection,
    is_close,
    random_logits,
    random_projection,
    real_problem_with_exact_map,
    reference_common_by_threshold,
    reference_hybrid,
    synthetic_batch,
)
from tests.reference_nemo import nemo_exact_map, nemo_gold
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.losses.hybrid import CommonSet, common_by_threshold, common_exact, gold_loss, hkl_loss, hybrid_loss


def _shapes(batch):
    return batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]


def _check(fn, batch, zs, zt, common_ref, ref_vocab=(None, None), **opt):
    """`fn` against the reference; `ref_vocab`: the (student, teacher) vocabulary sizes the public
    reference reads (the projection's, when the public loss builds its common set from one)."""
    zs = zs.clone().requires_grad_()
    loss, metrics = fn(zs, zt, batch, **opt)
    (loss * 1.7).backward()
    zr = zs.detach().clone().requires_grad_()
    if opt.get("public"):
        ref, count = nemo_gold(zr, zt, batch, common_ref, student_vocab_size=ref_vocab[0],
                               teacher_vocab_size=ref_vocab[1], temperature=opt.get("temperature", 1.0),
                               uncommon_topk=opt.get("tail_cut") or 8192,
                               common_weight=opt.get("common_weight", 1.0),
                               uncommon_weight=opt.get("uncommon_weight", 1.0))
    else:
        keep = ("temperature", "common_weight", "uncommon_weight", "tail_cut", "normalizer", "chunk_form")
        ref, count = reference_hybrid(zr, zt, batch, common_ref, **{k: v for k, v in opt.items() if k in keep})
    (ref * 1.7).backward()
    assert is_close(loss, ref), (float(loss), float(ref))
    assert torch.allclose(zs.grad, zr.grad, atol=1e-6, rtol=1e-6), (zs.grad - zr.grad).abs().max()
    return loss, metrics, count


def test_collision_rule_and_threshold():
    idx = torch.tensor([[3, 1, -1], [3, -1, -1], [1, 2, -1], [3, 0, -1], [2, 0, -1], [0, -1, -1]])
    w = torch.tensor([[0.7, 0.3, 0], [1.0, 0, 0], [0.5, 0.5, 0], [1.0, 0, 0], [0.6, 0.4, 0], [1.0, 0, 0]])
    cs = common_by_threshold((idx, w), 0.6)
    # column 3: rows 0 (0.7), 1 (1.0), 3 (1.0) -> row 1 (largest, then lowest id); row 2 < 0.6; row 4 = 0.6 kept
    assert cs.student_ids.tolist() == [1, 4, 5] and cs.teacher_ids.tolist() == [3, 2, 0]
    ref = reference_common_by_threshold(dense_projection(idx, w, 6, 4), 0.6)
    assert (cs.student_ids.tolist(), cs.teacher_ids.tolist()) == (ref[0], ref[1])
    m = CommonSet.from_map(torch.tensor([2, -1, 2, 0]))
    assert m.student_ids.tolist() == [0, 3] and m.teacher_ids.tolist() == [2, 0]
    with pytest.raises(LossOptionError, match="threshold"):
        common_by_threshold((idx, w), 1.5)


@pytest.mark.parametrize("public", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_hkl_matches_reference_synthetic(seed, public):
    batch = synthetic_batch(seed)
    Ls, Lt = _shapes(batch)
    idx, w = random_projection(seed, 40, 50)
    zs, zt = random_logits(seed + 1, (3, Ls, 40)), random_logits(seed + 2, (3, Lt, 50))
    ref_common = reference_common_by_threshold(dense_projection(idx, w, 40, 50), 0.6)
    vocab = (40, int(idx.max()) + 1)  # a projection from bare tensors: its teacher vocabulary ends at its last id
    if public:
        ref_common = nemo_exact_map(idx, w, vocab[1], xtoken_loss=True)[:2]
    assert len(ref_common[0]) > 3
    _check(hkl_loss, batch, zs, zt, ref_common, vocab, projection=(idx, w), public=public,
           temperature=2.0 if seed else 1.0, tail_cut=17 if public else None, position_chunk_size=2)


def test_hybrid_other_chunk_forms_match_reference():
    batch = synthetic_batch(7)
    Ls, Lt = _shapes(batch)
    cs = CommonSet.from_map(torch.arange(40) % 45)
    zs, zt = random_logits(1, (3, Ls, 40)), random_logits(2, (3, Lt, 50))
    _check(hybrid_loss, batch, zs, zt, (cs.student_ids, cs.teacher_ids), common=cs, chunk_form="mean_log",
           temperature=1.5)
    with pytest.raises(LossOptionError, match="mean_log"):  # the public form is NeMo-RL's, chunk means only
        hybrid_loss(zs, zt, batch, common=cs, public=True, chunk_form="start")


@pytest.mark.parametrize("public", [False, True])
def test_hkl_and_gold_match_reference_real_vocab(public):
    batch, idx, w, ex, Vs, Vt = real_problem_with_exact_map()
    Ls, Lt = _shapes(batch)
    zs, zt = random_logits(11, (3, Ls, Vs)), random_logits(12, (3, Lt, Vt))
    cs = common_by_threshold((idx, w), 0.6)
    ref_common = reference_common_by_threshold(dense_projection(idx, w, Vs, Vt), 0.6)
    assert (cs.student_ids.tolist(), cs.teacher_ids.tolist()) == tuple(ref_common)
    vocab = (Vs, int(idx.max()) + 1)
    if public:
        ref_common = nemo_exact_map(idx, w, vocab[1], xtoken_loss=True)[:2]
    _, m, count = _check(hkl_loss, batch, zs, zt, ref_common, vocab, projection=(idx, w), public=public,
                         common_weight=0.7, uncommon_weight=1.3, tail_cut=64 if public else None)
    assert count > 50
    exact = CommonSet.from_map(ex)
    assert exact.size > 100
    _check(gold_loss, batch, zs, zt, (exact.student_ids, exact.teacher_ids), common=ex, public=public)


def test_principled_common_kl_is_a_true_kl():
    batch, idx, w, ex, Vs, Vt = real_problem_with_exact_map()
    Ls, Lt = _shapes(batch)
    cs = CommonSet.from_map(ex)
    for seed in range(3):
        zs, zt = random_logits(seed, (3, Ls, Vs)), random_logits(seed + 50, (3, Lt, Vt))
        _, m = gold_loss(zs, zt, batch, common=cs)
        assert float(m["common_kl"]) > 0
        _, mp = gold_loss(zs, zt, batch, common=cs, public=True)
        # the public partial KL is not a KL: scaling the student up on the common set drives it negative
    # equality: the student's common-set conditional equals the teacher's -> common KL 0, and with the
    # uncommon entries matched too the whole loss is 0
    zs = random_logits(7, (3, Ls, Vs))
    zt = torch.full((3, Lt, Vt), -30.0, dtype=torch.float64)
    s_ids, t_ids = cs.student_ids, cs.teacher_ids
    units = chunk_units(batch, 0, Ls, Lt)
    unc_s = torch.ones(Vs, dtype=torch.bool)
    unc_s[s_ids] = False
    unc_t = torch.ones(Vt, dtype=torch.bool)
    unc_t[t_ids] = False
    n_unc = int(min(unc_s.sum(), unc_t.sum()))
    zs[..., torch.nonzero(unc_s).squeeze(1)[n_unc:]] = float("-inf")
    for b, _c, sp, tp in units:
        zt[b, tp[0], t_ids] = zs[b, sp[0], s_ids]
        zt[b, tp[0], torch.nonzero(unc_t).squeeze(1)[:n_unc]] = zs[b, sp[0], torch.nonzero(unc_s).squeeze(1)[:n_unc]]
    unc_t_rest = torch.nonzero(unc_t).squeeze(1)[n_unc:]
    zt[..., unc_t_rest] = float("-inf")
    loss, m = gold_loss(zs, zt, batch, common=cs)
    assert abs(float(m["common_kl"])) < 1e-12 and abs(float(loss)) < 1e-9


def test_public_partial_kl_can_be_negative():
    batch = synthetic_batch(4)
    Ls, Lt = _shapes(batch)
    cs = CommonSet.from_map(torch.arange(40) % 50)
    # every position has the same logits; the teacher's common-set distribution is proportional to
    # the student's, but the teacher keeps most of its mass outside the common set: sum p log(p / q)
    # = P log P < 0 with P the teacher's common mass
    vec = random_logits(2, (40,))
    zs = vec.expand(3, Ls, 40).clone()
    zt = torch.full((3, Lt, 50), 3.0 + float(vec.max()), dtype=torch.float64)
    zt[..., :40] = vec
    _, pub = hybrid_loss(zs, zt, batch, common=cs, public=True)
    _, pri = hybrid_loss(zs, zt, batch, common=cs)
    # same conditional distribution on the common set: the true KL is 0, the public partial KL negative
    assert float(pub["common_kl"]) < -0.01 and abs(float(pri["common_kl"])) < 1e-12


def test_gold_from_artifact_row_kind(tmp_path):
    import json

    from safetensors.torch import save_file

    idx = torch.tensor([[2, -1], [0, 1], [1, -1]])
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0]])
    side = {"name": None, "fingerprint": None, "vocab_size": 3, "model_vocab_size": 3}
    (tmp_path / "projection.json").write_text(json.dumps({
        "schema_version": 1, "kind": "projection", "direction": "student_to_teacher", "top_k": 2,
        "student": side, "teacher": side}))
    save_file({"indices": idx, "weights": w, "row_kind": torch.tensor([1, 3, 2], dtype=torch.uint8)},
              str(tmp_path / "projection.safetensors"))
    cs = common_exact(tmp_path)
    assert cs.student_ids.tolist() == [0] and cs.teacher_ids.tolist() == [2]
    save_file({"indices": idx, "weights": w}, str(tmp_path / "projection.safetensors"))
    with pytest.raises(Exception, match="row_kind"):
        common_exact(tmp_path)


def test_hybrid_gradcheck_errors_and_masking():
    batch = synthetic_batch(2, batch_size=2, num_chunks=(3, 4), vocab_s=6, vocab_t=7)
    Ls, Lt = _shapes(batch)
    zs = random_logits(3, (2, Ls, 6)).requires_grad_()
    zt = random_logits(4, (2, Lt, 7))
    cs = CommonSet.from_map(torch.tensor([0, 3, -1, 1, -1, 5]))
    for public in (False, True):
        assert torch.autograd.gradcheck(lambda z: hybrid_loss(z, zt, batch, common=cs, public=public)[0], (zs,))
    with pytest.raises(LossInputError, match="wide"):
        hybrid_loss(zs, zt, batch, common=CommonSet.from_map(torch.tensor([9])))
    with pytest.raises(LossOptionError, match="projection"):
        hkl_loss(zs, zt, batch)
    with pytest.raises(LossOptionError, match="common"):
        gold_loss(zs, zt, batch)
    masked = dict(batch, sample_mask=torch.zeros_like(batch["sample_mask"]))
    zs.grad = None
    loss, _ = hybrid_loss(zs, zt, masked, common=cs)
    loss.backward()
    assert float(loss.detach()) == 0 and torch.count_nonzero(zs.grad) == 0


def test_modules_match_functions():
    from xtoken_loss import LOSSES, ALMLoss, GOLDLoss, HKLLoss, ULDLoss
    from xtoken_loss.losses.alm import alm_loss
    from xtoken_loss.losses.uld import uld_loss

    assert {"hkl", "gold", "uld", "alm"} <= set(LOSSES)  # modules_extra.EXTRA_LOSSES went into the registry
    batch = synthetic_batch(5)
    Ls, Lt = _shapes(batch)
    idx, w = random_projection(5, 40, 50)
    zs, zt = random_logits(1, (3, Ls, 40)), random_logits(2, (3, Lt, 50))
    ex = torch.arange(40) % 45
    pairs = [
        (HKLLoss((idx, w), public=True), hkl_loss(zs, zt, batch, projection=(idx, w), public=True)),
        (GOLDLoss(ex, temperature=2.0), gold_loss(zs, zt, batch, common=ex, temperature=2.0)),
        (ULDLoss(chunk_form="mean_log"), uld_loss(zs, zt, batch, chunk_form="mean_log")),
        (ALMLoss(tau=5.0, divergence="kl"), alm_loss(zs, zt, batch, tau=5.0, divergence="kl")),
    ]
    for module, (loss, metrics) in pairs:
        got, got_m = module(zs, zt, batch)
        assert is_close(got, loss, 1e-12)
        assert got_m.keys() == metrics.keys()
    with pytest.raises(LossOptionError, match="chunk_form"):
        ULDLoss(chunk_form="avg")
    with pytest.raises(LossOptionError, match="divergence"):
        ALMLoss(divergence="js")
