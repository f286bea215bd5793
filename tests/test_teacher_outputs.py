"""The one teacher-output type (`xtoken_loss.teacher_outputs`): every loss and score takes a
`TeacherOutputs`, a plain tensor and a dict alike (and the value is the float64 reference's); each
loss's refused forms give the parser's one message; malformed outputs raise `LossInputError` naming
the problem; the parser reads no tensor values (it works on the meta device)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import xtoken_loss
from tests.reference_losses import (
    dense_projection,
    is_close,
    next_token_valid,
    random_logits,
    random_projection,
    reference_alm,
    reference_common_by_threshold,
    reference_hybrid,
    reference_kl,
    reference_pkl,
    reference_uld,
    synthetic_batch,
)
from xtoken_core.errors import LossInputError
from xtoken_loss import TeacherOutputs
from xtoken_loss.losses import alm, hybrid, kl, learned_pkl, pkl, uld
from xtoken_loss.losses.learned_pkl import LearnedProjection
from xtoken_loss.multi_teacher import scores
from xtoken_loss.multi_teacher.aggregate import _average_outputs
from xtoken_loss.multi_teacher.teachers import TeacherSpec
from xtoken_loss.projection import as_projection
from xtoken_loss.teacher_outputs import TOPK_REST_KEYS, as_teacher_outputs

VS, VT = 40, 50


def _problem(seed=0):
    batch = synthetic_batch(seed)
    Ls, Lt = batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]
    zs = random_logits(seed + 1, (3, Ls, VS))
    zt = random_logits(seed + 2, (3, Lt, VT))
    return batch, zs, zt


def _topk(z, ids, k):
    """CONTRACTS §3 top-k outputs of logits `z` for target ids `ids` (the token after each position)."""
    lp = torch.log_softmax(z, dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    target = torch.zeros(ids.shape, dtype=lp.dtype)
    target[:, :-1] = lp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    return {"topk_logprobs": vals, "topk_indices": idx, "target_logprob": target}


def _three(d):
    """The same teacher outputs as a dict, a TeacherOutputs and (full logits only) a plain tensor."""
    forms = [d, TeacherOutputs(**d)]
    if set(d) == {"logits"}:
        forms.append(d["logits"])
    return forms


def _loss_cases():
    """`(kind, call(teacher_outputs) -> loss, dict outputs, float64 reference value)` per loss kind."""
    batch, zs, zt = _problem(0)
    idx, w = random_projection(0, VS, VT)
    W = dense_projection(idx, w, VS, VT)
    cases = []

    # same-vocab KL: full logits (teacher narrower than the student) and top-k, against reference_kl
    zt_same = random_logits(7, (3, zs.shape[1], VS - 3))
    ref = reference_kl(zs, zt_same, batch, temperature=1.5)[0]
    cases.append(("kl", lambda t: kl.kl_loss(zs, t, batch, temperature=1.5)[0], {"logits": zt_same}, ref))
    top = _topk(random_logits(8, (3, zs.shape[1], VS)), batch["input_ids"], 6)
    ref = reference_kl(zs, top, batch)[0]
    cases.append(("kl", lambda t: kl.kl_loss(zs, t, batch)[0], top, ref))

    ref = reference_pkl(zs, zt, batch, W, temperature=2.0)[0]
    cases.append(("pkl", lambda t: pkl.pkl_loss(zs, t, batch, projection=(idx, w), temperature=2.0)[0],
                  {"logits": zt}, ref))
    ref = reference_uld(zs, zt, batch, form="start")[0]
    cases.append(("uld", lambda t: uld.uld_loss(zs, t, batch)[0], {"logits": zt}, ref))
    common = reference_common_by_threshold(W, 0.6)
    ref = reference_hybrid(zs, zt, batch, common)[0]
    cases.append(("hkl", lambda t: hybrid.hkl_loss(zs, t, batch, projection=(idx, w))[0], {"logits": zt}, ref))
    exact = torch.arange(VS) % 45  # student id v <-> teacher id v
    ref = reference_hybrid(zs, zt, batch, (list(range(VS)), list(range(VS))))[0]
    cases.append(("gold", lambda t: hybrid.gold_loss(zs, t, batch, common=exact)[0], {"logits": zt}, ref))
    ref = reference_alm(zs, zt, batch, tau=5.0)[0]
    cases.append(("alm", lambda t: alm.alm_loss(zs, t, batch, tau=5.0)[0], {"logits": zt}, ref))
    top_t = _topk(zt, batch["teacher_0_input_ids"], 5)
    cases.append(("alm", lambda t: alm.alm_loss(zs, t, batch, tau=5.0)[0], top_t, ref))  # target_logprob: same
    lpj = LearnedProjection((idx, w)).double()
    ref = reference_pkl(zs, zt, batch, dense_projection(lpj.indices, lpj.weights().detach(), VS, VT),
                        top_k_columns=7)[0]
    cases.append(("learned_pkl", lambda t: learned_pkl.learned_pkl_loss(zs, t, batch, projection=lpj,
                                                                        top_k_columns=7)[0], {"logits": zt}, ref))
    return cases


CASES = _loss_cases()


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{'/'.join(c[2])}" for c in CASES])
def test_every_loss_takes_teacher_outputs_tensor_and_dict_alike(case):
    kind, call, outputs, ref = CASES[case]
    values = [call(t).detach() for t in _three(outputs)]
    assert is_close(values[0], ref), (kind, float(values[0]), float(ref))
    for v in values[1:]:
        assert float(v) == float(values[0]), kind


def test_logits_win_over_other_dict_keys_and_unknown_keys_are_ignored():
    batch, zs, zt = _problem(1)
    ref = reference_uld(zs, zt, batch, form="start")[0]
    top = _topk(zt, batch["teacher_0_input_ids"], 4)
    mixed = {"logits": zt, **top, "hidden_states": None, "past_key_values": ()}
    assert is_close(uld.uld_loss(zs, mixed, batch)[0], ref)
    # a `logits` key holding None counts as absent (a model output without logits)
    t = as_teacher_outputs({"logits": None, **top}, loss="kl")
    assert t.form == "topk" and t.topk_indices is top["topk_indices"]


# -------------------------------------------------------------------------------------------------
# the forms each loss accepts, and refusals from the parser


def test_declared_forms():
    # the table in docs/contracts.md §3
    for mod in (kl, alm, scores, pkl, uld, hybrid, learned_pkl):
        assert mod.TEACHER_FORMS == ("logits", "topk"), mod.__name__


def _refused_calls():
    batch, zs, zt = _problem(2)
    idx, w = random_projection(2, VS, VT)
    lpj = LearnedProjection((idx, w)).double()
    return batch, {
        "pkl": lambda t: pkl.pkl_loss(zs, t, batch, projection=(idx, w)),
        "uld": lambda t: uld.uld_loss(zs, t, batch),
        "hkl": lambda t: hybrid.hkl_loss(zs, t, batch, projection=(idx, w)),
        "gold": lambda t: hybrid.gold_loss(zs, t, batch, common=torch.arange(VS) % 45),
        "learned_pkl": lambda t: learned_pkl.learned_pkl_loss(zs, t, batch, projection=lpj),
    }, zt


TOPK_REFUSAL = (r"^{kind}: teacher_outputs have no 'rest_logprob'; {kind} accepts full logits \[B, T, V\] "
                r"\(a tensor, \{{'logits': \.\.\.\}} or TeacherOutputs\(logits=\.\.\.\)\) or top-k outputs with "
                r"'topk_logprobs' \[B, T, k\] and 'topk_indices' \[B, T, k\] and 'rest_logprob' \[B, T\] "
                r"\('target_logprob' optional\) \(CONTRACTS §3\)$")


@pytest.mark.parametrize("kind", ["pkl", "uld", "hkl", "gold", "learned_pkl"])
@pytest.mark.parametrize("as_type", [False, True])
def test_cross_tokenizer_topk_needs_rest_logprob(kind, as_type):
    batch, calls, zt = _refused_calls()
    top = _topk(zt, batch["teacher_0_input_ids"], 4)
    with pytest.raises(LossInputError, match=TOPK_REFUSAL.format(kind=kind)) as err:
        calls[kind](TeacherOutputs(**top) if as_type else top)
    # the parser's own message, word for word
    mod = {"hkl": hybrid, "gold": hybrid}.get(kind) or {"pkl": pkl, "uld": uld, "learned_pkl": learned_pkl}[kind]
    with pytest.raises(LossInputError) as direct:
        as_teacher_outputs(top, loss=kind, accepts=mod.TEACHER_FORMS, needs=TOPK_REST_KEYS)
    assert str(err.value) == str(direct.value)


def test_kl_refuses_topk_without_the_pair():
    batch, zs, _ = _problem(3)
    only_target = {"target_logprob": torch.zeros(zs.shape[:2], dtype=torch.float64)}
    with pytest.raises(LossInputError, match=r"^kl: teacher_outputs have no 'topk_logprobs' / 'topk_indices'; kl "
                                             r"accepts full logits .* or per-position top-k \{'topk_logprobs'"):
        kl.kl_loss(zs, only_target, batch)


def test_alm_refuses_topk_without_target_logprob():
    batch, zs, zt = _problem(4)
    top = _topk(zt, batch["teacher_0_input_ids"], 4)
    del top["target_logprob"]
    with pytest.raises(LossInputError, match=r"^alm: teacher_outputs have no 'target_logprob'; alm accepts full "
                                             r"logits .* or top-k outputs with 'target_logprob' \[B, T\] "
                                             r"\('topk_logprobs' / 'topk_indices' / 'rest_logprob' optional\)"):
        alm.alm_loss(zs, top, batch)
    # target_logprob alone is enough without teacher debiasing; with it, the top-k pair is needed too
    target = {"target_logprob": _topk(zt, batch["teacher_0_input_ids"], 4)["target_logprob"]}
    assert is_close(alm.alm_loss(zs, target, batch)[0], reference_alm(zs, zt, batch)[0])
    with pytest.raises(LossInputError, match=r"^alm: teacher_outputs have no 'topk_logprobs' / 'topk_indices'; "
                                             r".*'target_logprob' \[B, T\] and 'topk_logprobs' \[B, T, k\] and "
                                             r"'topk_indices' \[B, T, k\]"):
        alm.alm_loss(zs, target, batch, debias_gamma=0.1, teacher_boundary_tokens=[0, 1])


def test_scores_and_projection_accuracy_take_every_input_type():
    batch, zs, zt = _problem(5)
    ids = batch["teacher_0_input_ids"]
    # independent CE: -log softmax at each next-token position of the teacher
    lp = torch.log_softmax(zt, dim=-1)
    ref = [sum(-float(lp[b, p, ids[b, p + 1]]) for p in range(ids.shape[1])
               if next_token_valid(batch, b, p, ids.shape[1], "teacher_0_")) for b in range(3)]
    top = _topk(zt, ids, 5)
    for form in _three({"logits": zt}) + _three(top):
        sums, _ = scores.teacher_score_sums(form, batch, score="ce", teacher_index=0)
        assert all(is_close(s, r) for s, r in zip(sums.tolist(), ref)), (type(form), sums.tolist(), ref)
    idx, w = random_projection(5, VS, VT)
    proj = as_projection((idx, w), "cpu")
    full = [scores.projection_accuracy_counts(zs, f, batch, proj, teacher_index=0) for f in _three({"logits": zt})]
    # top-k outputs whose top-1 is the argmax of the logits give the same hits
    topk = [scores.projection_accuracy_counts(zs, f, batch, proj, teacher_index=0) for f in _three(top)]
    for h, u in full[1:] + topk:
        assert float(h) == float(full[0][0]) and float(u) == float(full[0][1])
    with pytest.raises(LossInputError, match=r"^projection_accuracy: teacher_outputs have 'topk_logprobs' but no "
                                             r"'topk_indices'"):
        scores.projection_accuracy_counts(zs, {"topk_logprobs": top["topk_logprobs"]}, batch, proj, teacher_index=0)
    with pytest.raises(LossInputError, match=r"^score 'entropy': teacher_outputs is a list"):
        scores.teacher_score_sums([zt], batch, score="entropy", teacher_index=0)


def test_average_outputs_returns_teacher_outputs():
    batch, zs, _ = _problem(6)
    z1, z2 = random_logits(1, (3, zs.shape[1], VS)), random_logits(2, (3, zs.shape[1], VS - 2))
    spec = TeacherSpec(name="a", loss="kl", loss_options={"tail": "renormalize"})
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    avg = _average_outputs([z1, TeacherOutputs(logits=z2)], w, batch, "cpu", spec)
    assert isinstance(avg, TeacherOutputs) and avg.form == "logits"
    torch.testing.assert_close(avg.logits, 0.25 * z1[..., : VS - 2] + 0.75 * z2)
    _, idx = torch.log_softmax(z1, -1).topk(4, dim=-1)
    t1 = TeacherOutputs(topk_logprobs=torch.log_softmax(z1, -1).gather(2, idx), topk_indices=idx)
    t2 = {"topk_logprobs": torch.log_softmax(z2, -1).gather(2, idx.clamp(max=VS - 3)), "topk_indices": idx}
    z3 = random_logits(3, z1.shape)  # a full-logits teacher joins on the top-k teacher's set
    avg = _average_outputs([t1, z3], w, batch, "cpu", spec)
    assert isinstance(avg, TeacherOutputs) and avg.form == "topk" and avg.k == 4
    assert torch.equal(avg.topk_indices, idx.sort(dim=2).values)
    ref = (0.25 * torch.log_softmax(z1, -1) + 0.75 * z3).gather(2, avg.topk_indices)
    torch.testing.assert_close(avg.topk_logprobs, ref)
    with pytest.raises(LossInputError, match=r"^averaged_logits: teacher_outputs have 'topk_logprobs' but no"):
        _average_outputs([t1, {"topk_logprobs": t2["topk_logprobs"]}], w, batch, "cpu", spec)


# -------------------------------------------------------------------------------------------------
# malformed outputs


def _bad_cases():
    lp = torch.zeros(2, 5, 3)
    idx = torch.zeros(2, 5, 3, dtype=torch.int64)
    tlp = torch.zeros(2, 5)
    return [
        ({"topk_logprobs": lp}, r"have 'topk_logprobs' but no 'topk_indices'; the two come together"),
        ({"topk_indices": idx, "target_logprob": tlp}, r"have 'topk_indices' but no 'topk_logprobs'"),
        ({"topk_logprobs": lp, "topk_indices": idx[:, :, :2]},
         r"topk_indices have shape \[2, 5, 2\] but topk_logprobs \[2, 5, 3\]; they must match"),
        ({"topk_logprobs": lp, "topk_indices": idx, "target_logprob": tlp[:, :4]},
         r"target_logprob has shape \[2, 4\] but topk_logprobs \[2, 5, 3\]; expected \[B, T\] = \[2, 5\]"),
        ({"topk_logprobs": lp, "topk_indices": idx.float()},
         r"topk_indices have dtype torch.float32, expected an integer dtype"),
        ({"topk_logprobs": lp, "topk_indices": idx.bool()}, r"topk_indices have dtype torch.bool"),
        ({"topk_logprobs": idx, "topk_indices": idx}, r"topk_logprobs have dtype torch.int64, expected a floating"),
        ({"topk_logprobs": lp[0], "topk_indices": idx[0]}, r"topk_logprobs have shape \[5, 3\], expected \[B, T, k\]"),
        ({"topk_logprobs": lp, "topk_indices": idx, "target_logprob": lp},
         r"target_logprob has shape \[2, 5, 3\], expected \[B, T\]"),
        ({"topk_logprobs": lp, "topk_indices": idx, "target_logprob": tlp.long()},
         r"target_logprob has dtype torch.int64"),
        ({"logits": torch.zeros(2, 5)}, r"logits have shape \[2, 5\], expected \[B, T, V\]"),
        ({"logits": torch.zeros(2, 5, 7, dtype=torch.int32)}, r"logits have dtype torch.int32, expected a floating"),
        ({"topk_logprobs": lp.tolist(), "topk_indices": idx}, r"field 'topk_logprobs' is a list, not a tensor"),
        ({"topk_logprobs": lp, "topk_indices": idx, "rest_logprob": tlp[:, :4]},
         r"rest_logprob has shape \[2, 4\] but topk_logprobs \[2, 5, 3\]; expected \[B, T\] = \[2, 5\]"),
        ({"topk_logprobs": lp, "topk_indices": idx, "rest_logprob": tlp.long()}, r"rest_logprob has dtype torch.int64"),
        ({"target_logprob": tlp, "rest_logprob": tlp},
         r"have 'rest_logprob' but no 'topk_logprobs' / 'topk_indices'; it is the mass outside the listed ids"),
        ({"scores": lp}, r"is a dict without any of 'logits', 'topk_logprobs', 'topk_indices', 'target_logprob', "
                         r"'rest_logprob' \(keys: 'scores'\)"),
        ({}, r"is a dict without any of .* \(keys: none\)"),
        ((lp, idx), r"is a tuple"),
        (None, r"is a NoneType"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_malformed_outputs_name_the_problem(case):
    obj, what = _bad_cases()[case]
    with pytest.raises(LossInputError, match=rf"^kl: teacher_outputs {what}") as err:
        as_teacher_outputs(obj, loss="kl", accepts=kl.TEACHER_FORMS)
    msg = str(err.value)
    assert "; kl accepts full logits [B, T, V]" in msg and msg.endswith("(CONTRACTS §3)") and "\n" not in msg
    if isinstance(obj, dict) and obj and not any(isinstance(v, list) for v in obj.values()):
        keys = {k: v for k, v in obj.items() if k in ("logits", "topk_logprobs", "topk_indices", "target_logprob",
                                                       "rest_logprob")}
        if keys:  # the constructor refuses the same fields, naming itself
            with pytest.raises(LossInputError, match=rf"^TeacherOutputs: teacher_outputs {what}"):
                TeacherOutputs(**keys)


def test_malformed_outputs_raise_from_the_losses():
    batch, zs, zt = _problem(7)
    top = _topk(zt, batch["teacher_0_input_ids"], 4)
    with pytest.raises(LossInputError, match=r"^alm: teacher_outputs topk_indices have dtype torch.float64"):
        alm.alm_loss(zs, dict(top, topk_indices=top["topk_indices"].double()), batch)
    with pytest.raises(LossInputError, match=r"^uld: teacher_outputs logits have shape \[3, \d+\], expected"):
        uld.uld_loss(zs, zt[..., 0], batch)
    with pytest.raises(LossInputError, match=r"^TeacherOutputs: teacher_outputs hold both 'logits' and top-k"):
        TeacherOutputs(logits=zt, target_logprob=top["target_logprob"])


# -------------------------------------------------------------------------------------------------
# the type


def test_teacher_outputs_type():
    assert "TeacherOutputs" in xtoken_loss.__all__ and xtoken_loss.TeacherOutputs is TeacherOutputs
    z = torch.zeros(2, 5, 7)
    t = TeacherOutputs(logits=z)
    assert (t.form, t.batch_size, t.length, t.width, t.k, t.device) == ("logits", 2, 5, 7, None, torch.device("cpu"))
    assert as_teacher_outputs(t, loss="kl") is t  # no copy, no re-check
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.logits = z
    with pytest.raises(TypeError):
        TeacherOutputs(z)  # keyword-only
    top = TeacherOutputs(topk_logprobs=torch.zeros(2, 5, 3), topk_indices=torch.zeros(2, 5, 3, dtype=torch.int32))
    assert (top.form, top.batch_size, top.length, top.width, top.k) == ("topk", 2, 5, None, 3)
    only = TeacherOutputs(target_logprob=torch.zeros(2, 5))
    assert (only.form, only.batch_size, only.length, only.k) == ("topk", 2, 5, None)
    with pytest.raises(ValueError, match="accepts"):
        as_teacher_outputs(z, loss="kl", accepts=("full",))


def test_parser_reads_no_values():
    """Every check is on shapes and dtypes: meta tensors (no data at all) pass, so nothing syncs."""
    meta = dict(device="meta")
    z = torch.empty(2, 5, 7, **meta)
    assert as_teacher_outputs(z, loss="pkl", accepts=pkl.TEACHER_FORMS).logits is z
    top = {"topk_logprobs": torch.empty(2, 5, 3, **meta),
           "topk_indices": torch.empty(2, 5, 3, dtype=torch.int64, **meta),
           "target_logprob": torch.empty(2, 5, **meta)}
    t = as_teacher_outputs(top, loss="alm", accepts=alm.TEACHER_FORMS, needs=("target_logprob",))
    assert t.form == "topk" and t.device.type == "meta"
    with pytest.raises(LossInputError, match=re.escape("topk_indices have shape [2, 5, 2]")):
        as_teacher_outputs(dict(top, topk_indices=torch.empty(2, 5, 2, dtype=torch.int64, **meta)), loss="kl")
