"""The trainer's data side (`xtoken_loss.trainer.data`) and the `target_mask` batch key, on real
tokenizers and the bundled corpus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xtoken_align import load_tokenizer
from xtoken_align.alignment.chat import common_messages, render_conversation
from xtoken_core.errors import ConfigError, DataFileError
from xtoken_loss import ce_loss
from xtoken_loss.trainer.data import (
    GlobalBatchPlan,
    TrainCollate,
    eval_batches,
    make_train_loader,
    rank_microbatches,
    read_samples,
    sample_lengths,
    split_text,
)
from xtoken_loss.units import count_units

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"


@pytest.fixture(scope="module")
def toks():
    return load_tokenizer("llama3"), load_tokenizer("qwen3")


# --------------------------------------------------------------------------------------------------
# target_mask


@pytest.mark.parametrize("order", ["llama3->qwen3", "qwen3->llama3"])
def test_assistant_only_targets_are_the_assistant_bytes(toks, order):
    s, t = toks if order == "llama3->qwen3" else toks[::-1]
    chats = read_samples(CORPUS / "chat_train.jsonl")[:6]
    plain = "A plain text sample, trained everywhere."
    samples = chats + [plain]
    batch = TrainCollate(s, [t], max_length=None, train_on="assistant")(samples)
    tm, real, tb = batch["target_mask"], batch["token_mask"], batch["token_bytes"]
    assert tm.dtype == torch.bool and tm.shape == batch["input_ids"].shape
    assert not bool((tm & ~real).any())
    full = 0
    for k, conv in enumerate(chats):
        kept = common_messages([render_conversation(x, conv)[1] for x in (s, t)])
        expected = sum(len(conv[i]["content"].encode("utf-8")) for i in kept if conv[i]["role"] == "assistant")
        full += expected == sum(len(m["content"].encode("utf-8")) for m in conv if m["role"] == "assistant")
        assert int(tb[k][tm[k]].sum()) == expected > 0  # bytes of the target tokens = assistant bytes
        assert bool((tb[k][tm[k]] > 0).all())  # no scaffolding, no turn markers
        pv = batch["alignment_0_pair_valid"][k]
        assert int(batch["alignment_0_chunk_bytes"][k][pv].sum()) == expected  # chunks: the same bytes
        text = s.backend.decode(batch["input_ids"][k][tm[k]].tolist())
        first = next(conv[i]["content"] for i in kept if conv[i]["role"] == "assistant")
        assert text.startswith(first[:30]) and "user" not in s.backend.decode(batch["input_ids"][k][tm[k]][:3].tolist())
    assert full >= 4  # most conversations have every assistant content on the axis
    n_plain = int(real[-1].sum())
    assert bool(tm[-1][:n_plain].all())  # the plain text in the same batch: all targets
    # CE counts exactly the predictions of target tokens (no chat target is a sample's first token)
    assert int(count_units(batch, "ce")) == int(tm[:-1].sum()) + n_plain - 1
    # and the CE is the mean over exactly those predictions
    width = 97
    ids = batch["input_ids"] % width
    logits = torch.randn(*ids.shape, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, _ = ce_loss(logits, None, dict(batch, input_ids=ids))
    pos = real[:, :-1] & real[:, 1:] & tm[:, 1:]
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(loss, nll[pos].mean())


def test_target_mask_only_with_train_on_assistant(toks):
    s, t = toks
    chats = read_samples(CORPUS / "chat_train.jsonl")[:2]
    plain = TrainCollate(s, [t], max_length=128)(chats)
    assistant = TrainCollate(s, [t], max_length=128, train_on="assistant")(chats)
    assert "target_mask" not in plain and "target_mask" in assistant
    assert int(assistant["alignment_0_pair_valid"].sum()) < int(plain["alignment_0_pair_valid"].sum())
    assert int(count_units(assistant, "ce")) < int(count_units(plain, "ce"))
    with pytest.raises(ConfigError, match="train_on='everything': valid values are 'all', 'assistant'"):
        TrainCollate(s, [t], max_length=128, train_on="everything")


# --------------------------------------------------------------------------------------------------
# read_samples


def test_read_samples_splits_long_texts_and_keeps_conversations(tmp_path):
    lines = [f"line {i} " + "word " * (i % 9) + "\n" for i in range(60)]
    text = "".join(lines) + "x" * 130 + " tail"
    conv = [{"role": "user", "content": "hi " * 80}, {"role": "assistant", "content": "yo " * 90}]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"messages": conv}) + "\n", encoding="utf-8")
    out = read_samples(f, max_chars=100)
    pieces, last = out[:-1], out[-1]
    assert last == conv and len(pieces) > 5
    assert "".join(pieces) == text and all(0 < len(p) <= 100 for p in pieces)
    assert sum(p.endswith("\n") for p in pieces) >= len(pieces) - 3  # cut at line ends where possible
    assert read_samples(f) == [text, conv]
    assert split_text("short", 100) == ["short"]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"}\n{"txt": "typo"}\n', r"d\.jsonl: line 2: expected a string 'text' or a list 'messages'"),
    ('{"text": "ok"}\nnot json\n', r"d\.jsonl: line 2 is not valid JSON"),
    ('{"text": "ok"}\n\n{"text": "ok"}\n', r"d\.jsonl: line 2 is empty"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"d\.jsonl: line 1, message 0: unknown role 'robot'"),
    ('{"text": "bad \\ud800"}\n', r"d\.jsonl: line 1 holds a lone surrogate"),
])
def test_read_samples_errors_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "d.jsonl"
    f.write_text(line, encoding="utf-8")
    with pytest.raises(DataFileError, match=message):
        read_samples(f)


# --------------------------------------------------------------------------------------------------
# the global batch plan


@pytest.fixture(scope="module")
def corpus_lengths():
    return sample_lengths(read_samples(CORPUS / "train.jsonl"))


def test_plan_is_deterministic_and_covers_each_epoch_once(corpus_lengths):
    a = GlobalBatchPlan(corpus_lengths, 8, seed=3)
    b = GlobalBatchPlan(corpus_lengths, 8, seed=3)
    c = GlobalBatchPlan(corpus_lengths, 8, seed=4)
    steps = [0, 1, 5, a.steps_per_epoch - 1, a.steps_per_epoch, 3 * a.steps_per_epoch + 7]
    for s in steps:
        assert np.array_equal(a.global_batch(s), b.global_batch(s))
    assert not np.array_equal(a.global_batch(0), c.global_batch(0))
    for epoch in (0, 1):
        seen = np.concatenate([a.global_batch(epoch * a.steps_per_epoch + k) for k in range(a.steps_per_epoch)])
        assert len(np.unique(seen)) == len(seen) == a.steps_per_epoch * 8  # each sample at most once
    e0 = a.global_batch(0)
    assert not np.array_equal(e0, a.global_batch(a.steps_per_epoch))  # epochs differ
    # random access equals the stream read in order, from a fresh plan
    fresh = GlobalBatchPlan(corpus_lengths, 8, seed=3)
    assert np.array_equal(fresh.global_batch(3 * a.steps_per_epoch + 7), a.global_batch(3 * a.steps_per_epoch + 7))


def test_ranks_and_microbatches_concatenate_to_the_global_batch(corpus_lengths):
    plan = GlobalBatchPlan(corpus_lengths, 8, seed=0)
    for step in (0, 9):
        g = plan.global_batch(step)
        for world, mb in ((1, 8), (1, 2), (2, 4), (2, 1), (4, 2), (8, 1)):
            parts = [rank_microbatches(g, r, world, mb) for r in range(world)]
            assert all(len(p) == 8 // (world * mb) and all(len(x) == mb for x in p) for p in parts)
            assert np.array_equal(np.concatenate([x for p in parts for x in p]), g)
    with pytest.raises(ConfigError, match=r"data\.batch_size=8 is not divisible by the world size 3"):
        rank_microbatches(g, 0, 3, 1)
    with pytest.raises(ConfigError, match=r"data\.microbatch_size=3 does not divide the 4 sequences"):
        rank_microbatches(g, 1, 2, 3)
    with pytest.raises(ConfigError, match=r"data\.batch_size=2000 is larger than the 988"):
        GlobalBatchPlan(corpus_lengths, 2000, seed=0)


def test_length_bucketing_reduces_padding(corpus_lengths):
    def padding(bucket_batches):
        plan = GlobalBatchPlan(corpus_lengths, 8, seed=0, bucket_batches=bucket_batches)
        batches = [corpus_lengths[plan.global_batch(s)] for s in range(plan.steps_per_epoch)]
        return sum(int(len(x) * x.max() - x.sum()) for x in batches) / corpus_lengths.sum()

    unsorted, bucketed = padding(1), padding(16)
    assert bucketed < unsorted / 5, (unsorted, bucketed)


# --------------------------------------------------------------------------------------------------
# loaders


def _equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.fixture(scope="module")
def loader_setup(toks):
    s, t = toks
    samples = read_samples(CORPUS / "heldout.jsonl", max_chars=300) + read_samples(CORPUS / "chat_heldout.jsonl")[:6]
    plan = GlobalBatchPlan(sample_lengths(samples), 4, seed=1, bucket_batches=4)
    collate = TrainCollate(s, [t], max_length=48, train_on="assistant")
    return samples, plan, collate


def test_workers_and_resume_give_the_same_batches(loader_setup):
    samples, plan, collate = loader_setup
    kw = dict(rank=1, world_size=2, microbatch_size=1)
    inline = list(make_train_loader(samples, plan, collate, start_step=0, end_step=4, num_workers=0, **kw))
    worker = list(make_train_loader(samples, plan, collate, start_step=0, end_step=4, num_workers=1, **kw))
    workers = list(make_train_loader(samples, plan, collate, start_step=0, end_step=4, num_workers=2, **kw))
    assert len(inline) == 4 and all(len(step) == 2 for step in inline)
    for a, b, c in zip(inline, worker, workers):
        _equal_batches(a, b)
        _equal_batches(a, c)  # in step order whatever the number of workers
    resumed = make_train_loader(samples, plan, collate, start_step=2, num_workers=1, **kw)  # endless
    for expected in inline[2:]:
        _equal_batches(next(resumed), expected)
    del resumed
    # each microbatch is the collation of its slice of the global batch
    mb = rank_microbatches(plan.global_batch(3), 1, 2, 1)[1]
    _equal_batches(inline[3][1:], [collate([samples[i] for i in mb])])


def test_eval_batches_fixed_order(loader_setup):
    samples, _, collate = loader_setup
    got = list(eval_batches(samples[:7], collate, 3))
    assert [int(b["input_ids"].shape[0]) for b in got] == [3, 3, 1]
    _equal_batches(got[1:2], [collate(samples[3:6])])
