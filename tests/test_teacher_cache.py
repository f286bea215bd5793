"""The offline teacher cache (docs/teacher_cache.md): `topk_outputs` against a float64 reference,
the 18-bit id packing over the real vocabulary sizes, the build (`write_cache`, the
`xtoken-train cache-teacher` command: resumable, rank-independent), the reader, and the cached path
of the collator against the online teacher for several student tokenizers, plus the refusals.

Tiny random-init teachers (tests/trainer_helpers.py), real tokenizers, a few lines of the bundled
corpus, split by the trainer's `max_chars` rule into ~60 documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.conftest import get_tokenizer
from tests.trainer_helpers import REPO, tiny_config
from xtoken_align import load_tokenizer
from xtoken_core.errors import ConfigError, DataFileError, XTokenError
from xtoken_loss.trainer.config import TrainConfig
from xtoken_loss.trainer.teacher_cache import format as fmt
from xtoken_loss.trainer.teacher_cache import open_cache, topk_outputs
from xtoken_loss.trainer.teacher_cache.collate import CachedTeacher, check_cache, remap_topk
from xtoken_loss.trainer.teacher_cache.writer import teacher_token_ids, write_cache

K = 16
SHARD_DOCS = 16


def _cfg_dict(env: Path, **over) -> dict:
    from tests.trainer_helpers import small_corpus

    small_corpus(env / "data", n_train=6, n_eval=3)
    return tiny_config(env / "run", env / "data", **over)


def _cfg(env: Path, **over) -> TrainConfig:
    return TrainConfig.from_dict(_cfg_dict(env, **over))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One $XTOKEN_CACHE (remaps), one small corpus and one qwen3 teacher cache for the module."""
    root = tmp_path_factory.mktemp("teacher_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("XTOKEN_CACHE", str(root / "xcache"))
    info = write_cache(_cfg(root), 0, root / "cache", top_k=K, shard_docs=SHARD_DOCS)
    yield root, info
    mp.undo()


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


# -------------------------------------------------------------------------------------------------
# the top-k form and the packing


def test_topk_outputs_matches_a_float64_reference():
    torch.manual_seed(0)
    b, t, v = 3, 7, 50
    logits = torch.randn(b, t, v) * 4
    ids = torch.randint(0, v, (b, t))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :] = False
    for k, dtype in ((5, torch.bfloat16), (5, torch.float16), (v, torch.bfloat16), (v + 9, torch.float32)):
        out = topk_outputs(logits, ids, mask, k, dtype)
        kk = min(k, v)
        lp = torch.log_softmax(logits.double(), -1)
        ref_v, ref_i = lp.topk(kk, -1)
        assert out.topk_logprobs.dtype == dtype and out.topk_logprobs.shape == (b, t, kk)
        m = mask
        assert torch.equal(out.topk_indices[m], ref_i[m])
        # float32 log-softmax, then rounded to the storage dtype: within one unit of that rounding
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.topk_logprobs[m].double(), ref_v[m], atol=1e-5, rtol=eps)
        ref_rest = torch.log1p(-ref_v.exp().sum(-1)) if kk < v else torch.full((b, t), -torch.inf, dtype=torch.float64)
        assert torch.allclose(out.rest_logprob[m].double(), ref_rest[m], atol=1e-5, rtol=1e-4)
        nxt = m.clone()
        nxt[:, -1] = False
        nxt[:, :-1] &= m[:, 1:]
        ref_t = lp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
        assert torch.allclose(out.target_logprob[:, :-1][nxt[:, :-1]].double(), ref_t[nxt[:, :-1]], atol=1e-5)
        assert (out.target_logprob[~nxt] == 0).all()
        pads = ~m
        assert (out.topk_indices[pads] == -1).all() and (out.topk_logprobs[pads] == 0).all()
        assert (out.rest_logprob[pads] == 0).all()


def test_rest_logprob_stays_accurate_when_the_top_k_hold_nearly_everything():
    logits = torch.tensor([[[30.0, 0.0, 0.0, 0.0]]])
    out = topk_outputs(logits, torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1, dtype=torch.bool), 1)
    exact = torch.logsumexp(torch.log_softmax(logits.double(), -1)[0, 0, 1:], 0)
    assert abs(float(out.rest_logprob) - float(exact)) < 1e-4 * abs(float(exact))  # ~ -28.9, no cancellation


