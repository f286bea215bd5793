"""Multi-teacher KD against hand-written float64 references, on a real problem: a llama3 student,
one cross-tokenizer teacher (qwen3; real chunk alignment from the collator, real rule-based
projection) and one same-vocab teacher (llama3). The vocabularies are restricted to the ids that
occur, their projection neighbours and a random sample, and remapped, so dense references stay small.

Single-teacher losses are checked by their own tests; here the references reuse them
(`reference_losses.py`) and check what multi-teacher adds: scores, weights, selection, the
vocab-size factor, logit averaging, normalizers, metrics and gradients.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from tests.reference_losses import (
    dense_projection,
    next_token_valid,
    reference_alm,
    reference_common_by_threshold,
    reference_hybrid,
    reference_kl,
    reference_pkl,
)
from xtoken_core.errors import LossInputError, LossOptionError, ProjectionArtifactError
from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig, MultiTeacherLoss, multi_teacher_loss
from xtoken_loss.multi_teacher.teachers import TeacherSpec, build_teachers
from xtoken_loss.projection import Projection

TEXTS = [
    "The year 2024 had 366 days; 1,234,567 people counted them twice.",
    "def add(a, b):\n    return a + b  # adds 42 to 17",
    "Café crème costs 3.50 euros, or 12 for four cups.",
    "Distillation moves knowledge from a teacher into a smaller student model.",
]
TOP_K_COLUMNS = None  # every reachable column: the P-KL is exact and the reference simple


# -------------------------------------------------------------------------------------------------
# the real problem


@functools.lru_cache(maxsize=None)
def tokenizers():
    from xtoken_align import load_tokenizer

    return load_tokenizer("llama3", name="llama3"), load_tokenizer("qwen3", name="qwen3")


@functools.lru_cache(maxsize=None)
def real_projection():
    from xtoken_align.projection.builder import ProjectionConfig, build_projection

    llama, qwen = tokenizers()
    return build_projection(llama, qwen, ProjectionConfig())


@functools.lru_cache(maxsize=None)
def real_problem(texts: tuple[str, ...] = tuple(TEXTS), seed: int = 0, teachers: tuple[str, ...] = ("qwen3", "llama3")):
    """`(batch, projection, V_s, V_t, info)`: the collated batch (by default teacher 0 = qwen3,
    cross-tokenizer; teacher 1 = llama3, same-vocab) with ids remapped to small vocabularies, and the
    projection restricted to them. Every row kept keeps all its entries, so rows still sum to 1."""
    from xtoken_align.batch.collate import AlignmentCollator, CollateConfig

    llama, qwen = tokenizers()
    infos = [qwen if t == "qwen3" else llama for t in teachers]
    cross = [i for i, t in enumerate(teachers) if t == "qwen3"]
    batch = AlignmentCollator(llama, infos, CollateConfig(max_length=40))(list(texts))
    fwd = real_projection().forward
    rng = np.random.default_rng(seed)
    s_ids = batch["input_ids"][batch["token_mask"]].numpy()
    s_set = np.unique(np.concatenate([s_ids, rng.choice(llama.vocab_size, 30, replace=False)]))
    t_ids = np.concatenate([batch[f"teacher_{i}_input_ids"][batch[f"teacher_{i}_token_mask"]].numpy() for i in cross])
    rows = fwd.indices[s_set]
    t_set = np.unique(np.concatenate([t_ids, rows[rows >= 0], rng.choice(qwen.vocab_size, 30, replace=False)]))
    s_map = {int(v): k for k, v in enumerate(s_set)}
    t_map = {int(v): k for k, v in enumerate(t_set)}

    def remap(ids, mask, table):
        out = torch.zeros_like(ids)
        for b in range(ids.shape[0]):
            for p in range(ids.shape[1]):
                if mask[b, p]:
                    out[b, p] = table[int(ids[b, p])]
        return out

    batch = dict(batch)
    batch["input_ids"] = remap(batch["input_ids"], batch["token_mask"], s_map)
    for i in cross:
        key = f"teacher_{i}_input_ids"
        batch[key] = remap(batch[key], batch[f"teacher_{i}_token_mask"], t_map)
    idx = np.full(rows.shape, -1, np.int64)
    for r in range(rows.shape[0]):
        for k in range(rows.shape[1]):
            if rows[r, k] >= 0:
                idx[r, k] = t_map[int(rows[r, k])]
    meta = {"student": {"name": "llama3", "fingerprint": llama.fingerprint},
            "teacher": {"name": "qwen3", "fingerprint": qwen.fingerprint}}
    proj = Projection.from_tensors(torch.from_numpy(idx), torch.from_numpy(fwd.weights[s_set].copy()),
                                   teacher_width=len(t_set), metadata=meta)
    info = {"llama": llama.fingerprint, "qwen": qwen.fingerprint, "V_llama": llama.vocab_size,
            "V_qwen": qwen.vocab_size}
    return batch, proj, len(s_set), len(t_set), info


def sharpened_logits(seed, ids, mask, vocab, bonus, *, scale=2.0):
    """Random float64 logits `[B, T, vocab]` plus `bonus[b]` on each position's true next token, so a
    larger bonus makes a teacher better (lower CE) on that sequence."""
    g = torch.Generator().manual_seed(seed)
    B, L = ids.shape
    z = torch.randn(B, L, vocab, generator=g, dtype=torch.float64) * scale
    for b in range(B):
        for p in range(L - 1):
            if mask[b, p] and mask[b, p + 1]:
                z[b, p, int(ids[b, p + 1])] += float(bonus[b])
    return z


def problem_logits(bonus0=(2.0,) * 4, bonus1=(1.0,) * 4, seed=1):
    batch, proj, Vs, Vt, _ = real_problem()
    zs = sharpened_logits(seed, batch["input_ids"], batch["token_mask"], Vs, [0.5] * 4)
    z0 = sharpened_logits(seed + 1, batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], Vt, bonus0)
    z1 = sharpened_logits(seed + 2, batch["input_ids"], batch["token_mask"], Vs, bonus1)
    return zs, z0, z1


def teacher_specs(*, weights=(1.0, 1.0), **kw):
    batch, proj, Vs, Vt, info = real_problem()
    qwen = TeacherSpec(name="qwen3", loss="pkl", weight=weights[0], fingerprint=info["qwen"],
                       vocab_size=info["V_qwen"], projection=proj,
                       loss_options={"top_k_columns": TOP_K_COLUMNS, "check_inputs": True, **kw})
    llama = TeacherSpec(name="llama3", loss="kl", weight=weights[1], fingerprint=info["llama"],
                        vocab_size=info["V_llama"], loss_options={"check_inputs": True})
    return [qwen, llama]


def build(config, *, weights=(1.0, 1.0), teachers=None):
    _, _, _, _, info = real_problem()
    return MultiTeacherLoss(teachers or teacher_specs(weights=weights), config, student_fingerprint=info["llama"],
                            student_vocab_size=info["V_llama"], process_group=None)


# -------------------------------------------------------------------------------------------------
# references (float64, loops)


def ref_kd(zs, z0, z1, batch, proj, Vs, Vt, *, batch0=None, batch1=None, norms=(None, None)):
    """(KD_qwen, KD_llama) by the single-loss references."""
    W = dense_projection(proj.indices, proj.weights, Vs, Vt)
    k0, _, _ = reference_pkl(zs, z0, batch0 or batch, W, teacher_index=0, top_k_columns=TOP_K_COLUMNS,
                             normalizer=norms[0])
    k1, _ = reference_kl(zs, z1, batch1 or batch, normalizer=norms[1])
    return k0, k1


def ref_scores(z, ids, mask, tbytes, batch, score):
    """Per-sequence (sum, count) of a score, by explicit loops over positions."""
    B, L, _ = z.shape
    out = []
    for b in range(B):
        s = c = 0.0
        for p in range(L):
            real = bool(mask[b, p]) and p + 1 < L and bool(mask[b, p + 1]) and bool(batch["sample_mask"][b])
            if not real:
                continue
            lp = torch.log_softmax(z[b, p], dim=0)
            if score == "ce":
                s, c = s - float(lp[int(ids[b, p + 1])]), c + 1
            elif score == "entropy":
                s, c = s - float((lp.exp() * lp).sum()), c + 1
            elif score == "max_prob":
                s, c = s + float(lp.exp().max()), c + 1
            else:
                nb = int(tbytes[b, p + 1])
                if nb > 0:
                    s, c = s - float(lp[int(ids[b, p + 1])]) / math.log(2), c + nb
        out.append((s, c))
    return out


def ref_teacher_scores(z0, z1, batch, score):
    return (ref_scores(z0, batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], batch["teacher_0_token_bytes"],
                       batch, score),
            ref_scores(z1, batch["input_ids"], batch["token_mask"], batch["token_bytes"], batch, score))


def ref_goodness(seqs, score):
    s, c = sum(x[0] for x in seqs), sum(x[1] for x in seqs)
    v = s / c
    return -v if score != "max_prob" else v


def ref_softmax(goods, alpha, prior):
    logits = [alpha * g + math.log(p) for g, p in zip(goods, prior)]
    m = max(logits)
    e = [math.exp(x - m) for x in logits]
    return [x / sum(e) for x in e]


def close(a, b, tol=1e-6):
    a, b = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (a, b))
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


# -------------------------------------------------------------------------------------------------
# sum


@pytest.mark.parametrize("vocab_norm", [False, True])
def test_sum_static_matches_reference(vocab_norm):
    batch, proj, Vs, Vt, info = real_problem()
    zs, z0, z1 = problem_logits()
    mt = build(MultiTeacherConfig(mode="sum", vocab_size_normalization=vocab_norm), weights=(0.8, 0.2))
    x = zs.clone().requires_grad_()
    loss, m = mt(x, [z0, z1], batch)

    r = zs.clone().requires_grad_()
    k0, k1 = ref_kd(r, z0, z1, batch, proj, Vs, Vt)
    c0 = math.log(info["V_qwen"]) / math.log(info["V_llama"]) if vocab_norm else 1.0
    ref = 0.8 * c0 * k0 + 0.2 * k1
    assert close(loss, ref)
    assert close(m["teacher_0/kd"], k0) and close(m["teacher_1/kd"], k1)
    assert close(m["teacher_0/weight"], 0.8) and close(m["teacher_1/weight"], 0.2)
    assert "teacher_1/projection_accuracy" not in m and close(m["kd"], ref)
    g = torch.randn((), dtype=torch.float64).abs() + 0.5  # upstream gradient other than 1
    (loss * g).backward()
    (ref * g).backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("score", ["ce", "entropy", "max_prob", "bpb"])
def test_sum_dynamic_weights_match_reference(score):
    batch, proj, Vs, Vt, _ = real_problem()
    zs, z0, z1 = problem_logits(bonus0=(3.0,) * 4, bonus1=(1.0,) * 4)
    alpha = 2.0
    mt = build(MultiTeacherConfig(mode="sum", weighting="dynamic", score=score, alpha=alpha), weights=(1.0, 3.0))
    x = zs.clone().requires_grad_()
    loss, m = mt(x, [z0, z1], batch)

    s0, s1 = ref_teacher_scores(z0, z1, batch, score)
    goods = [ref_goodness(s0, score), ref_goodness(s1, score)]
    w = ref_softmax(goods, alpha, [0.25, 0.75])
    r = zs.clone().requires_grad_()
    k0, k1 = ref_kd(r, z0, z1, batch, proj, Vs, Vt)
    ref = w[0] * k0 + w[1] * k1
    assert close(loss, ref)
    assert close(m["teacher_0/weight"], w[0]) and close(m["teacher_1/weight"], w[1])
    sign = 1 if score == "max_prob" else -1
    assert close(m[f"teacher_0/score_{score}"], sign * goods[0])
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-6, atol=1e-9)  # weights are constants


@pytest.mark.parametrize("config", [
    MultiTeacherConfig(mode="sum", weighting="dynamic", score="bpb"),
    MultiTeacherConfig(mode="select_teacher", score="ce", per_sequence=True),
], ids=["sum-dynamic", "select-per-sequence"])
def test_bf16_inputs_close_to_float64(config):
    batch, _, _, _, _ = real_problem()
    zs, z0, z1 = problem_logits()
    mt = build(config)
    ref, m_ref = mt(zs, [z0, z1], batch)
    x = zs.to(torch.bfloat16).requires_grad_()
    loss, m = mt(x, [z0.to(torch.bfloat16), z1.to(torch.bfloat16)], batch)
    loss.backward()
    assert close(loss, ref, tol=2e-3) and bool(torch.isfinite(x.grad.float()).all())
    assert close(m["teacher_0/weight"], m_ref["teacher_0/weight"], tol=1e-2)


def test_padding_does_not_move_scores():
    """Extra padded positions (with garbage logits) leave scores, weights and loss unchanged."""
    batch, _, Vs, Vt, _ = real_problem()
    zs, z0, z1 = problem_logits()
    mt = build(MultiTeacherConfig(mode="sum", weighting="dynamic", score="bpb"))
    loss, m = mt(zs, [z0, z1], batch)
    pad = 3
    pb = {}
    for k, v in batch.items():
        if v.dim() == 2 and not k.endswith(("pair_valid", "pair_is_correct", "chunk_bytes")):
            fill = -1 if k.endswith("chunk_id") else 0
            v = torch.cat([v, torch.full((v.shape[0], pad), fill, dtype=v.dtype)], dim=1)
        pb[k] = v

    def padded(z):
        return torch.cat([z, torch.randn(z.shape[0], pad, z.shape[2], dtype=z.dtype) * 50], dim=1)

    loss2, m2 = mt(padded(zs), [padded(z0), padded(z1)], pb)
    assert close(loss, loss2)
    for k in ("teacher_0/weight", "teacher_0/score_bpb", "teacher_1/score_bpb"):
        assert close(m[k], m2[k])


def test_sum_mixes_any_loss_kinds():
    """Three teachers, three paths: qwen3 by H-KL (teacher 0), llama3 same-vocab KL (teacher 1), qwen3 by
    ALM (teacher 2, so its keys are `teacher_2_*` / `alignment_2_*`)."""
    batch, proj, Vs, Vt, info = real_problem(teachers=("qwen3", "llama3", "qwen3"))
    zs = sharpened_logits(1, batch["input_ids"], batch["token_mask"], Vs, [0.5] * 4)
    z0 = sharpened_logits(2, batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], Vt, [2.0] * 4)
    z1 = sharpened_logits(3, batch["input_ids"], batch["token_mask"], Vs, [1.0] * 4)
    z2 = sharpened_logits(4, batch["teacher_2_input_ids"], batch["teacher_2_token_mask"], Vt, [3.0] * 4)
    teachers = [
        TeacherSpec(name="qwen3-hkl", loss="hkl", weight=0.5, projection=proj, loss_options={"temperature": 2.0}),
        TeacherSpec(name="llama3", loss="kl", weight=0.3),
        TeacherSpec(name="qwen3-alm", loss="alm", weight=0.2, loss_options={"tau": 10.0}),
    ]
    mt = MultiTeacherLoss(teachers, MultiTeacherConfig(), process_group=None)
    x = zs.clone().requires_grad_()
    loss, m = mt(x, [z0, z1, z2], batch)

    r = zs.clone().requires_grad_()
    W = dense_projection(proj.indices, proj.weights, Vs, Vt)
    k0, _ = reference_hybrid(r, z0, batch, reference_common_by_threshold(W), temperature=2.0)
    k1, _ = reference_kl(r, z1, batch)
    k2, _ = reference_alm(r, z2, batch, teacher_index=2, tau=10.0)
    ref = 0.5 * k0 + 0.3 * k1 + 0.2 * k2
    assert close(loss, ref)
    assert close(m["teacher_2/kd"], k2) and "teacher_0/projection_accuracy" in m
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-6, atol=1e-9)


# -------------------------------------------------------------------------------------------------
# select_teacher


@pytest.mark.parametrize("score", ["ce", "bpb"])
@pytest.mark.parametrize("better", [0, 1])
def test_select_teacher_picks_the_better_teacher(better, score):
    batch, proj, Vs, Vt, _ = real_problem()
    strong, weak = (6.0,) * 4, (0.0,) * 4
    zs, z0, z1 = problem_logits(bonus0=strong if better == 0 else weak, bonus1=strong if better == 1 else weak)
    mt = build(MultiTeacherConfig(mode="select_teacher", score=score))
    loss, m = mt(zs, [z0, z1], batch)
    assert float(m[f"teacher_{better}/selected"]) == 1.0
    assert float(m[f"teacher_{1 - better}/selected"]) == 0.0
    k0, k1 = ref_kd(zs, z0, z1, batch, proj, Vs, Vt)
    assert close(loss, (k0, k1)[better])
    assert f"teacher_{1 - better}/kd" not in m  # the other teacher's loss is not computed


def test_select_by_bpb_differs_from_ce_across_tokenizers():
    """On digit-heavy text Qwen spends a token per digit. With the same-ish per-token CE, Qwen wins on
    per-token CE but loses on bits per byte: CE is not comparable across tokenizers, BPB is."""
    texts = ("Call 5551234567 or 9876543210 before 20250101.", "Totals: 123456, 789012, 345678 and 901234.")
    batch, proj, Vs, Vt, _ = real_problem(texts)
    n0 = int(batch["teacher_0_token_mask"].sum())
    n1 = int(batch["token_mask"].sum())
    assert n0 > 1.5 * n1  # Qwen splits digits

    def exact(ids, mask, vocab, p_true):
        """Logits giving probability p_true to each true next token, the rest spread evenly."""
        B, L = ids.shape
        z = torch.full((B, L, vocab), math.log((1 - p_true) / (vocab - 1)), dtype=torch.float64)
        for b in range(B):
            for p in range(L - 1):
                if mask[b, p] and mask[b, p + 1]:
                    z[b, p, int(ids[b, p + 1])] = math.log(p_true)
        return z

    z0 = exact(batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], Vt, 0.5)
    z1 = exact(batch["input_ids"], batch["token_mask"], Vs, 0.4)
    zs = torch.randn(batch["input_ids"].shape + (Vs,), dtype=torch.float64)
    teachers = [TeacherSpec(name="qwen3", loss="pkl", projection=proj, loss_options={"top_k_columns": None}),
                TeacherSpec(name="llama3", loss="kl")]
    by_ce = MultiTeacherLoss(teachers, MultiTeacherConfig(mode="select_teacher", score="ce"), process_group=None)
    by_bpb = MultiTeacherLoss(teachers, MultiTeacherConfig(mode="select_teacher"), process_group=None)
    assert by_bpb.score == "bpb"  # "auto" with a cross-tokenizer teacher
    _, m_ce = by_ce(zs, [z0, z1], batch)
    _, m_bpb = by_bpb(zs, [z0, z1], batch)
    assert float(m_ce["teacher_0/selected"]) == 1.0
    assert float(m_bpb["teacher_1/selected"]) == 1.0


def test_select_per_sequence():
    """Each sequence uses its own best teacher; each teacher's part is divided by its units over all
    kept sequences, so the result is a mean over units of the selected teacher's loss."""
    batch, proj, Vs, Vt, _ = real_problem()
    b0, b1 = (6.0, 0.0, 6.0, 0.0), (0.0, 6.0, 0.0, 6.0)
    zs, z0, z1 = problem_logits(bonus0=b0, bonus1=b1)
    mt = build(MultiTeacherConfig(mode="select_teacher", score="ce", per_sequence=True))
    x = zs.clone().requires_grad_()
    loss, m = mt(x, [z0, z1], batch)

    s0, s1 = ref_teacher_scores(z0, z1, batch, "ce")
    sel = [0 if s0[b][0] / s0[b][1] < s1[b][0] / s1[b][1] else 1 for b in range(4)]
    assert sel == [0, 1, 0, 1]
    _, n0, _ = reference_pkl(zs, z0, batch, dense_projection(proj.indices, proj.weights, Vs, Vt),
                             top_k_columns=TOP_K_COLUMNS)
    _, n1 = reference_kl(zs, z1, batch)
    masks = [batch["sample_mask"] & torch.tensor([s == i for s in sel]) for i in range(2)]
    r = zs.clone().requires_grad_()
    k0, _ = ref_kd(r, z0, z1, dict(batch, sample_mask=masks[0]), proj, Vs, Vt, norms=(n0, n1))
    _, k1 = ref_kd(r, z0, z1, dict(batch, sample_mask=masks[1]), proj, Vs, Vt, norms=(n0, n1))
    ref = k0 + k1
    assert close(loss, ref)
    assert close(m["teacher_0/selected"], 0.5) and close(m["teacher_1/selected"], 0.5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-6, atol=1e-9)


