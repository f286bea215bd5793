"""The quality benchmark's pieces (benchmarks/quality/): the RESULT definitions on made-up numbers, every
arm's trainer config, the digit-heavy subset, and the evaluation of a finished student on a file (it
must reproduce the trainer's own final eval/bpb)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.quality import protocol as P
from benchmarks.quality import result as R
from benchmarks.quality.digits import digit_fraction, is_digit_heavy, write_digit_subset
from xtoken_loss.trainer.config import TrainConfig

BPB = {"ce": 2.00, "same_kl": 1.80, "pkl": 1.90, "hkl": 1.85, "alm": 1.95, "gold": 1.88, "uld": 1.97,
       "public_pkl": 1.99, "public_gold": 1.96, "sum_static": 1.83, "sum_dynamic": 1.79, "select": 1.81,
       "pkl_full": 1.87}


def test_result_definitions_on_made_up_numbers():
    v = R.result_values(BPB)
    # best cross = H-KL 1.85 (GOLD's 1.88 and ULD are comparisons, not candidates)
    assert v["recovery"] == pytest.approx((2.00 - 1.85) / (2.00 - 1.80))
    assert v["best_cross_minus_uld_bpb"] == pytest.approx(1.85 - 1.97)
    assert v["best_cross_minus_gold_bpb"] == pytest.approx(1.85 - 1.88)
    assert v["multi_minus_best_single_bpb"] == pytest.approx(1.79 - 1.80)  # best single = same-vocab 1.80
    assert v["pkl_minus_public_pkl_bpb"] == pytest.approx(1.90 - 1.99)
    assert v["cache_minus_full_bpb"] == pytest.approx(1.90 - 1.87)
    line = R.result_line(v)
    assert line == ("RESULT recovery=0.750 best_cross_minus_uld_bpb=-0.1200 best_cross_minus_gold_bpb=-0.0300 "
                    "multi_minus_best_single_bpb=-0.0100 pkl_minus_public_pkl_bpb=-0.0900 cache_minus_full_bpb=0.0300")
    met = dict(R.targets(v))
    assert list(met.values()) == [False, True, True, True]


def test_a_gold_arm_below_every_candidate_is_not_best_cross_and_best_single_can_be_cross():
    v = R.result_values({**BPB, "gold": 1.50, "hkl": 1.70})
    assert v["recovery"] == pytest.approx(0.30 / 0.20)  # above 1: cross beats same-vocab KD
    assert v["best_cross_minus_gold_bpb"] == pytest.approx(0.20)
    assert v["multi_minus_best_single_bpb"] == pytest.approx(1.79 - 1.70)


def test_no_same_vocab_gain_or_missing_arms_give_nan_not_numbers():
    v = R.result_values({**BPB, "same_kl": 2.01})
    assert math.isnan(v["recovery"]) and "recovery=nan" in R.result_line(v)
    w = R.result_values({k: x for k, x in BPB.items() if k != "select"})
    assert math.isnan(w["multi_minus_best_single_bpb"]) and math.isfinite(w["cache_minus_full_bpb"])
    assert dict(R.targets(w))["two teachers are at least as good as the best single teacher"] is None
    assert math.isnan(R.result_values({**BPB, "pkl": math.nan})["recovery"])


def test_the_arms_are_the_issues_and_every_config_validates(tmp_path):
    assert len(P.ARMS) == 13 and len(set(P.ARM_NAMES)) == 13
    assert set(R.NEEDED) <= set(P.ARM_NAMES)
    models = {"qwen3": str(tmp_path / "q"), "llama3": str(tmp_path / "l")}
    caches = {"qwen3": str(tmp_path / "cq"), "llama3": str(tmp_path / "cl")}
    for p in P.PROTOCOLS.values():
        assert p.teacher_max_length == 4 * p.max_length  # a teacher's budget never cuts the student short
        assert p.teacher["max_position_embeddings"] >= p.teacher_max_length
        TrainConfig.from_dict(P.pretrain_config(p, "data/corpus/train.jsonl", "data/corpus/heldout.jsonl"))
        for a in P.ARMS:
            cfg = TrainConfig.from_dict(P.arm_config(p, a, 1, str(tmp_path / a.name), "data/corpus/train.jsonl",
                                                     "data/corpus/heldout.jsonl", models, caches))
            assert cfg.seed == 1 and cfg.max_steps == p.steps and cfg.optim.lr == p.lr  # one protocol
            assert cfg.student.restrict_vocab and cfg.student.model == p.student
            for t, use in zip(cfg.teachers, a.teachers):
                assert (t.cache is not None) == (use.source == "cache")
                assert t.model == models[t.name]
    by = {a.name: a for a in P.ARMS}
    assert [t.options for t in by["public_pkl"].teachers] == [{"public": True}]
    assert [(t.name, t.weight) for t in by["sum_static"].teachers] == [("qwen3", 0.8), ("llama3", 0.2)]
    assert by["sum_dynamic"].multi_teacher == {"mode": "sum", "weighting": "dynamic", "score": "bpb"}
    assert by["select"].multi_teacher["mode"] == "select_teacher"
    online = {a.name for a in P.ARMS if any(t.source == "online" for t in a.teachers)}
    assert online == {"public_pkl", "public_gold", "pkl_full"}


def test_digit_heavy_subset(tmp_path):
    assert digit_fraction("ab12") == 0.5 and digit_fraction("") == 0.0
    assert digit_fraction("é1") == pytest.approx(1 / 3)  # bytes, not characters
    src = tmp_path / "h.jsonl"
    docs = ["2024-01-01 12:30", "plain words only here", "one 1 two 2 three 3 four 4 five", "x" * 8 + "12"]
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    n, nbytes = write_digit_subset(src, tmp_path / "d.jsonl")
    kept = [json.loads(line)["text"] for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert kept == [d for d in docs if is_digit_heavy({"text": d})] == [docs[0], docs[3]]  # 20%: 2 of 10 kept
    assert (n, nbytes) == (2, len(docs[0]) + len(docs[3]))


def test_evaluate_file_reproduces_the_trainers_final_eval(tmp_path, monkeypatch):
    """A ~10 s end-to-end run: the smoke student, CE only, on a slice of the corpus."""
    from benchmarks.quality.digits import evaluate_file
    from tests.trainer_helpers import small_corpus
    from xtoken_loss.trainer.metrics import read_metrics
    from xtoken_loss.trainer.run import train

    monkeypatch.setenv("XTOKEN_CACHE", str(tmp_path / "cache"))
    train_file, heldout = small_corpus(tmp_path / "data", n_train=16, n_eval=6)
    p = P.PROTOCOLS["smoke"]
    cfg = P.arm_config(p, P.arm("ce"), 0, str(tmp_path / "run"), str(train_file), str(heldout), {}, {})
    cfg["max_steps"] = 3
    train(TrainConfig.from_dict(cfg))
    last = [r for r in read_metrics(tmp_path / "run") if "eval/bpb" in r][-1]
    mine = evaluate_file(cfg, tmp_path / "run", heldout)
    for key in ("eval/bpb", "eval/ce", "eval/top1", "eval/bytes"):
        assert mine[key] == pytest.approx(last[key], rel=1e-6), key


def _stats(values: dict[str, list[float]]):
    from benchmarks.quality.report import ArmStats

    return [ArmStats(P.arm(name), [{"seed": s, "bpb": v, "seconds": 10.0} for s, v in enumerate(vs)])
            for name, vs in values.items()]


def test_paired_differences_use_the_same_seeds():
    from benchmarks.quality.report import paired

    stats = _stats({"ce": [3.0, 3.2, 3.4], "pkl": [2.9, 3.1, 3.3], "uld": [3.1, 2.0]})
    m, se, n = paired(stats, "pkl", "ce")
    assert n == 3 and m == pytest.approx(-0.1) and se == pytest.approx(0.0, abs=1e-12)
    m, se, n = paired(stats, "uld", "ce")  # seeds 0 and 1 only: differences +0.1 and -1.2
    assert n == 2 and m == pytest.approx(-0.55) and se == pytest.approx(0.65)
    assert math.isnan(paired(stats, "pkl", "gold")[0])  # no such arm


def test_noise_section_flags_what_the_seeds_resolve():
    from benchmarks.quality.report import noise

    stats = _stats({"ce": [3.0, 3.1, 3.2], "same_kl": [2.9, 3.15, 3.1], "pkl": [2.8, 2.9, 3.0]})
    bpb = {s.arm.name: s.mean("bpb") for s in stats}
    rows = "\n".join(noise(stats, bpb, "pkl"))
    assert "`pkl` - `ce` | -0.2000 ± 0.0000 | yes" in rows
    assert "`same_kl` - `ce`" in rows and "| no |" in rows