def test_pack_ids_round_trip_over_the_real_vocabularies():
    rng = np.random.default_rng(0)
    for name in ("llama3", "qwen3", "o200k", "qwen3.5"):  # qwen3.5: the largest bundled vocabulary
        v = get_tokenizer(name).vocab_size
        fmt.check_vocab(v, name)
        for k in (1, 3, 16, 64, 257):
            ids = rng.integers(0, v, (40, k))
            ids[0, :] = v - 1
            ids[1, :] = 0
            packed = fmt.pack_ids(ids)
            assert packed.dtype == np.uint8 and packed.shape == (40, fmt.packed_width(k))
            assert np.array_equal(fmt.unpack_ids(packed, k), ids)
    assert fmt.packed_width(64) == 144  # 2.25 bytes per id
    with pytest.raises(DataFileError, match=r"^big: vocabulary of 262145 ids does not fit the cache's 18-bit ids"):
        fmt.check_vocab(262_145, "big")
    with pytest.raises(DataFileError, match="ids must lie in"):
        fmt.pack_ids(np.array([[1 << 18]]))


# -------------------------------------------------------------------------------------------------
# the build and the reader


def _teacher_model(cfg: TrainConfig, i: int):
    """Teacher i built as the writer builds it (and the trainer, before sharding)."""
    from xtoken_loss.trainer.distributed import init_distributed
    from xtoken_loss.trainer.prepare import Sides
    from xtoken_loss.trainer.run import _build_remaps, build_side, sample_max_chars, teacher_source

    dist = init_distributed("cpu")
    tok = load_tokenizer(cfg.teachers[i].tokenizer)
    remap = _build_remaps(cfg, Sides(tok, []), dist, sample_max_chars(cfg)).get(tok.fingerprint)
    model = build_side(teacher_source(cfg, i, dist), tok, remap, seed=cfg.seed, dist=dist, cfg=cfg,
                       trainable=False, shard=False)
    return model, tok, remap