def test_per_sequence_dynamic_weights_reach_the_loss():
    """Per-sequence dynamic weights go to losses that take `sequence_weights` (stand-in losses here:
    the library losses do not take it yet)."""
    batch, proj, Vs, Vt, _ = real_problem()
    zs, z0, z1 = problem_logits(bonus0=(4.0, 0.0, 2.0, 1.0), bonus1=(0.0, 4.0, 1.0, 2.0))
    seen = {}

    def standin(i):
        def loss_fn(student_logits, teacher_outputs, batch, *, normalizer=None, sequence_weights=None,
                    teacher_index=None, projection=None):
            seen[i] = sequence_weights.clone()
            per_seq = student_logits.sum(dim=(1, 2)) * (i + 1)
            return (per_seq * sequence_weights).sum(), {}
        return loss_fn

    teachers = [TeacherSpec(name="qwen3", loss="pkl", projection=proj, loss_fn=standin(0)),
                TeacherSpec(name="llama3", loss="kl", loss_fn=standin(1))]
    mt = MultiTeacherLoss(teachers, MultiTeacherConfig(weighting="dynamic", score="ce", per_sequence=True,
                                                       projection_accuracy=False), process_group=None)
    loss, m = mt(zs, [z0, z1], batch)
    s0, s1 = ref_teacher_scores(z0, z1, batch, "ce")
    per_seq = zs.sum(dim=(1, 2))
    ref = 0.0
    for b in range(4):
        w = ref_softmax([-s0[b][0] / s0[b][1], -s1[b][0] / s1[b][1]], 1.0, [0.5, 0.5])
        assert close(seen[0][b], w[0]) and close(seen[1][b], w[1])
        ref += float(per_seq[b]) * (w[0] + 2 * w[1])
    assert close(loss, ref)
    kept = batch["sample_mask"].double()
    assert close(m["teacher_0/weight"], float((seen[0] * kept).sum() / kept.sum()))


