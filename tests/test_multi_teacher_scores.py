"""Per-teacher scores (`xtoken_loss.multi_teacher.scores`): top-k teacher outputs against full logits, reduced
precision, padding, and the errors for missing inputs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_multi_teacher import problem_logits, real_problem, ref_scores
from xtoken_core.errors import LossInputError
from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig, MultiTeacherLoss
from xtoken_loss.multi_teacher.scores import goodness, score_values, teacher_score_sums
from xtoken_loss.multi_teacher.teachers import TeacherSpec


def topk_outputs(z, ids, k):
    lp = torch.log_softmax(z, dim=-1)
    vals, idx = lp.topk(k, dim=-1)
    target = torch.zeros(ids.shape, dtype=lp.dtype)
    target[:, :-1] = lp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    return {"topk_logprobs": vals, "topk_indices": idx, "target_logprob": target}


@pytest.mark.parametrize("score", ["ce", "entropy", "max_prob", "bpb"])
def test_scores_match_loops_full_and_topk(score):
    batch, _, Vs, Vt, _ = real_problem()
    _, z0, z1 = problem_logits()
    s0 = ref_scores(z0, batch["teacher_0_input_ids"], batch["teacher_0_token_mask"], batch["teacher_0_token_bytes"],
                    batch, score)
    sums, counts = teacher_score_sums(z0, batch, score=score, teacher_index=0, position_chunk_size=7)
    for b in range(4):
        assert math.isclose(float(sums[b]), s0[b][0], rel_tol=1e-9, abs_tol=1e-9)
        assert float(counts[b]) == s0[b][1]
    # same-vocab teacher: student keys
    s1 = ref_scores(z1, batch["input_ids"], batch["token_mask"], batch["token_bytes"], batch, score)
    sums1, _ = teacher_score_sums(z1, batch, score=score)
    assert all(math.isclose(float(sums1[b]), s1[b][0], rel_tol=1e-9, abs_tol=1e-9) for b in range(4))
    # top-k outputs: exact for ce / bpb (target_logprob) and max_prob; entropy is a lower bound
    tk = topk_outputs(z0, batch["teacher_0_input_ids"], 8)
    sums_k, counts_k = teacher_score_sums(tk, batch, score=score, teacher_index=0)
    assert torch.equal(counts_k, counts)
    if score == "entropy":
        assert bool((sums_k <= sums + 1e-9).all()) and bool((sums_k > 0.5 * sums).all())
        full_k = teacher_score_sums(topk_outputs(z0, batch["teacher_0_input_ids"], Vt), batch, score=score,
                                    teacher_index=0)[0]
        torch.testing.assert_close(full_k, sums)  # k = V: the coarsening is the identity
    else:
        torch.testing.assert_close(sums_k, sums)


def test_scores_low_precision_and_padding():
    batch, _, _, _, _ = real_problem()
    _, z0, _ = problem_logits()
    ref = score_values(*teacher_score_sums(z0, batch, score="bpb", teacher_index=0))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = score_values(*teacher_score_sums(z0.to(dtype), batch, score="bpb", teacher_index=0))
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    dropped = dict(batch, sample_mask=torch.tensor([True, False, True, True]))
    s, c = teacher_score_sums(z0, dropped, score="ce", teacher_index=0)
    assert float(s[1]) == 0.0 and float(c[1]) == 0.0
    v = score_values(s, c)
    assert math.isnan(float(v[1])) and float(goodness("ce", v)[1]) == float("-inf")


def test_score_input_errors():
    batch, proj, _, _, _ = real_problem()
    _, z0, z1 = problem_logits()
    tk = topk_outputs(z0, batch["teacher_0_input_ids"], 8)
    del tk["target_logprob"]
    with pytest.raises(LossInputError, match="needs 'target_logprob'"):
        teacher_score_sums(tk, batch, score="ce", teacher_index=0)
    no_bytes = {k: v for k, v in batch.items() if k != "teacher_0_token_bytes"}
    with pytest.raises(LossInputError, match="needs batch\\['teacher_0_token_bytes'\\]"):
        teacher_score_sums(z0, no_bytes, score="bpb", teacher_index=0)
    with pytest.raises(Exception, match="valid values are 'ce', 'entropy', 'max_prob', 'bpb'"):
        teacher_score_sums(z0, batch, score="perplexity", teacher_index=0)
    # through the multi-teacher loss: the missing key is named before any loss is computed
    teachers = [TeacherSpec(name="qwen3", loss="pkl", projection=proj, loss_options={"top_k_columns": None}),
                TeacherSpec(name="llama3", loss="kl")]
    mt = MultiTeacherLoss(teachers, MultiTeacherConfig(mode="select_teacher", score="bpb"), process_group=None)
    with pytest.raises(LossInputError, match="teacher_0_token_bytes"):
        mt(torch.zeros(batch["input_ids"].shape + (z1.shape[2],), dtype=torch.float64), [z0, z1], no_bytes)