def test_round_trip_equals_a_fresh_teacher_forward(env):
    root, info = env
    cfg = _cfg(root)
    cache = open_cache(root / "cache")
    assert cache.k == K and cache.dtype == torch.bfloat16 and cache.positions_budget == 64
    assert set(cache.splits) == {"train", "eval"} and info["temperature"] == 1.0
    model, tok, remap = _teacher_model(cfg, 0)
    from xtoken_loss.trainer.data import read_samples

    samples = read_samples(cfg.data.train, max_chars=4 * cfg.data.max_length)
    assert cache.num_docs("train") == len(samples) > SHARD_DOCS  # several shards
    ids = teacher_token_ids(tok, samples)
    used = torch.from_numpy(np.array(remap.used_ids))
    longest = max(range(len(samples)), key=lambda d: len(ids[d]))
    assert len(ids[longest]) > 64  # the budget cuts some documents
    for d in sorted({0, 5, SHARD_DOCS + 3, longest, len(samples) - 1}):
        doc = cache.document("train", d)
        assert np.array_equal(doc.token_ids, ids[d])  # the full tokenization, not only the budget
        p = min(len(ids[d]), 64)
        assert doc.positions == p
        inp = remap.to_compact(torch.from_numpy(ids[d][:p]))[None]
        mask = torch.ones_like(inp, dtype=torch.bool)
        with torch.no_grad():
            fresh = topk_outputs(model(input_ids=inp, attention_mask=mask.long()).logits, inp, mask, K)
        assert torch.equal(used[fresh.topk_indices[0]], doc.topk_ids)
        assert torch.equal(fresh.topk_logprobs[0], doc.topk_logprobs)
        torch.testing.assert_close(fresh.target_logprob[0], doc.target_logprob, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(fresh.rest_logprob[0], doc.rest_logprob, atol=2e-6, rtol=1e-6)


def test_cache_json_and_the_byte_budget(env):
    root, info = env
    shards = sorted((root / "cache").glob("*.safetensors"))
    assert [p.name for p in shards] == sorted(n for s in info["splits"].values() for n in s["shards"])
    total = sum(p.stat().st_size for p in shards)
    assert info["bytes"] == total and info["bytes_per_token"] == pytest.approx(total / info["num_positions"])
    assert info["bytes_per_token"] <= 4.5 * K + 16
    assert info["tokenizer"]["fingerprint"] == load_tokenizer("qwen3").fingerprint
    assert len(info["teacher"]["weights_sha256"]) == 64 and info["teacher"]["remap"].endswith(
        info["teacher"]["remap"].split("+remap:")[1])
    from xtoken_loss.trainer.vocab_remap import file_sha256

    cfg = _cfg(root)
    assert info["splits"]["train"]["file_sha256"] == file_sha256(cfg.data.train)
    assert not list((root / "cache").glob(".*.tmp"))  # no temporary file left


def test_killed_build_resumes_to_identical_shards(env):
    root, info = env
    out = root / "killed"
    calls = []

    def die(split, shard):
        calls.append((split, shard))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        write_cache(_cfg(root), 0, out, top_k=K, shard_docs=SHARD_DOCS, on_shard=die)
    assert not (out / fmt.CACHE_JSON).exists() and len(list(out.glob("*.safetensors"))) == 2
    (out / ".train-00002.safetensors.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
    with pytest.raises(DataFileError, match=r"cache.json: missing; its build did not finish"):
        open_cache(out)
    again = write_cache(_cfg(root), 0, out, top_k=K, shard_docs=SHARD_DOCS, on_shard=lambda *a: calls.append(a))
    assert ("train", 0) not in calls[2:] and ("train", 1) not in calls[2:]  # complete shards kept
    assert _shard_bytes(out) == _shard_bytes(root / "cache")
    assert again == info
    assert not list(out.glob(".*.tmp"))


def _cli(*args):
    from xtoken_cli.train_cmd import train_cli

    return CliRunner().invoke(train_cli, [str(a) for a in args])


def test_two_ranks_write_the_same_cache_as_one(env):
    import yaml

    root, info = env
    cfg_file = root / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg_dict(root)))
    out = root / "two"
    env_vars = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
           "xtoken_cli.train_cmd", "cache-teacher", "--config", str(cfg_file), "--teacher", "qwen3", "--out", str(out),
           "--top-k", str(K), "--shard-docs", str(SHARD_DOCS)]
    r = subprocess.run(cmd, cwd=REPO, env=env_vars, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"teacher cache {out}:" in r.stdout
    assert _shard_bytes(out) == _shard_bytes(root / "cache")
    assert json.loads((out / fmt.CACHE_JSON).read_text()) == info


# -------------------------------------------------------------------------------------------------
# the cached collate path against the online teacher


def _online_and_cached(root: Path, student: str, teacher: int, cache_dir: Path, cfg_over: dict | None = None,
                       **data):
    from xtoken_loss.trainer.data import TrainCollate, read_samples
    from xtoken_loss.trainer.distributed import init_distributed
    from xtoken_loss.trainer.prepare import preflight
    from xtoken_loss.trainer.run import _build_remaps, sample_max_chars

    over = {} if student == "llama3" else {"teachers": _cfg_dict(root)["teachers"][:1]}  # no same-vocab llama3
    cfg = _cfg(root, student={"tokenizer": student}, **over, **(cfg_over or {}))
    sides = preflight(cfg)
    remaps = _build_remaps(cfg, sides, init_distributed("cpu"), sample_max_chars(cfg))
    s_remap = remaps.get(sides.student.fingerprint)
    t_remaps = [None if t.same_vocab else remaps.get(tok.fingerprint) for t, tok in zip(cfg.teachers, sides.teachers)]
    kw = dict(max_length=data.get("max_length", cfg.data.max_length),
              teacher_max_length=data.get("teacher_max_length", cfg.data.teacher_max_length),
              train_on=cfg.data.train_on, student_remap=s_remap, teacher_remaps=t_remaps)
    tok = sides.teachers[teacher]
    caches = [None] * len(cfg.teachers)
    caches[teacher] = CachedTeacher(cache_dir, remap=remaps.get(tok.fingerprint))
    online = TrainCollate(sides.student, sides.teachers, **kw)
    cached = TrainCollate(sides.student, sides.teachers, teacher_caches=caches, **kw)
    samples = read_samples(cfg.data.train, max_chars=sample_max_chars(cfg))
    model = _teacher_model(cfg, teacher)[0]
    return cfg, online, cached, samples, model


def _check_against_online(online, cached, model, samples, teacher: int, same_vocab: bool):
    import pickle

    cached = pickle.loads(pickle.dumps(cached))  # as DataLoader workers get it
    prefix = "" if same_vocab else f"teacher_{teacher}_"
    for start in (0, 8, 24)[:max(1, len(samples) // 8)]:
        part = samples[start:start + 8]
        b1, b2 = online(part), cached(part)
        for key, value in b1.items():
            assert torch.equal(value, b2[key]), key  # the same batch, from the cached tokens
        ids, mask = b1[f"{prefix}input_ids"], b1[f"{prefix}token_mask"]
        with torch.no_grad():
            logits = model(input_ids=torch.where(mask, ids, 0), attention_mask=mask.long()).logits
        ref = topk_outputs(logits, ids, mask, K)
        got = {k: b2[f"teacher_{teacher}_{k}"] for k in ("topk_logprobs", "topk_indices", "target_logprob",
                                                          "rest_logprob")}
        assert got["topk_indices"].dtype == torch.int64
        assert torch.equal(got["topk_indices"], ref.topk_indices)
        assert torch.equal(got["topk_logprobs"], ref.topk_logprobs)
        torch.testing.assert_close(got["target_logprob"], ref.target_logprob, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(got["rest_logprob"], ref.rest_logprob, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("student", ["llama3", "mistral-v1", "o200k"])
def test_a_qwen3_cache_serves_other_student_tokenizers(env, student):
    root, _ = env
    cfg, online, cached, samples, model = _online_and_cached(root, student, 0, root / "cache")
    _check_against_online(online, cached, model, samples, 0, same_vocab=False)


def test_a_smaller_run_budget_reads_a_prefix_of_the_cached_positions(env):
    root, _ = env
    cfg, online, cached, samples, model = _online_and_cached(root, "llama3", 0, root / "cache", max_length=24,
                                                             teacher_max_length=20)
    _check_against_online(online, cached, model, samples, 0, same_vocab=False)


def test_a_same_vocab_teacher_cache_is_on_the_student_positions(env):
    root, _ = env
    out = root / "same"
    write_cache(_cfg(root), "llama3", out, top_k=K, shard_docs=64)
    cfg, online, cached, samples, model = _online_and_cached(root, "llama3", 1, out)
    _check_against_online(online, cached, model, samples, 1, same_vocab=True)


def test_chat_documents_through_the_cache(env):
    from tests.trainer_helpers import CORPUS

    root, _ = env
    chat = root / "data" / "chat.jsonl"
    with open(CORPUS / "chat_train.jsonl", encoding="utf-8") as f:
        chat.write_text("".join(next(f) for _ in range(8)), encoding="utf-8")
    over = {"data": {"train": str(chat), "eval": None, "train_on": "assistant"}}
    out = root / "chat-cache"
    write_cache(_cfg(root, **over), 0, out, top_k=K, shard_docs=4)
    cfg, online, cached, samples, model = _online_and_cached(root, "llama3", 0, out, cfg_over=over)
    assert all(isinstance(s, list) for s in samples) and "target_mask" in online(samples[:2])
    _check_against_online(online, cached, model, samples, 0, same_vocab=False)


def test_ids_a_run_does_not_keep_fold_into_the_rest_mass():
    from xtoken_loss.trainer.vocab_remap import VocabRemap

    torch.manual_seed(0)
    lp = torch.log_softmax(torch.randn(2, 3, 40), -1).topk(6, -1)
    vals, real = lp.values.to(torch.bfloat16), lp.indices
    rest = torch.log1p(-vals.float().exp().sum(-1))
    remap = VocabRemap(np.arange(0, 40, 2), 40, "sha256:test")  # keeps the even ids only
    idx, new_lp, new_rest = remap_topk(real, vals, rest, remap)
    odd = real % 2 == 1
    assert torch.equal(idx[~odd], real[~odd] // 2) and (idx[odd] == -1).all() and (new_lp[odd] == 0).all()
    before = vals.double().exp().sum(-1) + rest.double().exp()
    after = new_lp.double().exp().masked_fill(idx < 0, 0).sum(-1) + new_rest.double().exp()
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


# -------------------------------------------------------------------------------------------------
# refusals


def test_bad_teacher_and_bad_out_are_refused_in_one_line(env, tmp_path):
    import yaml

    root, _ = env
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg_dict(root)))
    base = ["cache-teacher", "--config", cfg_file]
    r = _cli(*base, "--teacher", "2", "--out", tmp_path / "c")
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "error: --teacher 2: out of range; the config has 2 teacher(s) (0: qwen3, 1: llama3)"]
    r = _cli(*base, "--teacher", "gpt", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "error: --teacher 'gpt': no teacher of that name or index" in r.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = _cli(*base, "--teacher", "0", "--out", foreign)
    assert r.exit_code == 2 and "is not a teacher cache" in r.output and len(r.output.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    before = _shard_bytes(root / "cache")
    r = _cli(*base, "--teacher", "0", "--out", root / "cache", "--top-k", "8")
    assert r.exit_code == 2 and "a teacher cache of other settings (requested_top_k: 16 there, 8 now)" in r.output
    r = _cli(*base, "--teacher", "1", "--out", root / "cache", "--top-k", str(K), "--shard-docs", str(SHARD_DOCS))
    assert r.exit_code == 2 and "a teacher cache of other settings (teacher." in r.output
    assert _shard_bytes(root / "cache") == before


def test_a_cache_of_another_teacher_tokenizer_or_data_is_refused(env, tmp_path):
    root, _ = env
    cache = open_cache(root / "cache")
    cfg = _cfg(root)
    qwen, llama = load_tokenizer("qwen3"), load_tokenizer("llama3")
    check_cache(cache, cfg, 0, tokenizer_fingerprint=qwen.fingerprint)  # its own teacher: fine
    with pytest.raises(ConfigError, match=r"^teachers.0.cache: .*cache.json was built for tokenizer 'qwen3'"):
        check_cache(cache, cfg, 0, tokenizer_fingerprint=llama.fingerprint)
    bigger = _cfg(root, teachers=[{**_cfg_dict(root)["teachers"][0], "model": {
        **_cfg_dict(root)["teachers"][0]["model"], "hidden_size": 64}}])
    with pytest.raises(ConfigError, match=r"was built for another teacher model \(model.hidden_size: 48 there, 64"):
        check_cache(cache, bigger, 0, tokenizer_fingerprint=qwen.fingerprint)
    with pytest.raises(ConfigError, match=r"another teacher model \(seed: 0 there, 3 in this run\)"):
        check_cache(cache, _cfg(root, seed=3), 0, tokenizer_fingerprint=qwen.fingerprint)
    # a changed document: named by file and line, in the run-start check and in the collator
    from xtoken_loss.trainer.data import TrainCollate, read_samples

    lines = (root / "data" / "train.jsonl").read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["text"] = record["text"].replace("e", "E", 1)
    lines[2] = json.dumps(record) + "\n"
    changed = tmp_path / "train.jsonl"
    changed.write_text("".join(lines))
    samples, where = read_samples(changed, max_chars=256, with_lines=True)
    with pytest.raises(DataFileError, match=rf"^{changed}: line 3: the sample differs from the document the cache "
                                            r"holds there; the teacher cache .* was built from .*train.jsonl"):
        check_cache(cache, cfg, 0, tokenizer_fingerprint=qwen.fingerprint, data={"train": (changed, samples, where)})
    first_changed = where.index(3)
    collate = TrainCollate(llama, [qwen], max_length=64, teacher_caches=[CachedTeacher(root / "cache")])
    collate(samples[:first_changed])  # unchanged documents: fine (unrestricted: real ids)
    with pytest.raises(DataFileError, match=r"sample 0 of the batch .* is not among its documents"):
        collate(samples[first_changed:first_changed + 1])
    wrong = TrainCollate(llama, [llama], max_length=64, teacher_caches=[CachedTeacher(root / "cache")])
    with pytest.raises(ConfigError, match=r"^teachers.0.cache: .* was built for tokenizer 'qwen3'"):
        wrong(samples[:2])


def test_open_cache_refuses_what_is_not_a_complete_cache(env, tmp_path):
    root, _ = env
    with pytest.raises(DataFileError, match=r"cache.json: missing; not a teacher cache"):
        open_cache(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / fmt.CACHE_JSON).write_text("{not json")
    with pytest.raises(DataFileError, match=r"bad/cache.json: the teacher cache description is not valid JSON"):
        open_cache(bad)
    info = json.loads((root / "cache" / fmt.CACHE_JSON).read_text())
    (bad / fmt.CACHE_JSON).write_text(json.dumps(dict(info, schema_version=99)))
    with pytest.raises(DataFileError, match=r"schema version 99, this xtoken reads 1"):
        open_cache(bad)
    (bad / fmt.CACHE_JSON).write_text(json.dumps(info))
    with pytest.raises(DataFileError, match=r"cache.json: split '\w+' lists shard \w+-00000.safetensors, which is "
                                            r"missing from"):
        open_cache(bad)
    assert issubclass(DataFileError, XTokenError)