# -------------------------------------------------------------------------------------------------
# averaged_logits


def two_llama_teachers(**opts):
    _, _, _, _, info = real_problem()
    return [TeacherSpec(name=n, loss="kl", weight=w, fingerprint=info["llama"], loss_options=dict(opts))
            for n, w in (("llama3-a", 0.3), ("llama3-b", 0.7))]


def two_llama_batch(batch):
    """The real batch relabelled as aligned for two same-vocab llama3 teachers (its teacher fingerprint
    keys say so; the qwen3 token keys left in it are not read by same-vocab teachers)."""
    out = dict(batch)
    for i in (0, 1):
        out[f"teacher_{i}_tokenizer_fingerprint"] = batch["tokenizer_fingerprint"].clone()
    return out


def test_averaged_logits_full_matches_reference():
    batch, _, Vs, _, _ = real_problem()
    batch = two_llama_batch(batch)
    zs, _, z1 = problem_logits()
    z2 = sharpened_logits(9, batch["input_ids"], batch["token_mask"], Vs, [3.0] * 4)
    mt = build(MultiTeacherConfig(mode="averaged_logits"), teachers=two_llama_teachers(temperature=2.0))
    x = zs.clone().requires_grad_()
    loss, m = mt(x, [z1, z2], batch)
    r = zs.clone().requires_grad_()
    ref, _ = reference_kl(r, 0.3 * z1 + 0.7 * z2, batch, temperature=2.0)
    assert close(loss, ref)
    assert close(m["teacher_1/weight"], 0.7)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=1e-6, atol=1e-9)


