"""Overlap statistics and the coverage audit, checked against independent sources of token bytes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.conftest import get_tokenizer
from xtoken_align.tokenizer.overlap import category, overlap_report, text_set
from xtoken_cli.main import align_cli


def _quicktok_set(encoding: str) -> set[bytes]:
    """Distinct non-special token bytes straight from the quicktok package (not via xtoken)."""
    import quicktok

    enc = quicktok.get_encoding(encoding)
    return {enc.decode_single_token_bytes(i) for i in range(enc.n_vocab) if not enc.is_special_token(i)}


def test_overlap_matches_independent_byte_sets():
    llama, qwen, oss = _quicktok_set("llama3"), _quicktok_set("qwen3"), _quicktok_set("o200k_harmony")
    report = overlap_report([get_tokenizer("llama3"), get_tokenizer("qwen3"), get_tokenizer("gpt-oss")])
    assert report.sizes == [len(llama), len(qwen), len(oss)]
    assert report.overlap[0][1] == pytest.approx(len(llama & qwen) / min(len(llama), len(qwen)))
    assert report.overlap[0][2] == pytest.approx(len(llama & oss) / min(len(llama), len(oss)))
    assert report.coverage_matrix[2][1] == pytest.approx(len(oss & qwen) / len(oss))
    # Published ballpark (NeMo-RL's matrix, normalisation unpublished): Qwen3~Llama-3.2 about
    # 0.85, Llama~gpt-oss about 0.80, Qwen3~gpt-oss about 0.65.
    assert report.overlap[0][1] == pytest.approx(0.85, abs=0.03)
    assert report.overlap[0][2] == pytest.approx(0.80, abs=0.03)
    assert report.overlap[1][2] == pytest.approx(0.65, abs=0.03)


def test_byte_fallback_piece_and_character_count_once():
    tok = get_tokenizer("mistral-v1")
    strings = text_set(tok)
    ids_for_a = [i for i, b in enumerate(tok.token_bytes) if b == b"A"]
    assert len(ids_for_a) == 2  # "<0x41>" and "A"
    assert b"A" in strings
    assert len(strings) < sum(b is not None for b in tok.token_bytes)


def test_coverage_audit_exposes_qwen_digit_splitting():
    """Qwen splits numbers into single digits: none of Llama-3's 2/3-digit tokens exist there."""
    report = overlap_report([get_tokenizer("llama3"), get_tokenizer("qwen3"), get_tokenizer("gpt-oss")])
    by_pair = {(c.student, c.teacher): c.categories for c in report.coverage}
    llama_qwen = by_pair[("llama3", "qwen3")]
    assert llama_qwen["digits_1"] == {"covered": 10, "total": 10}
    assert llama_qwen["digits_2"] == {"covered": 0, "total": 100}
    assert llama_qwen["digits_3"] == {"covered": 0, "total": 1000}
    assert by_pair[("llama3", "gpt-oss")]["digits_3"] == {"covered": 1000, "total": 1000}
    assert by_pair[("qwen3", "llama3")]["digits_2"]["total"] == 0
    # Special tokens are matched by role: both have an end-of-turn marker.
    assert by_pair[("qwen3", "llama3")]["special"]["covered"] >= 1


@pytest.mark.parametrize("token,expected", [
    (b"7", "digits_1"), (b"42", "digits_2"), (b"999", "digits_3"), (b"1234", None),
    (b" 12", None), (b"...", "ascii_punctuation"), (b"\n\n", "whitespace"), (b"  ", "whitespace"),
    ("日本".encode(), "cjk"), (" 한국".encode(), "cjk"), (b"\xe6\x97", None), (b"abc", None),
])
def test_category(token, expected):
    assert category(token) == expected


def test_cli_report_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "o.json", tmp_path / "o.png"
    result = CliRunner().invoke(align_cli, ["overlap-report", "llama3", "qwen3", "mistral-v1",
                                            "--json", str(out_json), "--plot", str(out_png)])
    assert result.exit_code == 0, result.output
    assert "Coverage audit" in result.output
    data = json.loads(out_json.read_text())
    assert data["names"] == ["llama3", "qwen3", "mistral-v1"]
    assert len(data["overlap"]) == 3 and all(len(r) == 3 for r in data["overlap"])
    assert data["fingerprints"][0] == get_tokenizer("llama3").fingerprint
    assert {(c["student"], c["teacher"]) for c in data["coverage"]} == {
        (a, b) for a in data["names"] for b in data["names"] if a != b}
    assert set(data["coverage"][0]["categories"]["digits_2"]) == {"covered", "total"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["llama3", "no-such-tokenizer-anywhere"], "unknown tokenizer 'no-such-tokenizer-anywhere'"),
    (["llama3", "/nonexistent/path"], "cannot read tokenizer at /nonexistent/path"),
])
def test_cli_bad_input_exits_2_with_one_line(args, message):
    result = CliRunner().invoke(align_cli, ["overlap-report", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_cli_file_that_is_not_a_tokenizer(tmp_path):
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text("[1, 2, 3]")
    result = CliRunner().invoke(align_cli, ["overlap-report", "llama3", str(bogus)])
    assert result.exit_code == 2 and "is not a tokenizer.json" in result.output


def test_cli_unreadable_tokenizer_file(tmp_path):
    """A tokenizer.json that cannot be read (here: a directory; chmod does not stop root)."""
    broken = tmp_path / "broken"
    (broken / "tokenizer.json").mkdir(parents=True)
    result = CliRunner().invoke(align_cli, ["overlap-report", "llama3", str(broken)])
    assert result.exit_code == 2
    assert "cannot read tokenizer file" in result.output and "Traceback" not in result.output
