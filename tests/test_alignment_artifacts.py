"""Alignment artifacts (`--out`) and the `xtoken-align align` command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests.alignment_helpers import tok
from xtoken_align.alignment.aligner import encode_side
from xtoken_align.batch.alignment_artifacts import read_alignment_artifact, write_alignment_artifact
from xtoken_align.batch.collate import AlignmentCollator, CollateConfig
from xtoken_cli.main import align_cli
from xtoken_core.errors import ArtifactError

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"


def _texts(n: int) -> list[str]:
    lines = (CORPUS / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x)["text"] for x in lines[:n]]


def test_artifact_round_trip_equals_collator(tmp_path):
    s, t = tok("llama3"), tok("qwen3")
    collator = AlignmentCollator(s, [t], CollateConfig(max_length=96))
    texts = _texts(21) + ["", "x"]
    batches = [collator.align(texts[i:i + 8]) for i in range(0, len(texts), 8)]
    meta = write_alignment_artifact(tmp_path / "art", s, t, batches, shard_size=10)
    assert [sh["num_samples"] for sh in meta["shards"]] == [16, 7]
    on_disk = json.loads((tmp_path / "art" / "alignment.json").read_text())
    assert on_disk["schema_version"] == 1 and on_disk["kind"] == "alignment"
    assert on_disk["student"]["fingerprint"] == s.fingerprint and on_disk["teacher"]["fingerprint"] == t.fingerprint
    art = read_alignment_artifact(tmp_path / "art", student=s, teacher=t)
    assert art.num_samples == len(texts)
    idx = [20, 3, 22, 21, 15, 16]
    got = art.batch(idx, student=s, teacher=t)
    want = collator([texts[i] for i in idx])
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # reading can truncate further, at a shared boundary again
    short = art.batch(idx, max_length=10)
    assert short["input_ids"].shape[1] <= 10
    assert (short["token_bytes"].sum(1) == short["num_bytes"]).all()
    assert (short["teacher_0_token_bytes"].sum(1) == short["num_bytes"]).all()


def test_artifact_fingerprint_mismatch_names_the_side(tmp_path):
    s, t = tok("llama3"), tok("qwen3")
    write_alignment_artifact(tmp_path / "art", s, t, [AlignmentCollator(s, [t]).align(["hi"])])
    with pytest.raises(ArtifactError, match="teacher tokenizer differs") as err:
        read_alignment_artifact(tmp_path / "art", student=s, teacher=tok("gpt-oss"))
    assert "student" not in str(err.value).split("built for other tokenizers:")[1]
    with pytest.raises(ArtifactError, match="student tokenizer differs"):
        read_alignment_artifact(tmp_path / "art", student=tok("mistral-v1"))
    with pytest.raises(ArtifactError, match="out of range"):
        read_alignment_artifact(tmp_path / "art").aligned([1])


def test_artifact_write_is_atomic_and_checks_schema(tmp_path):
    s, t = tok("llama3"), tok("qwen3")

    def failing():
        yield AlignmentCollator(s, [t]).align(["one"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_alignment_artifact(tmp_path / "art", s, t, failing(), shard_size=1)
    assert not (tmp_path / "art").exists() and not list(tmp_path.iterdir())
    write_alignment_artifact(tmp_path / "art", s, t, [AlignmentCollator(s, [t]).align(["one"])])
    meta = json.loads((tmp_path / "art" / "alignment.json").read_text())
    meta["schema_version"] = 2
    (tmp_path / "art" / "alignment.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="schema_version 2 is not supported"):
        read_alignment_artifact(tmp_path / "art")
    with pytest.raises(ArtifactError, match="same tokenizer"):
        write_alignment_artifact(tmp_path / "b", s, s, [])


def test_nfc_mapping_equals_offsets_fallback():
    q = tok("qwen3")
    as_exact = dataclasses.replace(q, exactness="exact")  # same tables; forces the offsets path
    # (where NFC reorders several marks the two may split a region differently; both stay valid)
    texts = ["cafe\u0301 \u212b\u0301 \u1100\u1161\u11a8 x", "plain", "A\u030a\u0301B"]
    a, _ = encode_side(q, texts)
    b, _ = encode_side(as_exact, texts)
    assert a.fallback.tolist() == [True, False, True]
    for field in ("starts", "ends", "faithful"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


# --- CLI ---------------------------------------------------------------------------------------

def _run(*args):
    return CliRunner().invoke(align_cli, ["align", *map(str, args)])


def _one_line_error(result, pattern: str):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def test_cli_outputs(tmp_path):
    texts = _texts(5) + [""]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": x}) + "\n" for x in texts), encoding="utf-8")
    r = _run("--student", "llama3", "--teacher", "qwen3", "--jsonl", src, "--max-length", 64,
             "--json", tmp_path / "o.jsonl", "--html", tmp_path / "o.html", "--out", tmp_path / "art")
    assert r.exit_code == 0, r.output
    assert "bytes in exact 1:1 chunks" in r.output and "1:1" in r.output
    records = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(records) == len(texts) and records[-1] == {"bytes": 0, "student_tokens": 0,
                                                          "teacher_tokens": 0, "chunks": []}
    for rec in records[:-1]:
        ch = np.array(rec["chunks"])
        assert rec["student_tokens"] <= 64 and ch[-1, 1] == rec["bytes"] and ch[-1, 3] == rec["student_tokens"]
    page = (tmp_path / "o.html").read_text()
    assert page.startswith("<!doctype html>") and "&lt;|begin_of_text|&gt;" in page
    art = read_alignment_artifact(tmp_path / "art", student=tok("llama3"), teacher=tok("qwen3"))
    assert art.num_samples == len(texts)


def test_cli_text_file_and_conversations(tmp_path):
    (tmp_path / "t.txt").write_text("first line\r\nsecond line 123\n", encoding="utf-8")
    r = _run("--student", "qwen3", "--teacher", "mistral-v1", "--text-file", tmp_path / "t.txt",
             "--json", tmp_path / "o.jsonl")
    assert r.exit_code == 0, r.output
    assert [json.loads(x)["bytes"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == [10, 15]
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": conv}) + "\n", encoding="utf-8")
    r = _run("--student", "llama3", "--teacher", "qwen3", "--jsonl", tmp_path / "c.jsonl",
             "--field", "messages")
    assert r.exit_code == 0, r.output
    assert "text bytes 14" in r.output


@pytest.mark.parametrize("case,pattern", [
    ("no_input", "give exactly one input"),
    ("both_inputs", "give exactly one input"),
    ("bad_utf8", "invalid UTF-8 at line 2"),
    ("bad_json", "line 2 is not valid JSON"),
    ("missing_field", "has no 'body' field"),
    ("bad_length", "--max-length must be a positive integer"),
    ("unknown_tokenizer", "unknown tokenizer 'no-such-tok'"),
    ("missing_file", "cannot read"),
    ("same_tokenizer", "same tokenizer"),
    ("surrogate", "line 2: 'text' holds a lone surrogate"),
    ("bad_messages", "a conversation must be a list of"),
])
def test_cli_bad_input_exit_2(tmp_path, case, pattern):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a"}\n', encoding="utf-8")
    base = ["--student", "llama3", "--teacher", "qwen3"]
    args = {
        "no_input": base,
        "both_inputs": base + ["--jsonl", good, "--text-file", good],
        "bad_utf8": base + ["--text-file", tmp_path / "bad.txt"],
        "bad_json": base + ["--jsonl", tmp_path / "bad.jsonl"],
        "missing_field": base + ["--jsonl", good, "--field", "body"],
        "bad_length": base + ["--jsonl", good, "--max-length", 0],
        "unknown_tokenizer": ["--student", "no-such-tok", "--teacher", "qwen3", "--jsonl", good],
        "missing_file": base + ["--text-file", tmp_path / "nope.txt"],
        "same_tokenizer": ["--student", "qwen3", "--teacher", "qwen3", "--jsonl", good],
        "surrogate": base + ["--jsonl", tmp_path / "sur.jsonl"],
        "bad_messages": base + ["--jsonl", tmp_path / "msg.jsonl", "--field", "messages"],
    }[case]
    (tmp_path / "sur.jsonl").write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n', encoding="utf-8")
    (tmp_path / "msg.jsonl").write_text('{"messages": ["just a string"]}\n', encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe oops\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    _one_line_error(_run(*args), pattern)


def test_multi_teacher_batch_from_artifacts(tmp_path):
    from xtoken_align.batch.alignment_artifacts import batch_from_artifacts

    s, t0, t1 = tok("llama3"), tok("qwen3"), tok("mistral-v1")
    texts = _texts(6)
    for name, t in (("a0", t0), ("a1", t1)):
        write_alignment_artifact(tmp_path / name, s, t, [AlignmentCollator(s, [t]).align(texts)])
    arts = [read_alignment_artifact(tmp_path / "a0", student=s, teacher=t0),
            read_alignment_artifact(tmp_path / "a1", student=s, teacher=t1)]
    got = batch_from_artifacts(arts, [4, 1], max_length=40, student=s, teachers=[t0, t1])
    want = AlignmentCollator(s, [t0, t1], CollateConfig(max_length=40))([texts[4], texts[1]])
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    write_alignment_artifact(tmp_path / "short", s, t1,
                             [AlignmentCollator(s, [t1], CollateConfig(max_length=8)).align(texts)])
    with pytest.raises(ArtifactError, match="other student tokens"):
        batch_from_artifacts([arts[0], read_alignment_artifact(tmp_path / "short")], [0])
