"""Chunk alignment: invariants over random text and every fixture pair, and the named edge cases."""

from __future__ import annotations

import itertools
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.alignment_helpers import (
    EXACT,
    EXACT_NFC,
    check_invariants,
    exact_on,
    mirrored,
    random_text,
    tok,
    token_bytes_of,
)
from xtoken_align.alignment.aligner import align_text, align_texts
from xtoken_align.batch.collate import AlignmentCollator, CollateConfig, align_batch, collate
from xtoken_core.errors import AlignmentError

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"
PAIRS = list(itertools.combinations(EXACT + EXACT_NFC, 2))


# Every pair (parametrized) on a few random texts each: 36 x 10 examples, where 400 examples drawn
# over the pairs at random took the longest of any test (20 s on two cores).
@pytest.mark.parametrize("pair", PAIRS, ids="-".join)
@settings(max_examples=10, deadline=None)
@given(text=random_text)
def test_random_text_every_pair_tiles_and_mirrors(pair, text):
    a, b = tok(pair[0]), tok(pair[1])
    al = align_text(a, b, text)
    check_invariants(al, a, b, exact=exact_on(a, text) and exact_on(b, text))
    assert np.array_equal(mirrored(al.chunks), align_text(b, a, text).chunks)


@settings(max_examples=40, deadline=None)
@given(text=random_text, other=st.sampled_from(("llama3", "qwen3", "mistral-v1")))
def test_random_text_lossy_bert_degrades_but_tiles(text, other):
    a, b = tok(other), tok("bert-uncased")
    check_invariants(align_text(a, b, text), a, b)


def test_every_pair_on_real_corpus_is_exact():
    texts = [r["text"] for r in map(json.loads, (CORPUS / "heldout.jsonl").read_text().splitlines()[:12])]
    texts = [unicodedata.normalize("NFC", t) for t in texts]
    for x, y in PAIRS:
        a, b = tok(x), tok(y)
        for text, al in zip(texts, align_texts(a, b, texts)):
            check_invariants(al, a, b, exact=exact_on(a, text) and exact_on(b, text))


def test_bos_on_one_side_is_a_one_sided_chunk():
    al = align_text(tok("llama3"), tok("qwen3"), "Hello world")
    assert al.a_ids[0] == tok("llama3").special_roles["bos"]
    assert al.chunks[0].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert al.chunks[1:, 6].all()


def test_bos_on_both_sides_pairs_by_role():
    al = align_text(tok("llama3"), tok("mistral-v1"), "Hello world")
    assert al.chunks[0].tolist() == [0, 0, 0, 1, 0, 1, 0]


def test_prefix_space_first_token_is_exact():
    m, q = tok("mistral-v1"), tok("qwen3")
    assert m.prefix_space
    al = align_text(m, q, "Hello world", add_special_tokens=False)
    assert token_bytes_of(m, al.a_ids[:1]) == b" Hello"
    assert al.chunks[0].tolist() == [0, 5, 0, 1, 0, 1, 1]
    assert al.a_token_bytes.tolist() == [5, 6]
    # a phantom space standing alone (text starts with a newline) is a zero-width one-sided chunk
    al = align_text(m, q, "\nHi", add_special_tokens=False)
    assert al.chunks[0].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert al.chunks[1:, 6].all()


def test_split_characters_and_byte_fallback_runs():
    text = "\U0001F468\u200D\U0001F469\u200D\U0001F467 \U00020000x \U0010FFFD"
    for x, y in [("mistral-v1", "llama3"), ("qwen3", "tekken"), ("deepseek-v4", "gpt-oss")]:
        a, b = tok(x), tok(y)
        check_invariants(align_text(a, b, text), a, b, exact=True)


def test_qwen_nfc_on_non_nfc_text_marks_only_changed_chunks():
    text = "cafe\u0301 and nai\u0308ve words"
    a, q = tok("llama3"), tok("qwen3")
    al = align_text(a, q, text)
    check_invariants(al, a, q)
    bad = al.chunks[(al.chunks[:, 6] == 0) & (al.chunks[:, 1] > al.chunks[:, 0])]
    spans = [al.text_bytes[s:e].decode() for s, e in bad[:, :2]]
    assert all("\u0301" in s or "\u0308" in s for s in spans) and len(spans) == 2
    assert al.b_token_bytes.sum() == len(text.encode())


def test_bert_lossy_fallback():
    a, b = tok("llama3"), tok("bert-uncased")
    al = align_text(a, b, "Hello  World, CAFÉ x!")
    check_invariants(al, a, b)
    assert not al.chunks[1, 6]  # "Hello" vs lowercased "hello": not correct
    assert al.chunks[-2, 6]  # "!" is spelled the same on both sides


def test_special_token_string_inside_text():
    a, b = tok("llama3"), tok("qwen3")
    text = "before<|eot_id|>after"
    al = align_text(a, b, text)
    check_invariants(al, a, b)
    (row,) = al.chunks[(al.chunks[:, 6] == 0) & (al.chunks[:, 1] > al.chunks[:, 0])]
    assert al.text_bytes[row[0]:row[1]] == b"<|eot_id|>"
    assert a.is_special[al.a_ids[row[2]]]


