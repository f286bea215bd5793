"""Item 4 of issue 11: every loss kind checks its inputs cheaply, always (no `check_inputs` needed):
floating-point `[B, T, V]` logits, the batch keys it reads, logits at least as wide as every real id
of the batch, teacher logits at least as wide as the projection's teacher columns, `normalizer > 0`.
Each bad input raises a `LossInputError` whose message names the problem.

The variants are enumerated from `xtoken_loss.registry`, so a new loss kind without a case here fails
`test_every_kind_has_a_case`.
"""

from __future__ import annotations

import pytest
import torch

from tests.reference_losses import random_logits, random_projection, synthetic_batch
from xtoken_core.config import fields_of
from xtoken_loss import LearnedProjection, LossInputError, Projection, registry
from xtoken_loss.checks import DeferredNormalizer
from xtoken_loss.losses.learned_pkl import learned_pkl_loss

VS, VT = 40, 50  # logits widths; the projection covers VS - 3 rows and VT - 5 columns
PROJ_T = VT - 5


def _problem():
    batch = synthetic_batch(0, vocab_s=VS, vocab_t=VT)
    idx, w = random_projection(1, VS - 3, PROJ_T)
    proj = Projection.from_tensors(idx, w, teacher_width=PROJ_T)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = random_logits(2, (B, Ls, VS))
    zt = random_logits(3, (B, Lt, VT))
    zk = random_logits(4, (B, Ls, VS))  # a same-vocab teacher
    common = torch.full((VS,), -1, dtype=torch.int64)
    common[:20] = torch.arange(20)  # a GOLD exact map
    return batch, proj, zs, zt, zk, common


BATCH, PROJ, ZS, ZT, ZK, COMMON = _problem()
LEARNED = LearnedProjection(PROJ)


def _topk(z, k=5):
    top = torch.log_softmax(z, dim=-1).topk(k, dim=-1)
    return {"topk_logprobs": top.values, "topk_indices": top.indices}


def _topk_rest(t, k=5):
    """Top-k outputs with `rest_logprob` (the cross-tokenizer top-k forms) of logits `t`, or `t` itself."""
    if not isinstance(t, torch.Tensor):
        return t
    lp = torch.log_softmax(t, dim=-1)
    top = lp.topk(k, dim=-1)
    rest = torch.logsumexp(lp.scatter(-1, top.indices, float("-inf")), dim=-1)
    return {"topk_logprobs": top.values, "topk_indices": top.indices, "rest_logprob": rest}


def _target_logprob(z, ids):
    lp = torch.log_softmax(z, dim=-1)
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:].clamp(0, z.shape[-1] - 1)  # padding may hold anything
    return {"target_logprob": lp.gather(2, nxt[..., None]).squeeze(2)}