def test_averaged_logits_dynamic_weights():
    batch, _, Vs, _, _ = real_problem()
    batch = two_llama_batch(batch)
    zs, _, z1 = problem_logits()
    z2 = sharpened_logits(9, batch["input_ids"], batch["token_mask"], Vs, [3.0] * 4)
    mt = build(MultiTeacherConfig(mode="averaged_logits", weighting="dynamic", score="entropy", alpha=0.5),
               teachers=two_llama_teachers())
    loss, m = mt(zs, [z1, z2], batch)
    e1 = ref_scores(z1, batch["input_ids"], batch["token_mask"], None, batch, "entropy")
    e2 = ref_scores(z2, batch["input_ids"], batch["token_mask"], None, batch, "entropy")
    w = ref_softmax([ref_goodness(e1, "entropy"), ref_goodness(e2, "entropy")], 0.5, [0.3, 0.7])
    ref, _ = reference_kl(zs, w[0] * z1 + w[1] * z2, batch)
    assert close(loss, ref) and close(m["teacher_0/weight"], w[0])


def test_averaged_logits_per_sequence_weights():
    batch, _, Vs, _, _ = real_problem()
    batch = two_llama_batch(batch)
    zs, _, z1 = problem_logits(bonus1=(3.0, 0.0, 1.0, 2.0))
    z2 = sharpened_logits(9, batch["input_ids"], batch["token_mask"], Vs, (0.0, 3.0, 2.0, 1.0))
    mt = build(MultiTeacherConfig(mode="averaged_logits", weighting="dynamic", score="ce", per_sequence=True),
               teachers=two_llama_teachers())
    loss, _ = mt(zs, [z1, z2], batch)
    e1 = ref_scores(z1, batch["input_ids"], batch["token_mask"], None, batch, "ce")
    e2 = ref_scores(z2, batch["input_ids"], batch["token_mask"], None, batch, "ce")
    avg = torch.empty_like(z1)
    for b in range(4):
        if e1[b][1] == 0:  # a dropped sample: the prior
            w = [0.3, 0.7]
        else:
            w = ref_softmax([-e1[b][0] / e1[b][1], -e2[b][0] / e2[b][1]], 1.0, [0.3, 0.7])
        avg[b] = w[0] * z1[b] + w[1] * z2[b]
    ref, _ = reference_kl(zs, avg, batch)
    assert close(loss, ref)


