"""Long texts aligned in windows (`xtoken_align.alignment.windows`, `align` on big inputs): the
pieces are exactly the whole text's alignment, for real tokenizers (byte-level BPE, an NFC one, a
SentencePiece one), on corpus text and on texts built to break window edges; `align --json` is
byte-identical with and without windows."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import xtoken_cli.align_cmd as align_cmd
from tests.alignment_helpers import _FRAGMENTS
from tests.conftest import corpus_records
from tests.conftest import get_tokenizer as tok
from xtoken_align.alignment import windows
from xtoken_align.alignment.aligner import align_sides, encode_side
from xtoken_cli.main import align_cli

SIDE_FIELDS = ("ids", "starts", "ends", "faithful", "keys")
PAIR_FIELDS = ("chunks", "a_chunk", "b_chunk", "a_exact", "b_exact")


def _corpus_text(n_bytes: int, split: str = "train") -> str:
    parts, size = [], 0
    for rec in corpus_records(split):
        parts.append(rec["text"])
        size += len(rec["text"].encode()) + 2
        if size >= n_bytes:
            break
    return "\n\n".join(parts)


def _hostile_text(seed: int, n_chars: int) -> str:
    """Corpus words mixed with the alignment tests' hard fragments and long runs (letters, spaces,
    newlines, digits, CJK, combining marks, special-token strings) that cross window edges."""
    words = _corpus_text(20_000, "heldout").split(" ")
    r = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        x = r.random()
        if x < 0.15:
            piece = r.choice(_FRAGMENTS)
        elif x < 0.18:
            piece = r.choice(["a" * r.randint(300, 3000), " " * r.randint(50, 2000), "\n" * r.randint(10, 500),
                              "中" * r.randint(100, 2000), "9" * r.randint(100, 1500), "<|endoftext|>", "<|eot_id|>",
                              "</s>", "e\u0301" * r.randint(1, 300)])
        else:
            piece = " " + r.choice(words)
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _whole(a, b, text, add):
    sa, _ = encode_side(a, [text], add_special_tokens=add)
    sb, _ = encode_side(b, [text], add_special_tokens=add)
    return sa, sb, align_sides(sa, sb)


def _windowed(a, b, text, add, window, overlap):
    pieces, restarts = [], 0
    for piece in windows.align_long(a, b, text, add_special_tokens=add, window=window, overlap=overlap):
        if piece is windows.RESTART:
            pieces, restarts = [], restarts + 1
            continue
        pieces.append(piece)
    return pieces, restarts


def _assert_same(a, b, text, *, add=True, window=1500, overlap=256) -> tuple[list, int]:
    want_a, want_b, want_pair = _whole(a, b, text, add)
    pieces, restarts = _windowed(a, b, text, add, window, overlap)
    got_a, got_b, got_pair = windows.join(pieces)
    for name, want, got in (("student", want_a, got_a), ("teacher", want_b, got_b)):
        for f in SIDE_FIELDS:
            assert np.array_equal(getattr(want, f), getattr(got, f)), f"{name}.{f}"
        assert bool(want.fallback[0]) == bool(got.fallback[0]), f"{name}.fallback"
    for f in PAIR_FIELDS:
        assert np.array_equal(getattr(want_pair, f), getattr(got_pair, f)), f"pair.{f}"
    return pieces, restarts


@pytest.mark.parametrize("student,teacher", [("llama3", "qwen3"), ("llama3", "mistral-v1"), ("qwen3", "mistral-v1")])
def test_windows_equal_whole_on_corpus_text(student, teacher):
    text = _corpus_text(60_000)
    pieces, _ = _assert_same(tok(student), tok(teacher), text, window=4000, overlap=512)
    assert len(pieces) > 10
    # Memory follows the window: no piece holds much more than one window of text.
    assert max(p.num_bytes for p in pieces) <= 3 * (4000 + 512)


@pytest.mark.parametrize("student,teacher,seed,add", [
    ("llama3", "qwen3", 0, True), ("llama3", "mistral-v1", 1, False), ("qwen3", "mistral-v1", 2, True),
    ("tekken", "bert-uncased", 3, True),
])
def test_windows_equal_whole_on_hostile_text(student, teacher, seed, add):
    _assert_same(tok(student), tok(teacher), _hostile_text(seed, 25_000), add=add)


def test_offsets_fallback_late_in_the_text_restarts():
    # U+2581 sends mistral-v1 (Metaspace) to the offsets placement; seen only in a later window,
    # the text is started again with that side placed from offsets everywhere, as when whole.
    text = _corpus_text(12_000) + " a\u2581b " + _corpus_text(3_000, "heldout")
    pieces, restarts = _assert_same(tok("llama3"), tok("mistral-v1"), text, window=2000, overlap=256)
    assert restarts == 1 and len(pieces) > 3


def test_short_text_is_not_windowed():
    assert windows.LONG_TEXT_CHARS >= 1 << 20  # texts up to 1 MiB characters take the whole-text path
    assert not windows.is_long("x" * windows.LONG_TEXT_CHARS)
    assert windows.is_long("x" * (windows.LONG_TEXT_CHARS + 1))
    assert not windows.is_long([{"role": "user", "content": "x" * (2 * windows.LONG_TEXT_CHARS)}])


def _align(tmp_path, tag, *args):
    out = tmp_path / f"{tag}.jsonl"
    r = CliRunner().invoke(align_cli, ["align", *map(str, args), "--json", str(out)])
    assert r.exit_code == 0, r.output
    return out.read_bytes(), r.output.replace(str(out), "OUT")


def test_cli_json_is_identical_with_windows(tmp_path, monkeypatch):
    """A ~1.2 MB corpus text, a few medium and short ones, an empty one: `--json` and the printed
    summary are byte-identical whether long texts are windowed (small windows) or aligned whole
    (the path of every text before windows existed)."""
    big = _corpus_text(1_200_000)
    texts = [big, _corpus_text(40_000, "heldout"), "", *(r["text"] for r in corpus_records("heldout")[:5])]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    args = ("--student", "llama3", "--teacher", "qwen3", "--jsonl", src)
    monkeypatch.setattr(windows, "LONG_TEXT_CHARS", 10 ** 9)
    whole = _align(tmp_path, "whole", *args)
    monkeypatch.setattr(windows, "LONG_TEXT_CHARS", 30_000)
    monkeypatch.setattr(windows, "WINDOW_CHARS", 60_000)
    monkeypatch.setattr(windows, "OVERLAP_CHARS", 4_000)
    windowed = _align(tmp_path, "windowed", *args)
    assert windowed == whole
    assert len(whole[0].splitlines()) == len(texts)


def test_cli_truncation_and_artifact_with_windows(tmp_path, monkeypatch):
    text = _corpus_text(30_000)
    src = tmp_path / "in.txt"
    src.write_text(text.replace("\n", " ") + "\n" + "short line\n", encoding="utf-8")
    args = ("--student", "llama3", "--teacher", "mistral-v1", "--text-file", src, "--max-length", 3000)
    monkeypatch.setattr(windows, "LONG_TEXT_CHARS", 10 ** 9)
    whole = _align(tmp_path, "whole", *args, "--out", tmp_path / "a_whole")
    monkeypatch.setattr(windows, "LONG_TEXT_CHARS", 3000)
    monkeypatch.setattr(windows, "WINDOW_CHARS", 3000)
    monkeypatch.setattr(windows, "OVERLAP_CHARS", 400)
    windowed = _align(tmp_path, "windowed", *args, "--out", tmp_path / "a_win")
    assert windowed[0] == whole[0]
    assert windowed[1].replace("a_win", "a_whole") == whole[1]
    record = json.loads(whole[0].splitlines()[0])
    assert record["student_tokens"] <= 3000 and record["bytes"] < len(text)
    want = load_file(tmp_path / "a_whole" / "alignment-00000.safetensors")
    got = load_file(tmp_path / "a_win" / "alignment-00000.safetensors")
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


def test_cli_html_draws_at_most_a_bounded_number_of_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(align_cmd, "HTML_MAX_CHUNKS", 50)
    monkeypatch.setattr(windows, "LONG_TEXT_CHARS", 2000)
    monkeypatch.setattr(windows, "WINDOW_CHARS", 2000)
    monkeypatch.setattr(windows, "OVERLAP_CHARS", 256)
    src = tmp_path / "in.txt"
    src.write_text(_corpus_text(8_000).replace("\n", " ") + "\nshort\n", encoding="utf-8")
    r = CliRunner().invoke(align_cli, ["align", "--student", "llama3", "--teacher", "qwen3", "--text-file",
                                       str(src), "--html", str(tmp_path / "o.html")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "o.html").read_text(encoding="utf-8")
    assert page.count('<span class="c') == 50 + 2  # the long text's first 50 chunks; "short": BOS + 1
    assert "more chunks not shown (at most 50 per sample)" in page