# name -> (registry kind or None, teacher side: "cross" / "same" / None, what the loss reads, call)
# call(student_logits, teacher_outputs, batch, **kw); "reads" lists the batch id keys it needs.
VARIANTS = {
    "pkl": ("pkl", "cross", (), lambda s, t, b, **kw: registry.get("pkl").function(s, t, b, projection=PROJ, **kw)),
    "pkl_public": ("pkl", "cross", (), lambda s, t, b, **kw: registry.get("pkl").function(
        s, t, b, projection=PROJ, public=True, **kw)),
    "hkl": ("hkl", "cross", (), lambda s, t, b, **kw: registry.get("hkl").function(s, t, b, projection=PROJ, **kw)),
    "hkl_public": ("hkl", "cross", (), lambda s, t, b, **kw: registry.get("hkl").function(
        s, t, b, projection=PROJ, public=True, **kw)),
    "gold": ("gold", "cross", (), lambda s, t, b, **kw: registry.get("gold").function(s, t, b, common=COMMON, **kw)),
    "gold_public": ("gold", "cross", (), lambda s, t, b, **kw: registry.get("gold").function(
        s, t, b, common=COMMON, public=True, **kw)),
    "uld": ("uld", "cross", (), lambda s, t, b, **kw: registry.get("uld").function(s, t, b, **kw)),
    "uld_public": ("uld", "cross", ("input_ids", "teacher_0_input_ids"),
                   lambda s, t, b, **kw: registry.get("uld").function(s, t, b, public=True, **kw)),
    "alm": ("alm", "cross", ("input_ids", "teacher_0_input_ids"),
            lambda s, t, b, **kw: registry.get("alm").function(s, t, b, **kw)),
    "alm_target_logprob": ("alm", "cross_topk", ("input_ids",), lambda s, t, b, **kw: registry.get("alm").function(
        s, _target_logprob(t, b["teacher_0_input_ids"]) if isinstance(t, torch.Tensor) else t, b, **kw)),
    "kl": ("kl", "same", (), lambda s, t, b, **kw: registry.get("kl").function(s, t, b, **kw)),
    "kl_topk": ("kl", "same_topk", (), lambda s, t, b, **kw: registry.get("kl").function(
        s, _topk(t) if isinstance(t, torch.Tensor) else t, b, **kw)),
    "ce": ("ce", None, ("input_ids",), lambda s, t, b, **kw: registry.get("ce").function(s, None, b, **kw)),
    "learned_pkl": (None, "cross", (), lambda s, t, b, **kw: learned_pkl_loss(s, t, b, projection=LEARNED, **kw)),
    # the top-k forms of the cross-tokenizer losses (docs/losses.md, "Top-k teacher outputs")
    "pkl_topk": ("pkl", "cross_topk", (), lambda s, t, b, **kw: registry.get("pkl").function(
        s, _topk_rest(t), b, projection=PROJ, **kw)),
    "hkl_topk": ("hkl", "cross_topk", (), lambda s, t, b, **kw: registry.get("hkl").function(
        s, _topk_rest(t), b, projection=PROJ, **kw)),
    "gold_topk": ("gold", "cross_topk", (), lambda s, t, b, **kw: registry.get("gold").function(
        s, _topk_rest(t), b, common=COMMON, **kw)),
    "uld_topk": ("uld", "cross_topk", (), lambda s, t, b, **kw: registry.get("uld").function(
        s, _topk_rest(t), b, **kw)),
    "learned_pkl_topk": (None, "cross_topk", (), lambda s, t, b, **kw: learned_pkl_loss(
        s, _topk_rest(t), b, projection=LEARNED, **kw)),
}
TOPK_REST = ["pkl_topk", "hkl_topk", "gold_topk", "uld_topk", "learned_pkl_topk"]
NAMES = list(VARIANTS)
CHUNK = [n for n in NAMES if VARIANTS[n][1] is not None and VARIANTS[n][1].startswith("cross")]
WITH_TEACHER_LOGITS = [n for n in NAMES if VARIANTS[n][1] in ("cross", "same", "cross_topk", "same_topk")]


def _call(name, zs=None, zt=None, batch=None, **kw):
    _, side, _, fn = VARIANTS[name]
    if zt is None:
        zt = ZK if side in ("same", "same_topk") else ZT
    return fn(ZS if zs is None else zs, zt, BATCH if batch is None else batch, **kw)


def _without(batch, *keys):
    return {k: v for k, v in batch.items() if k not in keys}


def test_every_kind_has_a_case():
    covered = {VARIANTS[n][0] for n in NAMES}
    missing = set(registry.REGISTRY) - covered
    assert not missing, f"loss kinds without an input-check case: {missing}"
    for kind, spec in registry.REGISTRY.items():
        if any(f.name == "public" for f in fields_of(spec.options)):
            assert f"{kind}_public" in VARIANTS, f"{kind} has a public form without a case"


@pytest.mark.parametrize("name", NAMES)
def test_good_inputs_give_a_finite_loss(name):
    loss, _ = _call(name)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_integer_student_logits(name):
    with pytest.raises(LossInputError, match=r"student_logits must be floating point .* got torch.int64"):
        _call(name, zs=ZS.round().long())


