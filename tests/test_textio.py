"""The readers of user text (`xtoken_align.textio`, `align --text-file/--jsonl`, conversations,
`build-projection --corpus`): a byte-order mark only at the start of a file is dropped, in every
reader alike; U+FEFF elsewhere is text; lines are streamed; corpus format by extension or option;
lone surrogates are one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from xtoken_align import textio
from xtoken_align.projection.refine import read_corpus
from xtoken_cli.main import align_cli
from xtoken_core.errors import DataFileError

BOM = "\ufeff"


def test_iter_lines_terminators_bom_and_long_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(textio, "_READ_BLOCK", 4)  # every line longer than a read block
    f = tmp_path / "t.txt"
    f.write_bytes((BOM + "first line\r\n" + BOM + "second\n\nlast without newline").encode())
    assert list(textio.iter_lines(f)) == [(1, "first line"), (2, BOM + "second"), (3, ""),
                                          (4, "last without newline")]
    f.write_bytes(BOM.encode())
    assert list(textio.iter_lines(f)) == []  # only a BOM: an empty file
    f.write_bytes(b"\n")
    assert list(textio.iter_lines(f)) == [(1, "")]
    f.write_bytes(BOM.encode() + "ok\n".encode() + b"caf\xe9 broken\n")
    with pytest.raises(DataFileError, match=r"invalid UTF-8 at line 2 \(byte 9: b'\\xe9'\)"):
        list(textio.iter_lines(f, "text file"))
    f.write_bytes((BOM + "whole" + BOM).encode())
    assert textio.read_utf8(f) == "whole" + BOM


def _align(*args):
    return CliRunner().invoke(align_cli, ["align", "--student", "llama3", "--teacher", "qwen3", *map(str, args)])


def _record_bytes(path) -> list[int]:
    return [json.loads(x)["bytes"] for x in path.read_text(encoding="utf-8").splitlines()]


def test_bom_is_dropped_alike_in_text_jsonl_and_chat_inputs(tmp_path):
    out = tmp_path / "o.jsonl"
    (tmp_path / "t.txt").write_bytes((BOM + "hello\n" + BOM + "hi\n").encode())
    r = _align("--text-file", tmp_path / "t.txt", "--json", out)
    assert r.exit_code == 0, r.output
    assert _record_bytes(out) == [5, 3 + 2]  # the file's BOM: 0 bytes; one at a line start: 3
    (tmp_path / "t.jsonl").write_bytes((BOM + json.dumps({"text": "hello"}) + "\n"
                                        + json.dumps({"text": "a" + BOM}) + "\n").encode())
    r = _align("--jsonl", tmp_path / "t.jsonl", "--json", out)
    assert r.exit_code == 0, r.output
    assert _record_bytes(out) == [5, 1 + 3]  # U+FEFF inside a text is text
    conv = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    (tmp_path / "c.jsonl").write_bytes((BOM + json.dumps({"messages": conv}) + "\n").encode())
    r = _align("--jsonl", tmp_path / "c.jsonl", "--field", "messages", "--json", out)
    assert r.exit_code == 0, r.output
    assert _record_bytes(out) == [14]


def test_corpus_bom_format_and_surrogates(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_bytes((BOM + '{"looks": "like json"} but is text\n\n' + BOM + "second\n").encode())
    assert read_corpus(plain) == ['{"looks": "like json"} but is text', BOM + "second"]
    lines = tmp_path / "c.jsonl"
    lines.write_bytes((BOM + json.dumps({"text": "one"}) + "\n" + json.dumps({"text": BOM + "two"}) + "\n").encode())
    assert read_corpus(lines) == ["one", BOM + "two"]
    assert read_corpus(lines, "text") == [json.dumps({"text": "one"}), json.dumps({"text": BOM + "two"})]
    as_json = tmp_path / "c.data"
    as_json.write_text(json.dumps({"text": "x"}) + "\n", encoding="utf-8")
    assert read_corpus(as_json, "jsonl") == ["x"]
    with pytest.raises(DataFileError, match=r"line 1 is not valid JSON .*--corpus-format text"):
        read_corpus(plain, "jsonl")
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "a\\ud800b"}\n', encoding="utf-8")
    with pytest.raises(DataFileError, match=r"s.jsonl line 2: \"text\" holds a lone surrogate"):
        read_corpus(bad)


@pytest.mark.parametrize("name,content,pattern", [
    ("s.jsonl", '{"text": "ok"}\n{"text": "a\\ud800b"}\n', 'line 2: "text" holds a lone surrogate'),
    ("b.jsonl", '{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
])
def test_build_projection_corpus_errors_are_one_line(tmp_path, name, content, pattern):
    (tmp_path / name).write_text(content, encoding="utf-8")
    r = CliRunner().invoke(align_cli, ["build-projection", "--student", "llama3", "--teacher", "qwen3",
                                       "--out", str(tmp_path / "p"), "--corpus", str(tmp_path / name)])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], r.stderr
    assert not (tmp_path / "p").exists()
