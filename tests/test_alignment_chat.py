"""Conversations rendered with two different real chat templates: property tests on the common axis."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.alignment_helpers import nfc_text, tok, token_bytes_of
from xtoken_align.alignment.chat import common_segments, render_conversation
from xtoken_align.batch.collate import AlignmentCollator, CollateConfig, align_batch

PAIRS = [("llama3", "qwen3"), ("deepseek-v4", "gpt-oss"), ("qwen3.5", "llama3"), ("gpt-oss", "qwen3")]


def _axis_bytes(info, other, conv) -> bytes:
    text_a, loc_a = render_conversation(info, conv)
    _, loc_b = render_conversation(other, conv)
    seg = common_segments([loc_a, loc_b])[0]
    raw = text_a.encode("utf-8")
    return b"".join(raw[s:e] for s, e, _ in seg)


def _no_specials(text: str, *infos) -> bool:
    return not any(c in text for info in infos for c in info.special_tokens.values())


@settings(max_examples=40, deadline=None)
@given(pair=st.sampled_from(PAIRS), contents=st.lists(nfc_text, min_size=1, max_size=4))
def test_random_conversations_tile_the_contents(pair, contents):
    s, t = tok(pair[0]), tok(pair[1])
    conv = [{"role": "user" if k % 2 == 0 else "assistant", "content": c} for k, c in enumerate(contents)]
    batch = align_batch([conv], s, [t])
    axis = _axis_bytes(s, t, conv)
    assert batch.num_bytes[0] == len(axis) == _axis_bytes(t, s, conv).__len__()
    ch = batch.pairs[0].chunks
    s_ids, t_ids = batch.student.ids, batch.teachers[0].ids
    assert batch.student.token_bytes.sum() == len(axis) == batch.teachers[0].token_bytes.sum()
    assert ch[0, 2] == 0 and ch[-1, 3] == len(s_ids) and ch[0, 4] == 0 and ch[-1, 5] == len(t_ids)
    assert np.all(ch[1:, 0] == ch[:-1, 1]) and ch[-1, 1] == len(axis)
    assert np.all(ch[1:, 2] == ch[:-1, 3]) and np.all(ch[1:, 4] == ch[:-1, 5])
    for row in ch[ch[:, 6] == 1]:
        span = axis[row[0]:row[1]]
        assert token_bytes_of(s, s_ids[row[2]:row[3]]) == span
        assert token_bytes_of(t, t_ids[row[4]:row[5]]) == span
    # contents made of ordinary words (no whitespace at the edges to merge with the template)
    if all(c == c.strip() and c and _no_specials(c, s, t) and c.isalnum() for c in contents):
        assert (ch[:, 1] - ch[:, 0])[ch[:, 6] == 1].sum() == len(axis)


def test_mixed_batch_and_truncated_conversation():
    s, t = tok("llama3"), tok("qwen3")
    conv = [{"role": "user", "content": "Count: 1 2 3 4 5 6 7 8 9 10"},
            {"role": "assistant", "content": "Done counting to ten."}]
    samples = [conv, "plain text sample", {"messages": conv}, {"text": "dict text"}]
    full = align_batch(samples, s, [t])
    assert full.num_bytes.tolist() == [len("Count: 1 2 3 4 5 6 7 8 9 10Done counting to ten."),
                                       17, 48, 9]
    batch = AlignmentCollator(s, [t], CollateConfig(max_length=16))(samples)
    assert batch["input_ids"].shape[1] <= 16 and batch["teacher_0_input_ids"].shape[1] <= 16
    assert (batch["token_bytes"].sum(1) == batch["num_bytes"]).all()
    assert (batch["teacher_0_token_bytes"].sum(1) == batch["num_bytes"]).all()
    assert (batch["alignment_0_chunk_bytes"].sum(1) == batch["num_bytes"]).all()
    assert 0 < batch["num_bytes"][0] < full.num_bytes[0]


def test_template_that_strips_content_falls_back_to_search():
    # Llama-3's template trims contents: a content with trailing spaces is not in its render, so that
    # message leaves the axis on every side; the others still align exactly.
    s, t = tok("llama3"), tok("qwen3")
    conv = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer.   "}]
    batch = align_batch([conv], s, [t])
    assert batch.num_bytes[0] == len("Question?")
    ch = batch.pairs[0].chunks
    assert (ch[:, 1] - ch[:, 0])[ch[:, 6] == 1].sum() == len("Question?")