def topk_of(z, k, order_seed=None):
    lp = torch.log_softmax(z, dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    if order_seed is not None:  # same set, another order
        g = torch.Generator().manual_seed(order_seed)
        perm = torch.randperm(k, generator=g)
        vals, idx = vals[..., perm], idx[..., perm]
    return vals, idx


def test_averaged_logits_topk_same_support():
    """Top-k teachers listing the same tokens: the KL conditioned on that set against the weighted
    mean of their log-probabilities, which equals the conditioned KL against the averaged logits."""
    batch, _, Vs, _, _ = real_problem()
    batch = two_llama_batch(batch)
    zs, _, z1 = problem_logits()
    z2 = z1 + 0.3 * torch.randn(z1.shape, dtype=torch.float64)
    _, idx = topk_of(z1, 8)
    lp1 = torch.log_softmax(z1, -1).gather(2, idx)
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(8, generator=g)
    idx2 = idx[..., perm]
    lp2 = torch.log_softmax(z2, -1).gather(2, idx2)
    t1 = {"topk_logprobs": lp1, "topk_indices": idx}
    t2 = {"topk_logprobs": lp2, "topk_indices": idx2}
    mt = build(MultiTeacherConfig(mode="averaged_logits"), teachers=two_llama_teachers(tail="renormalize"))
    loss, _ = mt(zs, [t1, t2], batch)
    avg = 0.3 * z1 + 0.7 * z2
    ref_t = {"topk_logprobs": torch.log_softmax(avg, -1).gather(2, idx), "topk_indices": idx}
    ref, _ = reference_kl(zs, ref_t, batch, tail="renormalize")
    assert close(loss, ref)
    # a full-logits teacher joins on the top-k teacher's set
    loss_mixed, _ = mt(zs, [t1, z2], batch)
    assert close(loss_mixed, ref)


def test_averaged_logits_topk_refusals():
    batch, _, Vs, _, _ = real_problem()
    batch = two_llama_batch(batch)
    zs, _, z1 = problem_logits()
    lp1, idx1 = topk_of(z1, 8)
    lp2, idx2 = topk_of(z1 + 2 * torch.randn(z1.shape, dtype=torch.float64), 8)
    mt = build(MultiTeacherConfig(mode="averaged_logits"), teachers=two_llama_teachers(tail="renormalize"))
    with pytest.raises(LossInputError, match="different top-k token sets"):
        mt(zs, [{"topk_logprobs": lp1, "topk_indices": idx1}, {"topk_logprobs": lp2, "topk_indices": idx2}], batch)
    bucket = build(MultiTeacherConfig(mode="averaged_logits"), teachers=two_llama_teachers())
    with pytest.raises(LossInputError, match="tail': 'renormalize'"):
        bucket(zs, [{"topk_logprobs": lp1, "topk_indices": idx1}] * 2, batch)


# -------------------------------------------------------------------------------------------------
# metrics


def ref_projection_accuracy(zs, z0, batch, W):
    """(hits, units) over correct chunks at their starts, by loops with a dense W."""
    hits = units = 0
    cid_s, cid_t = batch["alignment_0_student_chunk_id"], batch["alignment_0_teacher_chunk_id"]
    Ls, Lt = cid_s.shape[1], cid_t.shape[1]
    for b in range(cid_s.shape[0]):
        for c in range(batch["alignment_0_pair_valid"].shape[1]):
            if not (batch["alignment_0_pair_valid"][b, c] and batch["alignment_0_pair_is_correct"][b, c]):
                continue
            ps = [p for p in range(Ls - 1) if next_token_valid(batch, b, p, Ls) and cid_s[b, p + 1] == c
                  and cid_s[b, p] != c]
            pt = [p for p in range(Lt - 1) if next_token_valid(batch, b, p, Lt, "teacher_0_")
                  and cid_t[b, p + 1] == c and cid_t[b, p] != c]
            if not ps or not pt:
                continue
            q = torch.softmax(zs[b, ps[0]], 0) @ W
            units += 1
            hits += int(int(q.argmax()) == int(z0[b, pt[0]].argmax()))
    return hits, units


def test_projection_accuracy_matches_reference():
    """Flat students take the full projection, peaked ones the top-m bound; both are exact."""
    batch, proj, Vs, Vt, _ = real_problem()
    zs, z0, z1 = problem_logits()
    W = dense_projection(proj.indices, proj.weights, Vs, Vt)
    mt = build(MultiTeacherConfig())
    _, m = mt(zs, [z0, z1], batch)
    hits, units = ref_projection_accuracy(zs, z0, batch, W)
    assert units > 20
    assert close(m["teacher_0/projection_accuracy"], hits / units)
    # peaked student and teacher, both sure of the true next token: high accuracy, same as the loops
    zs_good, z0_good = zs.clone(), z0.clone()
    Ls, Lt = zs.shape[1], z0.shape[1]
    for b in range(4):
        for p in range(Ls - 1):
            zs_good[b, p, int(batch["input_ids"][b, p + 1])] += 30.0
        for p in range(Lt - 1):
            z0_good[b, p, int(batch["teacher_0_input_ids"][b, p + 1])] += 30.0
    _, m_good = mt(zs_good, [z0_good, z1], batch)
    hits, units = ref_projection_accuracy(zs_good, z0_good, batch, W)
    assert close(m_good["teacher_0/projection_accuracy"], hits / units)
    assert float(m_good["teacher_0/projection_accuracy"]) > 0.8 > float(m["teacher_0/projection_accuracy"])
    # top-k teacher outputs (listed in any order): the listed token with the highest log-probability
    from xtoken_loss.multi_teacher.scores import projection_accuracy_counts

    lp, idx = torch.log_softmax(z0_good, -1).topk(4, dim=-1)
    perm = torch.tensor([2, 0, 3, 1])
    h, u = projection_accuracy_counts(zs_good, {"topk_logprobs": lp[..., perm], "topk_indices": idx[..., perm]},
                                      batch, proj, teacher_index=0)
    assert (float(h), float(u)) == (hits, units)


def test_projected_argmax_paths_agree():
    """The top-m bound path and the full projection give the same argmax, including near-ties."""
    from xtoken_loss.multi_teacher.scores import _argmax_tables, projected_argmax

    _, proj, Vs, Vt, _ = real_problem()
    g = torch.Generator().manual_seed(3)
    z = torch.randn(64, Vs, generator=g, dtype=torch.float64) * 3
    z[:32, :5] += 20.0  # peaked rows, some near-ties among the first tokens
    p = torch.softmax(z, dim=1)
    tables = _argmax_tables(proj, Vs, Vt, torch.float64, None)
    cols = proj.reachable_columns(Vt).nonzero().squeeze(1)
    W = dense_projection(proj.indices, proj.weights, Vs, Vt)
    dense = cols[(p @ W)[:, cols].argmax(dim=1)]
    for top_m in (1, 8, Vs):  # 1: mostly the full path; Vs: every row decided by the bound
        assert torch.equal(projected_argmax(z, proj, tables, top_m=top_m), dense)


def test_normalizer_forms():
    batch, proj, Vs, Vt, _ = real_problem()
    zs, z0, z1 = problem_logits()
    mt = build(MultiTeacherConfig(), weights=(0.5, 0.5))
    k0, k1 = ref_kd(zs, z0, z1, batch, proj, Vs, Vt, norms=(7.0, 11.0))
    loss, _ = mt(zs, [z0, z1], batch, normalizer=[7.0, 11.0])
    assert close(loss, 0.5 * k0 + 0.5 * k1)
    k0, k1 = ref_kd(zs, z0, z1, batch, proj, Vs, Vt, norms=(13.0, 13.0))
    loss, _ = mt(zs, [z0, z1], batch, normalizer=13.0)
    assert close(loss, 0.5 * k0 + 0.5 * k1)
    loss_g, _ = mt(zs, [z0, z1], batch, normalizer="global")  # no group: the local counts
    loss_n, _ = mt(zs, [z0, z1], batch)
    assert close(loss_g, loss_n)
    with pytest.raises(LossInputError, match="one per teacher"):
        mt(zs, [z0, z1], batch, normalizer=[1.0])
    with pytest.raises(LossInputError, match="list of 2 teacher outputs"):
        mt(zs, [z0], batch)


# -------------------------------------------------------------------------------------------------
# construction errors


def test_construction_errors():
    batch, proj, Vs, Vt, info = real_problem()
    qwen, llama = teacher_specs()
    with pytest.raises(LossOptionError, match="averaged_logits.*cross-tokenizer"):
        MultiTeacherLoss([qwen, llama], MultiTeacherConfig(mode="averaged_logits"))
    with pytest.raises(LossOptionError, match="weighting='dynamic' with mode='select_teacher'"):
        MultiTeacherConfig(mode="select_teacher", weighting="dynamic")
    with pytest.raises(LossOptionError, match="alpha is used only"):
        MultiTeacherConfig(alpha=2.0)
    with pytest.raises(LossOptionError, match="score='ce' is unused"):
        MultiTeacherConfig(score="ce")
    with pytest.raises(LossOptionError, match="mode=.*valid values are 'sum', 'averaged_logits', 'select_teacher'"):
        MultiTeacherConfig(mode="mean")
    with pytest.raises(LossOptionError, match="per_sequence=True needs per-sequence scores"):
        MultiTeacherConfig(per_sequence=True)
    with pytest.raises(LossOptionError, match="sum to 0"):
        MultiTeacherLoss(teacher_specs(weights=(0.0, 0.0)), process_group=None)
    with pytest.raises(LossOptionError, match="weights has 1 entries but names has 2"):
        build_teachers(names=["a", "b"], losses=["kl", "kl"], weights=[1.0])
    with pytest.raises(LossOptionError, match="fingerprint .* differs from the student's"):
        MultiTeacherLoss([TeacherSpec(name="qwen-as-kl", loss="kl", fingerprint=info["qwen"])],
                         student_fingerprint=info["llama"])
    with pytest.raises(LossOptionError, match="vocab_size 151669 differs"):
        MultiTeacherLoss([TeacherSpec(name="x", loss="kl", vocab_size=151669)], student_vocab_size=128256)
    with pytest.raises(LossOptionError, match="projection is required for loss 'pkl'"):
        TeacherSpec(name="q", loss="pkl")
    with pytest.raises(LossOptionError, match="projection must be None for loss 'kl'"):
        TeacherSpec(name="q", loss="kl", projection=proj)
    with pytest.raises(LossOptionError, match="TeacherSpec.weight must be a finite number >= 0"):
        TeacherSpec(name="q", loss="kl", weight=-1.0)
    assert TeacherSpec(name="q", loss="gold", projection=proj).projection is proj  # GOLD reads a Projection's row_kind
    with pytest.raises(LossOptionError, match="TeacherSpec.loss='ce' uses no teacher"):
        TeacherSpec(name="q", loss="ce")
    with pytest.raises(LossOptionError, match="must not set 'normalizer'"):
        TeacherSpec(name="q", loss="kl", loss_options={"normalizer": 3})
    with pytest.raises(LossOptionError, match="weight would be ignored"):
        build(MultiTeacherConfig(mode="select_teacher"), weights=(0.8, 0.2))
    with pytest.raises(LossOptionError, match="vocab_size_normalization needs every teacher's vocab size"):
        MultiTeacherLoss([TeacherSpec(name="a", loss="kl"), TeacherSpec(name="b", loss="kl")],
                         MultiTeacherConfig(vocab_size_normalization=True))
    with pytest.raises(LossOptionError, match="need a loss function with a `sequence_weights` option"):
        build(MultiTeacherConfig(weighting="dynamic", per_sequence=True))
    with pytest.raises(LossOptionError, match="names must be distinct"):
        MultiTeacherLoss([TeacherSpec(name="a", loss="kl"), TeacherSpec(name="a", loss="kl")])
    with pytest.raises(ProjectionArtifactError, match="built for student fingerprint"):
        MultiTeacherLoss([qwen], student_fingerprint="sha256:other")


def test_function_form_and_artifact_path(tmp_path):
    """`multi_teacher_loss` gives the class's result; a projection artifact directory loads with its
    fingerprints checked."""
    batch, proj, Vs, Vt, info = real_problem()
    zs, z0, z1 = problem_logits()
    loss_cls, _ = build(MultiTeacherConfig(mode="sum"), weights=(0.6, 0.4))(zs, [z0, z1], batch)
    loss_fn, _ = multi_teacher_loss(zs, [z0, z1], batch, teachers=teacher_specs(weights=(0.6, 0.4)),
                                    student_fingerprint=info["llama"], process_group=None, mode="sum")
    assert close(loss_cls, loss_fn)
    real_projection().save(tmp_path / "proj")
    spec = TeacherSpec(name="qwen3", loss="pkl", fingerprint=info["qwen"], projection=tmp_path / "proj")
    assert spec.load_projection(student_fingerprint=info["llama"]).num_rows == info["V_llama"]
    with pytest.raises(ProjectionArtifactError, match="fingerprint"):
        TeacherSpec(name="qwen3", loss="pkl", fingerprint="sha256:nope",
                    projection=tmp_path / "proj").load_projection()


def test_full_vocabulary_gold_and_kl_from_an_artifact(tmp_path):
    """Real widths (128,256 x 151,669), a GOLD teacher read from an artifact directory (its exact rows),
    and a same-vocab teacher: the multi-teacher sum equals the weighted direct calls."""
    from xtoken_align.batch.collate import AlignmentCollator, CollateConfig
    from xtoken_loss.losses.hybrid import gold_loss
    from xtoken_loss.losses.kl import kl_loss

    llama, qwen = tokenizers()
    real_projection().save(tmp_path / "proj")
    batch = AlignmentCollator(llama, [qwen, llama], CollateConfig(max_length=12))(["Hello world, 2024 was long."])
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(1, batch["input_ids"].shape[1], llama.vocab_size, generator=g)
    z0 = torch.randn(1, batch["teacher_0_input_ids"].shape[1], qwen.vocab_size, generator=g)
    z1 = torch.randn(zs.shape, generator=g)
    teachers = [
        TeacherSpec(name="qwen3", loss="gold", weight=0.7, fingerprint=qwen.fingerprint, vocab_size=qwen.vocab_size,
                    projection=tmp_path / "proj"),
        TeacherSpec(name="llama3", loss="kl", weight=0.3, fingerprint=llama.fingerprint),
    ]
    mt = MultiTeacherLoss(teachers, student_fingerprint=llama.fingerprint, student_vocab_size=llama.vocab_size,
                          process_group=None)
    loss, m = mt(zs, [z0, z1], batch)
    k0, _ = gold_loss(zs, z0, batch, projection=str(tmp_path / "proj"), teacher_index=0)
    k1, _ = kl_loss(zs, z1, batch)
    assert close(loss, 0.7 * k0 + 0.3 * k1, tol=1e-5)
    assert 0.0 <= float(m["teacher_0/projection_accuracy"]) <= 1.0

    # the docs/multi_teacher.md example runs as written
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "multi_teacher.md").read_text()
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    ns = {"qwen": qwen, "llama": llama, "projection_dir": tmp_path / "proj", "student_logits": zs,
          "qwen_logits": z0, "llama_logits": z1, "batch": batch}
    exec(snippet, ns)
    assert torch.isfinite(ns["loss"]) and "teacher_0/kd" in ns["metrics"]