def test_empty_text_gives_zero_chunks():
    al = align_text(tok("llama3"), tok("qwen3"), "")
    assert len(al.chunks) == 0 and len(al.a_ids) == 0
    batch = collate(["", "x"], tok("llama3"), [tok("qwen3")])
    assert batch["num_bytes"].tolist() == [0, 1]
    assert batch["alignment_0_num_chunks"][0] == 0
    assert batch["sample_mask"].tolist() == [False, True]
    assert not batch["alignment_0_pair_valid"][0].any()


def _simple_conversation():
    return [{"role": "user", "content": "What is 12345 + 678?"},
            {"role": "assistant", "content": "It is 13023.\nAnything else?"},
            {"role": "user", "content": "Thanks — «merci»!"},
            {"role": "assistant", "content": "De rien 😀"}]


@pytest.mark.parametrize("student,teacher", [("llama3", "qwen3"), ("qwen3", "gpt-oss"),
                                             ("deepseek-v4", "llama3"), ("mistral-v1", "qwen3")])
def test_chat_contents_align_as_correct_chunks(student, teacher):
    s, t = tok(student), tok(teacher)
    conv = _simple_conversation()
    batch = align_batch([conv], s, [t])
    pair = batch.pairs[0]
    ch = pair.chunks
    total = sum(len(m["content"].encode()) for m in conv)
    assert batch.num_bytes[0] == total == ch[-1, 1]
    assert batch.student.token_bytes.sum() == total == batch.teachers[0].token_bytes.sum()
    in_correct = (ch[:, 1] - ch[:, 0])[ch[:, 6] == 1].sum()
    if student == "mistral-v1":  # "[INST] " + content: the first word's token holds the space
        assert in_correct >= total - 2 * len("Thanks")
    else:
        assert in_correct == total
    # scaffolding chunks have no bytes and are never correct; turn ends pair by role
    scaffold = ch[ch[:, 1] == ch[:, 0]]
    assert not scaffold[:, 6].any()
    if student == "llama3":
        ends = [r for r in scaffold if r[3] - r[2] == 1 and r[5] - r[4] == 1
                and batch.student.ids[r[2]] == s.special_roles["turn_end"]]
        assert len(ends) == len(conv)


def test_chat_corpus_contents_correct():
    convs = [json.loads(line)["messages"] for line in (CORPUS / "chat_heldout.jsonl").read_text().splitlines()]
    convs = [[dict(m, content=unicodedata.normalize("NFC", m["content"])) for m in c] for c in convs[:10]]
    batch = align_batch(convs, tok("llama3"), [tok("qwen3"), tok("deepseek-v4")])
    for pair in batch.pairs:
        ch = pair.chunks
        assert (ch[:, 1] - ch[:, 0])[ch[:, 6] == 1].sum() == batch.num_bytes.sum()


def test_chat_template_error_is_one_line():
    conv = [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]
    with pytest.raises(AlignmentError, match="mistral-v1: its chat template rejects") as err:
        align_batch([conv], tok("llama3"), [tok("mistral-v1")])
    assert "\n" not in str(err.value)


def test_batch_tensors_follow_contract():
    s, t = tok("llama3"), tok("qwen3")
    texts = ["Hello world", "A much longer text with 1234567 digits and émojis 😀.", ""]
    batch = AlignmentCollator(s, [t, s])(texts)  # teacher 1 shares the student's tokenizer
    # a same-vocab teacher gets only its tokenizer fingerprint, no token or alignment keys
    assert [k for k in batch if k.startswith(("teacher_1_", "alignment_1_"))] == ["teacher_1_tokenizer_fingerprint"]
    B = len(texts)
    ids, mask = batch["input_ids"], batch["token_mask"]
    assert ids.shape[0] == B and ids.dtype.is_floating_point is False
    assert batch["token_bytes"].dtype.itemsize == 4 and batch["num_bytes"].tolist() == [len(x.encode()) for x in texts]
    assert (batch["token_bytes"].sum(1) == batch["num_bytes"]).all()
    assert (batch["teacher_0_token_bytes"].sum(1) == batch["num_bytes"]).all()
    sc, tc = batch["alignment_0_student_chunk_id"], batch["alignment_0_teacher_chunk_id"]
    assert ((sc >= 0) == mask).all() and ((tc >= 0) == batch["teacher_0_token_mask"]).all()
    n = batch["alignment_0_num_chunks"]
    valid = batch["alignment_0_pair_valid"]
    assert (valid.sum(1) == n).all()
    assert (batch["alignment_0_chunk_bytes"].sum(1) == batch["num_bytes"]).all()
    ex = batch["alignment_0_student_exact_partition_mask"]
    assert ex[0].tolist()[:3] == [False, True, True]  # BOS is alone; "Hello", " world" exact
    for b in range(B):  # a chunk's tokens are contiguous and chunk ids increase
        row = sc[b][mask[b]]
        assert (row[1:] >= row[:-1]).all()