@pytest.mark.parametrize("name", WITH_TEACHER_LOGITS)
def test_integer_teacher_logits(name):
    side = VARIANTS[name][1]
    zt = ZK if side.startswith("same") else ZT
    if name in TOPK_REST:
        zt = dict(_topk_rest(zt), topk_logprobs=_topk_rest(zt)["topk_logprobs"].round().long())
    elif side == "same_topk":
        zt = dict(_topk(zt), topk_logprobs=_topk(zt)["topk_logprobs"].round().long())
    elif side == "cross_topk":
        zt = {"target_logprob": _target_logprob(zt, BATCH["teacher_0_input_ids"])["target_logprob"].round().long()}
    else:
        zt = zt.round().long()
    with pytest.raises(LossInputError, match=r"ha(s|ve) dtype torch.int64, expected a floating dtype"):
        _call(name, zt=zt)


@pytest.mark.parametrize("name", NAMES)
def test_two_dimensional_student_logits(name):
    with pytest.raises(LossInputError, match=r"student_logits must have 3 dimensions \[B, T, V\], got shape \(3, 40\)"):
        _call(name, zs=ZS[:, 0])


@pytest.mark.parametrize("name", NAMES)
def test_missing_token_mask(name):
    with pytest.raises(LossInputError, match=r"batch key 'token_mask' is missing"):
        _call(name, batch=_without(BATCH, "token_mask"))


def test_kl_with_an_empty_batch_is_refused():
    """The issue's example: `kl_loss(zs, zt, {})` used to treat every position as real."""
    with pytest.raises(LossInputError, match=r"kl: batch key 'token_mask' is missing"):
        registry.get("kl").function(ZS, ZK, {})


@pytest.mark.parametrize("name", CHUNK)
@pytest.mark.parametrize("key", ["teacher_0_token_mask", "alignment_0_student_chunk_id",
                                 "alignment_0_teacher_chunk_id", "alignment_0_pair_valid",
                                 "alignment_0_pair_is_correct"])
def test_missing_alignment_keys(name, key):
    if key == "alignment_0_pair_is_correct" and name.endswith("_public"):
        pytest.skip("a public form may count chunks whatever pair_is_correct says")
    with pytest.raises(LossInputError, match=rf"batch key '{key}' is missing"):
        _call(name, batch=_without(BATCH, key))


@pytest.mark.parametrize("name", [n for n in NAMES if VARIANTS[n][2]])
def test_missing_input_ids_where_read(name):
    for key in VARIANTS[name][2]:
        with pytest.raises(LossInputError, match=rf"batch key '{key}' is missing"):
            _call(name, batch=_without(BATCH, key))


@pytest.mark.parametrize("name", NAMES)
def test_student_logits_narrower_than_the_batch_ids(name):
    top = int(BATCH["input_ids"][BATCH["token_mask"]].max())
    width = top - 2
    zt = ZK[..., :width] if VARIANTS[name][1] in ("same", "same_topk") else None  # a same-vocab teacher: as narrow
    with pytest.raises(LossInputError, match=rf"'input_ids'\] holds token id {top}, beyond the student logits "
                                             rf"\({width} wide\)"):
        _call(name, zs=ZS[..., :width], zt=zt)


@pytest.mark.parametrize("name", [n for n in CHUNK if n != "alm_target_logprob" and n not in TOPK_REST])
def test_teacher_logits_narrower_than_the_batch_ids(name):
    top = int(BATCH["teacher_0_input_ids"][BATCH["teacher_0_token_mask"]].max())
    width = top - 1
    with pytest.raises(LossInputError, match=rf"'teacher_0_input_ids'\] holds token id {top}, beyond the teacher "
                                             rf"logits \({width} wide\)|projection points at teacher id"):
        _call(name, zt=ZT[..., :width])


@pytest.mark.parametrize("name", ["pkl", "pkl_public", "hkl", "hkl_public", "learned_pkl", "gold", "gold_public"])
def test_teacher_logits_narrower_than_the_projection(name):
    """Without teacher ids in the batch, the projection's (or GOLD's common set's) teacher columns
    are what the teacher logits must cover."""
    batch = _without(BATCH, "input_ids", "teacher_0_input_ids")
    msg = r"common set pairs .* teacher ids up to 19" if name.startswith("gold") else (
        r"teacher logits have 12 columns but the projection points at teacher id")
    width = 12
    with pytest.raises(LossInputError, match=msg):
        _call(name, zt=ZT[..., :width], batch=batch)