# -------------------------------------------------------------------------------------------------
# every loss kind: normalizer="global" and per-sequence selection (unit counts from the references)


def _kind_problem(kind, seed=0):
    """A synthetic batch with teachers 0 and 1 on the same alignment, the student logits, two teachers'
    logits (teacher 1 sharpened towards the actual next tokens on sequences 0 and 2, blunted elsewhere,
    so per-sequence CE selects it exactly there) and the two `TeacherSpec`s of loss `kind`."""
    from tests.reference_losses import random_logits, random_projection, synthetic_batch
    from xtoken_loss.registry import REGISTRY

    batch = synthetic_batch(seed)
    for k in list(batch):
        if k.startswith(("teacher_0_", "alignment_0_")):
            batch[k.replace("_0_", "_1_", 1)] = batch[k].clone()
    Ls = batch["input_ids"].shape[1]
    spec = REGISTRY[kind]
    zs = random_logits(seed + 1, (3, Ls, 40))
    ids, mask, V = ((batch["input_ids"], batch["token_mask"], 40) if spec.same_vocab
                    else (batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], 50))
    z0 = random_logits(seed + 2, (3, ids.shape[1], V))
    nxt = torch.zeros_like(ids)
    nxt[:, :-1] = ids[:, 1:]
    real = torch.zeros_like(mask)
    real[:, :-1] = mask[:, :-1] & mask[:, 1:]
    onehot = torch.nn.functional.one_hot(nxt, V).to(torch.float64) * real[..., None]
    better = torch.tensor([True, False, True])
    z1 = z0 + 3.0 * torch.where(better, 1.0, -1.0)[:, None, None] * onehot
    idx, w = random_projection(seed + 3, 40, 50)
    proj = Projection.from_tensors(idx, w)
    extra, options = {}, {}
    if kind == "pkl":
        extra = {"projection": proj}
    elif kind == "hkl":
        extra, options = {"projection": proj}, {"threshold": 0.3}
    elif kind == "gold":
        options = {"common": torch.arange(40) % 45}
    specs = [TeacherSpec(name=f"t{i}", loss=kind, loss_options=options, **extra) for i in range(2)]
    call = dict(options)
    if kind == "hkl":
        from xtoken_loss.losses.hybrid import common_by_threshold

        call = {"common": common_by_threshold(proj, 0.3)}
    elif kind == "pkl":
        call["projection"] = proj
    return batch, zs, (z0, z1), idx, w, specs, call, better