@settings(max_examples=60, deadline=None)
@given(text=random_text, budget=st.integers(1, 12), tb=st.one_of(st.none(), st.integers(1, 12)),
       teacher=st.sampled_from(("qwen3", "mistral-v1", "gpt-oss")))
def test_truncation_cuts_both_sides_at_one_byte_boundary(text, budget, tb, teacher):
    s, t = tok("llama3"), tok(teacher)
    config = CollateConfig(max_length=budget, teacher_max_length=tb)
    aligned = AlignmentCollator(s, [t], config).align([text])
    n_bytes = int(aligned.num_bytes[0])
    assert len(aligned.student.ids) <= budget and len(aligned.teachers[0].ids) <= (tb or budget)
    assert aligned.student.token_bytes.sum() == n_bytes == aligned.teachers[0].token_bytes.sum()
    ch = aligned.pairs[0].chunks
    assert (len(ch) == 0 and n_bytes == 0) or ch[-1, 1] == n_bytes
    full = align_text(s, t, text)
    if len(ch):  # the kept chunks are a prefix of the full alignment
        assert np.array_equal(ch, full.chunks[:len(ch)])
    # the cut is the last shared boundary within budget: the next chunk would overflow
    if len(ch) < len(full.chunks):
        nxt = full.chunks[len(ch)]
        assert nxt[3] > budget or nxt[5] > (tb or budget)


def test_truncation_budget_smaller_than_first_chunk_gives_empty_sample():
    batch = collate(["12345678"], tok("llama3"), [tok("qwen3")], max_length=1, add_special_tokens=False)
    # llama3 "123" vs qwen3 "1","2","3": one student token needs three teacher tokens
    assert batch["num_bytes"].tolist() == [0] and not batch["sample_mask"][0]


def test_long_text_truncates_without_error():
    text = "word " * 20000
    batch = collate([text], tok("llama3"), [tok("qwen3"), tok("mistral-v1")], max_length=512)
    assert batch["input_ids"].shape[1] == 512
    assert batch["teacher_0_input_ids"].shape[1] <= 512
    assert (batch["teacher_1_token_bytes"].sum(1) == batch["num_bytes"]).all()


def test_lone_surrogate_is_a_clear_error():
    with pytest.raises(AlignmentError, match="sample 1: character 1 is a lone surrogate U\\+D800"):
        align_texts(tok("llama3"), tok("qwen3"), ["fine", "a\ud800b"])


def test_config_validation_names_the_field():
    with pytest.raises(AlignmentError, match="max_length"):
        CollateConfig(max_length=0)
    with pytest.raises(AlignmentError, match="neither a string 'text'"):
        collate([{"body": "x"}], tok("llama3"), [tok("qwen3")])


def test_collate_config_is_a_config():
    from xtoken_core.errors import ConfigError

    cfg = CollateConfig(max_length=64, teacher_max_length=80, add_special_tokens=False, text_field="body")
    assert CollateConfig.from_dict(cfg.to_dict()) == cfg and cfg.teacher_budget == 80
    assert CollateConfig(max_length=64).teacher_budget == 64
    for bad, field in [({"teacher_max_length": 0}, "teacher_max_length"), ({"max_length": 2.5}, "max_length"),
                       ({"add_special_tokens": "yes"}, "add_special_tokens"), ({"text_field": 3}, "text_field")]:
        with pytest.raises(ConfigError, match=f"CollateConfig.{field}"):
            CollateConfig(**bad)
    with pytest.raises(TypeError):
        CollateConfig(64)  # keyword-only


@settings(max_examples=30, deadline=None)
@given(text=random_text, budget=st.integers(1, 16))
def test_truncation_with_two_teachers_shares_one_cut(text, budget):
    s, teachers = tok("gpt-oss"), [tok("qwen3"), tok("mistral-v1")]
    batch = AlignmentCollator(s, teachers, CollateConfig(max_length=budget))([text, text + " tail"])
    for i in range(2):
        assert (batch[f"teacher_{i}_token_bytes"].sum(1) == batch["num_bytes"]).all()
        assert (batch[f"alignment_{i}_chunk_bytes"].sum(1) == batch["num_bytes"]).all()
        assert batch[f"teacher_{i}_token_mask"].sum(1).max() <= budget
    assert (batch["token_bytes"].sum(1) == batch["num_bytes"]).all()
    assert batch["token_mask"].sum(1).max() <= budget


def test_token_straddling_an_nfc_region_is_not_in_a_correct_chunk():
    """Qwen spells NFC(" K" + U+0301) as " \\xe1" + "\\xb8" + "\\xb0": the first token ends inside the
    region the NFC placement maps back, so no chunk holding it may be correct (found by the property
    test above, pair qwen3 x qwen3.5)."""
    for text in (" K\u0301", "a K\u0301 b"):
        for x, y in (("qwen3", "qwen3.5"), ("qwen3", "llama3")):
            a, b = tok(x), tok(y)
            check_invariants(align_text(a, b, text), a, b)