@pytest.mark.parametrize("name", ["pkl", "pkl_public", "hkl", "hkl_public", "learned_pkl"])
def test_student_logits_narrower_than_the_projection(name):
    batch = _without(BATCH, "input_ids", "teacher_0_input_ids")
    with pytest.raises(LossInputError, match=r"(student logits have 20 columns but the projection maps|"
                                             r"student logits have 20 columns)"):
        _call(name, zs=ZS[..., :20], batch=batch)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [0, 0.0, -3, torch.tensor(0.0), torch.tensor(-1)])
def test_normalizer_must_be_positive(name, value):
    with pytest.raises(LossInputError, match=r"normalizer must be > 0"):
        _call(name, normalizer=value)


@pytest.mark.parametrize("name", NAMES)
def test_normalizer_must_be_a_number(name):
    with pytest.raises(LossInputError, match=r"normalizer must be a (positive number|scalar)"):
        _call(name, normalizer=torch.ones(2))


@pytest.mark.parametrize("name", NAMES)
def test_a_deferred_bad_input_flag_poisons_the_loss(name):
    """On an accelerator the id check cannot be read without a sync; its flag travels in the
    normaliser and makes the loss (and its gradient) NaN. Simulated here on the CPU."""
    x = ZS.clone().requires_grad_()
    loss, _ = _call(name, zs=x, normalizer=DeferredNormalizer(torch.tensor(True)))
    assert torch.isnan(loss)
    loss.backward()
    ok, _ = _call(name, normalizer=DeferredNormalizer(torch.tensor(False)))
    assert float(ok.detach()) == float(_call(name)[0].detach())


@pytest.mark.parametrize("name", NAMES)
def test_token_ids_at_padded_positions_are_never_checked(name):
    """Padding never matters: ids past the width at masked positions are not an error."""
    batch = dict(BATCH)
    for key, mask in (("input_ids", "token_mask"), ("teacher_0_input_ids", "teacher_0_token_mask")):
        batch[key] = torch.where(batch[mask], batch[key], torch.full_like(batch[key], 10**6))
    assert float(_call(name, batch=batch)[0].detach()) == float(_call(name)[0].detach())


@pytest.mark.parametrize("name", TOPK_REST)
def test_topk_teacher_batch_size_and_length_must_match(name):
    top = _topk_rest(ZT)
    with pytest.raises(LossInputError, match=r"teacher top-k outputs have batch size 2, the student logits 3"):
        _call(name, zt={k: v[:2] for k, v in top.items()})
    with pytest.raises(LossInputError, match=r"batch\['alignment_0_teacher_chunk_id'\] has shape .*, expected "
                                             r"\(3, \d+\)"):
        _call(name, zt={k: v[:, :-1] for k, v in top.items()})


def test_kl_topk_indices_outside_the_vocabulary():
    teacher = _topk(ZK)
    teacher["topk_indices"][0, 1, 2] = VS + 3
    with pytest.raises(LossInputError, match=rf"topk_indices hold ids in .*{VS + 3}\] at valid positions"):
        registry.get("kl").function(ZS, teacher, BATCH)
    teacher["topk_indices"][0, 1, 2] = -2
    with pytest.raises(LossInputError, match=r"topk_indices hold ids in \[-2, "):
        registry.get("kl").function(ZS, teacher, BATCH)


def test_negative_id_at_a_real_position():
    batch = dict(BATCH, input_ids=BATCH["input_ids"].clone())
    batch["input_ids"][0, 2] = -5
    with pytest.raises(LossInputError, match=r"ce: batch\['input_ids'\] holds token id -5 at a real position"):
        registry.get("ce").function(ZS, None, batch)


def test_float_token_ids_are_refused():
    batch = dict(BATCH, input_ids=BATCH["input_ids"].float())
    with pytest.raises(LossInputError, match=r"ce: batch\['input_ids'\] must hold integer token ids"):
        registry.get("ce").function(ZS, None, batch)