def _units(kind, batch, zs, zt, idx, w):
    from tests.test_loss_registry import _reference_count  # what the float64 reference sums over

    return max(_reference_count(kind, batch, zs, zt, idx, w, {}), 1)


KINDS = ["pkl", "hkl", "gold", "uld", "alm", "kl"]


def test_kind_tests_cover_every_teacher_kind():
    from xtoken_loss.registry import teacher_kinds

    assert set(KINDS) == set(teacher_kinds())


@pytest.mark.parametrize("kind", KINDS)
def test_global_normalizer_works_for_every_kind(kind):
    from xtoken_loss.registry import REGISTRY

    batch, zs, (z0, _z1), idx, w, specs, call, _ = _kind_problem(kind)
    fn = REGISTRY[kind].function
    mt = MultiTeacherLoss(specs[:1], MultiTeacherConfig(), process_group=None)
    got, _ = mt(zs, [z0], batch, normalizer="global")
    n = _units(kind, batch, zs, z0, idx, w)
    want, _ = fn(zs, z0, batch, normalizer=float(n), **call)
    assert close(got, want, 1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sequence_selection_works_for_every_kind(kind):
    from xtoken_loss.registry import REGISTRY

    batch, zs, zts, idx, w, specs, call, better = _kind_problem(kind)
    spec = REGISTRY[kind]
    mt = MultiTeacherLoss(specs, MultiTeacherConfig(mode="select_teacher", score="ce", per_sequence=True),
                          process_group=None)
    zs_g = zs.clone().requires_grad_()
    got, metrics = mt(zs_g, list(zts), batch)
    got.backward()
    kept = batch["sample_mask"]
    sel = better.to(torch.int64)  # teacher 1 where it was sharpened
    zr = zs.clone().requires_grad_()
    want = 0.0
    for i in range(2):
        b_i = dict(batch)
        b_i["sample_mask"] = kept & (sel == i)
        n = _units(kind, batch, zs, zts[i], idx, w)  # the teacher's units in *all* kept sequences
        opts = dict(call) if spec.same_vocab else {**call, "teacher_index": i}
        loss_i, _ = spec.function(zr, zts[i], b_i, normalizer=float(n), **opts)
        want = want + loss_i
    want.backward()
    assert close(got, want, 1e-10)
    assert torch.allclose(zs_g.grad, zr.grad, rtol=1e-9, atol=1e-12)
    frac = float((kept & better).sum()) / float(kept.sum())
    assert close(metrics["teacher_1/selected"], frac)
