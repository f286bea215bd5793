"""The trainer with top-k teachers: `teachers.I.top_k` (the online teacher in the top-k form) and
`teachers.I.cache` (the same form read from an `xtoken-train cache-teacher` cache) give the same
losses; a cache that does not fit the run is refused before any model is built."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.trainer_helpers import tiny_config, train_records
from xtoken_core.errors import XTokenError
from xtoken_loss.trainer.config import TrainConfig, merge

K = 16


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One $XTOKEN_CACHE, a small corpus, and a K-slot cache of each of the two teachers."""
    from xtoken_loss.trainer.teacher_cache.writer import write_cache

    root = tmp_path_factory.mktemp("trainer_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("XTOKEN_CACHE", str(root / "xcache"))
    base = tiny_config(root / "unused", root / "data")
    for i in range(2):
        write_cache(TrainConfig.from_dict(base), i, root / f"cache{i}", top_k=K)
    yield root, base
    mp.undo()


def _run(base: dict, out: Path, teacher_over: list[dict], **over) -> list[dict]:
    from xtoken_loss.trainer.run import train

    teachers = [merge(t, o) for t, o in zip(base["teachers"], teacher_over)]
    cfg = merge(base, {"output_dir": str(out), "teachers": teachers, **over})
    train(TrainConfig.from_dict(cfg))
    return train_records(out)


def test_cached_teachers_give_the_online_top_k_losses(env, monkeypatch):
    root, base = env
    online = _run(base, root / "online", [{"top_k": K}, {"top_k": K}])

    def no_teacher_model(source, tok, remap, **kw):  # a cached teacher is never built
        if not kw.get("trainable"):
            raise AssertionError("a teacher model was built although it is read from its cache")
        return built(source, tok, remap, **kw)

    from xtoken_loss.trainer import run

    built = run.build_side
    monkeypatch.setattr(run, "build_side", no_teacher_model)
    cached = _run(base, root / "cached", [{"cache": str(root / "cache0")}, {"cache": str(root / "cache1")}])
    assert len(online) == len(cached) == base["max_steps"]
    for a, b in zip(online, cached):
        for key in ("loss", "ce", "teacher_0/kd", "teacher_1/kd", "grad_norm"):
            assert math.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)


def test_top_k_changes_the_kd_terms_but_not_the_first_ce(env):
    """The top-k form is a different (truncated) teacher: the KD terms of the first step differ from
    the full-logit run's, while the student's own CE at step 1 is the same model's."""
    root, base = env
    full = _run(base, root / "full", [{}, {}], max_steps=1)
    topk = train_records(root / "online")[:1] if (root / "online").exists() else _run(
        base, root / "online1", [{"top_k": K}, {"top_k": K}], max_steps=1)
    assert full[0]["ce"] == pytest.approx(topk[0]["ce"], rel=1e-6)
    for key in ("teacher_0/kd", "teacher_1/kd"):
        assert math.isfinite(topk[0][key]) and topk[0][key] != pytest.approx(full[0][key], rel=1e-3)


@pytest.mark.parametrize("case", ["top_k", "budget", "other_teacher", "missing"])
def test_a_cache_that_does_not_fit_the_run_is_refused_before_any_model(env, monkeypatch, case):
    from xtoken_loss.trainer import run

    root, base = env

    def no_model(*a, **k):
        raise AssertionError("a model was built before the cache was checked")

    monkeypatch.setattr(run, "build_side", no_model)
    monkeypatch.setattr(run, "teacher_source", no_model)
    teacher_over, over, expect = {
        "top_k": ([{"cache": str(root / "cache0"), "top_k": 8}, {}], {}, "top_k is 8"),
        "budget": ([{"cache": str(root / "cache0")}, {}], {"data": {"teacher_max_length": 512}},
                   "fewer than this run's teacher budget 512"),
        "other_teacher": ([{"cache": str(root / "cache1")}, {}], {}, "was built for tokenizer"),
        "missing": ([{"cache": str(root / "nowhere")}, {}], {}, "not a directory"),
    }[case]
    with pytest.raises(XTokenError, match=expect) as info:
        _run(base, root / f"refused-{case}", teacher_over, **over)
    assert "\n" not in str(info.value)
    assert not (root / f"refused-{case}").exists()


@pytest.mark.parametrize("options, expect", [({"public": True}, "public=true"),
                                             ({"temperature": 2.0}, "temperature=2.0")])
def test_top_k_refuses_public_losses_and_other_temperatures(env, options, expect):
    from xtoken_core.errors import ConfigError

    root, base = env
    for key, value in (("top_k", K), ("cache", str(root / "cache0"))):
        teachers = [merge(base["teachers"][0], {key: value, "loss_options": options}), base["teachers"][1]]
        with pytest.raises(ConfigError, match=rf"teachers\.0.*{key}: .*{expect}"):
            TrainConfig.from_dict(merge(base, {"teachers": teachers, "output_dir": str(root / "x")}))


def test_a_cached_run_resumes_exactly_and_refuses_another_cache(env):
    root, base = env
    cached = [{"cache": str(root / "cache0")}, {"cache": str(root / "cache1")}]
    whole = _run(base, root / "whole", cached)
    _run(base, root / "split", cached, max_steps=2)
    resumed = _run(base, root / "split", cached, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], resumed[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
    with pytest.raises(XTokenError, match="teachers"):  # the same teacher, now run online
        _run(base, root / "split", [{"top_k": K}, cached[1]], resume=True, max_steps=6)
