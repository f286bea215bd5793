"""Every bad input a hurried user types is refused before the work: one `error:` line on stderr,
exit code 2, no traceback, nothing on stdout, no output written and no file changed (issue 12).

One row per bad input: `(id, args, words the error line must hold)`. `args` may hold these
placeholders, replaced by paths under the test's own directory:

    {out}         an empty directory every output option of the row points into
    {tmp}         the test's directory
    {dir}         an empty directory given where a file is expected (outside {out})
    {bad:X}       a copy of the bert-uncased tokenizer spoiled by `_SPOILERS[X]`; {tok} an intact copy
    {proj}        a copy of a real projection artifact; {proj:X} one whose projection.json is
                  edited by `_META_EDITS[X]`
    {file:X}      a data file holding `_FILES[X]`
    {userdir:K}   a directory holding an earlier artifact of kind K (proj, align) and the user's
                  own files (notes.txt, checkpoints/model.bin)

The command runs in an empty working directory. After it, every file under the test's directory
must hold the bytes it held before (inputs are never replaced, user files never deleted), and
{out} and the working directory must still be empty.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from xtoken_cli.main import align_cli

REPO = Path(__file__).resolve().parent.parent
BERT = REPO / "data" / "tokenizers" / "bert-uncased"
PAIR = ["--student", "mistral-v1", "--teacher", "bert-uncased"]
ALIGN_OUT = ["--json", "{out}/a.jsonl", "--html", "{out}/a.html", "--out", "{out}/art"]
ALIGN = ["align", *PAIR, *ALIGN_OUT]
BUILD = ["build-projection", *PAIR, "--out", "{out}/p"]
OVERLAP = ["overlap-report", "--json", "{out}/r.json", "bert-uncased"]


def _spoil_model(spec, cfg):
    spec["model"] = 5


def _spoil_added_id(spec, cfg):
    del spec["added_tokens"][0]["id"]


def _spoil_config_list(spec, cfg):
    return [1, 2]


def _spoil_vocab_id_text(spec, cfg):
    spec["model"]["vocab"]["hello"] = "x"


def _spoil_vocab_id_negative(spec, cfg):
    spec["model"]["vocab"]["hello"] = -1


def _spoil_vocab_id_huge(spec, cfg):
    spec["model"]["vocab"]["hello"] = 10**12


def _spoil_vocab_number(spec, cfg):
    spec["model"]["vocab"] = 5


def _spoil_no_vocab(spec, cfg):
    del spec["model"]["vocab"]


def _spoil_no_tokens(spec, cfg):
    spec["model"]["vocab"], spec["added_tokens"] = {}, []


def _spoil_added_number(spec, cfg):
    spec["added_tokens"] = [5]


def _spoil_added_object(spec, cfg):
    spec["added_tokens"] = {}


def _spoil_added_content(spec, cfg):
    spec["added_tokens"][0]["content"] = None


def _spoil_added_special(spec, cfg):
    spec["added_tokens"][0]["special"] = "yes"


def _spoil_normalizer(spec, cfg):
    spec["normalizer"] = [1]


def _spoil_pre_tokenizer_part(spec, cfg):
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [None]}


def _spoil_unk(spec, cfg):
    spec["model"]["unk_token"] = ["[UNK]"]


def _spoil_chat_template(spec, cfg):
    cfg["chat_template"] = 5


_SPOILERS = {name[len("_spoil_"):]: fn for name, fn in globals().items() if name.startswith("_spoil_")}

_META_EDITS = {
    "no_method": lambda m: m.pop("method"),
    "method_text": lambda m: m.update(method="rule based"),
    "no_stats": lambda m: m.pop("stats"),
    "no_student_vocab_size": lambda m: m["student"].pop("vocab_size"),
    "teacher_vocab_size_text": lambda m: m["teacher"].update(vocab_size="30522"),
    "student_name_number": lambda m: m["student"].update(name=5),
}


def _chat(content) -> str:
    return json.dumps({"text": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": content}]})


_FILES = {
    "text": "hello world\nsecond line\n",
    "plain.jsonl": '{"text": "hello world"}\n',
    "chat_content_5": _chat(5) + "\n",
    "chat_content_none": _chat(None) + "\n",
    "chat_content_list": _chat([{"type": "text", "text": "Hi"}]) + "\n",
    "chat_role_unknown": json.dumps({"text": [{"role": "usr", "content": "Hello"}]}) + "\n",
    "chat_no_role": json.dumps({"text": [{"content": "Hello"}]}) + "\n",
    "chat_no_content": json.dumps({"text": [{"role": "user"}]}) + "\n",
    "chat_empty": json.dumps({"text": []}) + "\n",
    "chat_message_number": json.dumps({"text": [5]}) + "\n",
    "corpus_surrogate.jsonl": '{"text": "fine"}\n{"text": "bad \\ud800 text"}\n',
}

# (id, command line, words the error line must hold)
CASES = [
    # --- malformed tokenizer files: TokenizerLoadError naming the file and the entry ---
    ("tok_model_5", [*OVERLAP, "{bad:model}"], ["tokenizer.json", "model must be an object, got 5"]),
    ("tok_added_without_id", [*OVERLAP, "{bad:added_id}"], ["tokenizer.json", "added_tokens[0] has no 'id'"]),
    ("tok_config_is_a_list", [*OVERLAP, "{bad:config_list}"], ["tokenizer_config.json", "must be a JSON object"]),
    ("tok_vocab_id_text", [*OVERLAP, "{bad:vocab_id_text}"], ["model.vocab['hello']", "token id", "'x'"]),
    ("tok_vocab_id_negative", [*OVERLAP, "{bad:vocab_id_negative}"], ["model.vocab['hello']", "got -1"]),
    ("tok_vocab_id_huge", [*OVERLAP, "{bad:vocab_id_huge}"], ["model.vocab['hello']", "16777216"]),
    ("tok_vocab_number", [*OVERLAP, "{bad:vocab_number}"], ["model.vocab must be"]),
    ("tok_no_vocab", [*OVERLAP, "{bad:no_vocab}"], ["model has no 'vocab'"]),
    ("tok_no_tokens", [*OVERLAP, "{bad:no_tokens}"], ["has no tokens"]),
    ("tok_added_number", [*OVERLAP, "{bad:added_number}"], ["added_tokens[0] must be an object"]),
    ("tok_added_object", [*OVERLAP, "{bad:added_object}"], ["added_tokens must be a list"]),
    ("tok_added_content_null", [*OVERLAP, "{bad:added_content}"], ["added_tokens[0].content must be a string"]),
    ("tok_added_special_text", [*OVERLAP, "{bad:added_special}"], ["added_tokens[0].special must be true or false"]),
    ("tok_normalizer_list", [*OVERLAP, "{bad:normalizer}"], ["normalizer must be an object or null"]),
    ("tok_pre_tokenizer_null_part", [*OVERLAP, "{bad:pre_tokenizer_part}"], ["pre_tokenizer.pretokenizers[0]"]),
    ("tok_unk_list", [*OVERLAP, "{bad:unk}"], ["model.unk_token must be a string"]),
    ("tok_chat_template_number", [*OVERLAP, "{bad:chat_template}"], ["chat_template must be a string"]),
    ("tok_align_teacher_model_5", ["align", "--student", "mistral-v1", "--teacher", "{bad:model}", *ALIGN_OUT,
                                   "--text-file", "{file:text}"], ["model must be an object"]),
    ("tok_build_student_added_id", ["build-projection", "--student", "{bad:added_id}", "--teacher", "bert-uncased",
                                    "--out", "{out}/p"], ["added_tokens[0] has no 'id'"]),
    ("tok_empty_name", [*OVERLAP, ""], ["empty tokenizer name"]),
    ("tok_missing_path", [*OVERLAP, "{tmp}/no/such/dir"], ["cannot read tokenizer at"]),
    ("tok_dir_without_tokenizer_json", [*OVERLAP, "{dir}"], ["has no tokenizer.json"]),
    # --- option bounds, checked before any work ---
    ("build_top_k_huge", [*BUILD, "--top-k", "1000000"], ["--top-k", "<= 256", "1000000"]),
    ("build_top_k_zero", [*BUILD, "--top-k", "0"], ["--top-k", "got 0"]),
    ("build_top_k_fraction", [*BUILD, "--top-k", "2.5"], ["--top-k", "got 2.5"]),
    ("build_top_k_text", [*BUILD, "--top-k", "four"], ["--top-k", "got four"]),
    ("build_student_vocab_huge", [*BUILD, "--student-vocab-size", "10000000000"],
     ["--student-vocab-size", "16777216", "10000000000"]),
    ("build_student_vocab_negative", [*BUILD, "--student-vocab-size", "-5"], ["--student-vocab-size", "got -5"]),
    ("build_teacher_vocab_zero", [*BUILD, "--teacher-vocab-size", "0"], ["--teacher-vocab-size", "got 0"]),
    ("build_teacher_vocab_below_tokenizer", [*BUILD, "--teacher-vocab-size", "100"],
     ["--teacher-vocab-size", "30522"]),
    ("build_max_pieces_huge", [*BUILD, "--max-pieces", "100000000000000000000000"], ["--max-pieces", "<= 256"]),
    ("build_first_weight_inf", [*BUILD, "--first-weight", "inf"], ["--first-weight", "got inf"]),
    ("build_first_weight_huge", [*BUILD, "--first-weight", "1e308"], ["--first-weight", "(0, 1000000]"]),
    ("build_decay_nan", [*BUILD, "--decay", "nan"], ["--decay", "got nan"]),
    ("build_decay_over_1", [*BUILD, "--decay", "2"], ["--decay", "(0, 1]"]),
    ("build_reverse_weight_negative", [*BUILD, "--reverse-weight", "-1"], ["--reverse-weight", "got -1"]),
    ("build_prior_strength_huge", [*BUILD, "--prior-strength", "1e300"], ["--prior-strength", "1000000000"]),
    ("build_flag_with_value", [*BUILD, "--both-directions=yes"], ["--both-directions"]),
    ("build_missing_out", ["build-projection", *PAIR], ["Missing option '--out'"]),
    ("build_unknown_option", [*BUILD, "--topk", "3"], ["No such option", "--topk"]),
    ("build_corpus_missing", [*BUILD, "--corpus", "{tmp}/no-corpus.txt"], ["no-corpus.txt", "No such file"]),
    ("build_corpus_is_a_directory", [*BUILD, "--corpus", "{dir}"], ["corpus", "Is a directory"]),
    ("build_corpus_lone_surrogate", [*BUILD, "--corpus", "{file:corpus_surrogate.jsonl}"],
     ["line 2", "lone surrogate", "\\ud800"]),
    ("align_max_length_zero", [*ALIGN, "--text-file", "{file:text}", "--max-length", "0"], ["--max-length", "got 0"]),
    ("align_max_length_huge", [*ALIGN, "--text-file", "{file:text}", "--max-length", "100000000000000000000000"],
     ["--max-length", "16777216"]),
    ("align_batch_size_zero", [*ALIGN, "--text-file", "{file:text}", "--batch-size", "0"], ["--batch-size", "got 0"]),
    ("align_batch_size_huge", [*ALIGN, "--text-file", "{file:text}", "--batch-size", "10000000"],
     ["--batch-size", "65536"]),
    ("align_batch_size_text", [*ALIGN, "--text-file", "{file:text}", "--batch-size", "many"],
     ["--batch-size", "got many"]),
    ("align_shard_size_negative", [*ALIGN, "--text-file", "{file:text}", "--shard-size", "-3"],
     ["--shard-size", "got -3"]),
    ("align_html_samples_negative", [*ALIGN, "--text-file", "{file:text}", "--html-samples", "-1"],
     ["--html-samples", "got -1"]),
    ("align_html_samples_huge", [*ALIGN, "--text-file", "{file:text}", "--html-samples", "99999999"],
     ["--html-samples", "10000"]),
    ("align_no_input", ALIGN, ["give exactly one input"]),
    ("align_two_inputs", [*ALIGN, "--text-file", "{file:text}", "--jsonl", "{file:text}"], ["give exactly one input"]),
    ("align_missing_student", ["align", "--teacher", "bert-uncased", "--text-file", "{file:text}"],
     ["Missing option '--student'"]),
    ("align_same_tokenizer", ["align", "--student", "bert-uncased", "--teacher", "bert-uncased", *ALIGN_OUT,
                              "--text-file", "{file:text}"], ["same tokenizer"]),
    ("align_text_file_missing", [*ALIGN, "--text-file", "{tmp}/none.txt"], ["none.txt", "No such file"]),
    ("align_text_file_is_a_directory", [*ALIGN, "--text-file", "{dir}"], ["Is a directory"]),
    ("align_jsonl_missing", [*ALIGN, "--jsonl", "{tmp}/none.jsonl"], ["none.jsonl", "No such file"]),
    # --- chat input: non-string content and unknown roles, naming the sample (line) and the message ---
    ("chat_content_5", [*ALIGN, "--jsonl", "{file:chat_content_5}"],
     ["line 1, message 1", "'content' must be a string", "got 5"]),
    ("chat_content_none", [*ALIGN, "--jsonl", "{file:chat_content_none}"], ["line 1, message 1", "got None"]),
    ("chat_content_list", [*ALIGN, "--jsonl", "{file:chat_content_list}"], ["line 1, message 1", "got a list"]),
    ("chat_role_unknown", [*ALIGN, "--jsonl", "{file:chat_role_unknown}"],
     ["line 1, message 0", "unknown role 'usr'"]),
    ("chat_no_role", [*ALIGN, "--jsonl", "{file:chat_no_role}"], ["line 1, message 0", "no 'role'"]),
    ("chat_no_content", [*ALIGN, "--jsonl", "{file:chat_no_content}"], ["line 1, message 0", "no 'content'"]),
    ("chat_empty", [*ALIGN, "--jsonl", "{file:chat_empty}"], ["line 1", "no messages"]),
    ("chat_message_number", [*ALIGN, "--jsonl", "{file:chat_message_number}"], ["line 1", "message 0 is a number"]),
    # --- inspect ---
    ("inspect_samples_negative", ["inspect", "{proj}", "--samples", "-2"], ["--samples", "got -2"]),
    ("inspect_samples_text", ["inspect", "{proj}", "--samples", "x"], ["--samples", "got x"]),
    ("inspect_no_method", ["inspect", "{proj:no_method}"], ["projection.json", "`method` is missing"]),
    ("inspect_method_text", ["inspect", "{proj:method_text}"], ["`method` must be {name, params}"]),
    ("inspect_no_stats", ["inspect", "{proj:no_stats}"], ["projection.json", "`stats` is missing"]),
    ("inspect_no_student_vocab_size", ["inspect", "{proj:no_student_vocab_size}"], ["projection.json", "`student`"]),
    ("inspect_teacher_vocab_size_text", ["inspect", "{proj:teacher_vocab_size_text}"], ["`teacher`"]),
    ("inspect_student_name_number", ["inspect", "{proj:student_name_number}"], ["`student.name` must be a string"]),
    ("inspect_missing_dir", ["inspect", "{tmp}/nothing"], ["nothing", "not a projection artifact"]),
    ("inspect_a_text_file", ["inspect", "{file:text}"], ["not a projection artifact"]),
    # --- overlap-report and the group ---
    ("overlap_one_tokenizer", ["overlap-report", "--json", "{out}/r.json", "llama3"], ["at least two tokenizers"]),
    ("overlap_no_tokenizer", ["overlap-report"], ["Missing argument"]),
    ("unknown_command", ["alignn"], ["No such command 'alignn'"]),
    ("unknown_group_option", ["--verbose", "align"], ["No such option", "--verbose"]),
]


@pytest.fixture(scope="module")
def projection_dir(tmp_path_factory) -> Path:
    """A real projection artifact (mistral-v1 -> bert-uncased: ~3 s), built once for the inspect rows."""
    out = tmp_path_factory.mktemp("proj") / "p"
    r = CliRunner().invoke(align_cli, ["build-projection", *PAIR, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _spoiled(tmp: Path, name: str | None) -> Path:
    d = tmp / f"tok_{name or 'ok'}"
    if d.exists():  # the same placeholder twice in one row
        return d
    d.mkdir()
    spec = json.loads((BERT / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((BERT / "tokenizer_config.json").read_text(encoding="utf-8"))
    new_cfg = _SPOILERS[name](spec, cfg) if name else None
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg if new_cfg is None else new_cfg), encoding="utf-8")
    return d


def _edited_projection(tmp: Path, src: Path, name: str | None) -> Path:
    d = tmp / f"proj_{name or 'ok'}"
    if d.exists():
        return d
    shutil.copytree(src, d)
    if name is not None:
        meta = json.loads((d / "projection.json").read_text(encoding="utf-8"))
        _META_EDITS[name](meta)
        (d / "projection.json").write_text(json.dumps(meta), encoding="utf-8")
    return d


def _data_file(tmp: Path, name: str) -> Path:
    p = tmp / (name if "." in name else f"{name}.txt" if name == "text" else f"{name}.jsonl")
    p.write_text(_FILES[name], encoding="utf-8")
    return p


def _expand(arg: str, tmp: Path, out: Path, request) -> str:
    def one(m: re.Match) -> str:
        key, _, name = m.group(1).partition(":")
        if key == "out":
            return str(out)
        if key == "tmp":
            return str(tmp)
        if key == "dir":
            (tmp / "a_dir").mkdir(exist_ok=True)
            return str(tmp / "a_dir")
        if key == "bad":
            return str(_spoiled(tmp, name))
        if key == "tok":
            return str(_spoiled(tmp, None))
        if key == "file":
            return str(_data_file(tmp, name))
        if key == "proj":
            return str(_edited_projection(tmp, request.getfixturevalue("projection_dir"), name or None))
        if key == "userdir":
            return str(_user_dir(tmp, name, request))
        raise KeyError(key)

    return re.sub(r"\{([a-z_]+(?::[^}]*)?)\}", one, arg)


@pytest.fixture(scope="module")
def alignment_dir(tmp_path_factory) -> Path:
    """A real alignment artifact of two lines, for the {userdir:align} rows."""
    tmp = tmp_path_factory.mktemp("align")
    text = _data_file(tmp, "text")
    r = CliRunner().invoke(align_cli, ["align", *PAIR, "--text-file", str(text), "--out", str(tmp / "a")])
    assert r.exit_code == 0, r.output
    return tmp / "a"


def _user_dir(tmp: Path, kind: str, request) -> Path:
    src = request.getfixturevalue({"proj": "projection_dir", "align": "alignment_dir"}[kind])
    d = tmp / f"userdir_{kind}"
    if d.exists():
        return d
    shutil.copytree(src, d)
    (d / "notes.txt").write_text("my notes\n", encoding="utf-8")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "model.bin").write_bytes(b"\0" * 64)
    return d


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_refused(tmp_path: Path, request, monkeypatch, args: list[str], words: list[str]) -> str:
    """Run the command line of a row (module doc); assert it is refused with one error line
    holding `words`, exit code 2, no traceback, nothing on stdout, and no file created, changed or
    removed. Returns the error line."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    out.mkdir()
    cwd.mkdir()
    argv = [_expand(a, tmp_path, out, request) for a in args]
    before = _files(tmp_path)
    monkeypatch.chdir(cwd)
    r = CliRunner().invoke(align_cli, argv)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    assert r.exit_code == 2, (argv, r.output)
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == "", r.stdout
    assert not list(out.iterdir()) and not list(cwd.iterdir()), "the command wrote an output"
    after = _files(tmp_path)
    assert after.keys() == before.keys(), f"files added {sorted(after.keys() - before.keys())}, removed " \
                                          f"{sorted(before.keys() - after.keys())}"
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"files changed: {changed}"
    return lines[0]


@pytest.mark.parametrize("args,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_up_front(tmp_path, request, monkeypatch, args, words):
    check_refused(tmp_path, request, monkeypatch, args, words)


def test_every_case_id_is_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_error_line_names_the_file_for_malformed_tokenizers(tmp_path, request, monkeypatch):
    line = check_refused(tmp_path, request, monkeypatch, [*OVERLAP, "{bad:model}"], [])
    assert str(tmp_path / "tok_model" / "tokenizer.json") in line


def test_inspect_shows_bytes_escaped_once(projection_dir):
    """A student token that is one byte of a UTF-8 sequence (mistral's byte-fallback `<0x80>`)
    shows as '\\x80' (four characters), not '\\\\x80'."""
    r = CliRunner().invoke(align_cli, ["inspect", str(projection_dir), "--samples", "200"])
    assert r.exit_code == 0, r.output
    assert "'\\x80'" in r.stdout
    assert "\\\\x" not in r.stdout


def test_bounds_appear_in_help():
    r = CliRunner().invoke(align_cli, ["build-projection", "--help"])
    assert "1<=x<=256" in r.stdout and "1<=x<=16777216" in r.stdout
    r = CliRunner().invoke(align_cli, ["align", "--help"])
    assert "0<=x<=10000" in r.stdout and "1<=x<=65536" in r.stdout


# --- output paths (helper F's area, cli/outputs.py and the artifact writers) -------------------------
# The same check: refused before the work, the user's files and the inputs left as they were.
_META_EDITS["tensors_sha_wrong"] = lambda m: m.update(tensors_sha256="sha256:" + "0" * 64)

ALIGN_TEXT = ["align", *PAIR, "--text-file", "{file:text}"]
CASES_F = [
    ("out_dir_holds_user_files", ["build-projection", *PAIR, "--out", "{userdir:proj}"], ["userdir_proj"]),
    ("align_out_dir_holds_user_files", [*ALIGN_TEXT, "--out", "{userdir:align}"], ["userdir_align"]),
    ("align_json_is_the_jsonl_input", ["align", *PAIR, "--jsonl", "{file:plain.jsonl}", "--json",
                                       "{file:plain.jsonl}"], ["--json", "plain.jsonl"]),
    ("align_html_is_the_text_input", [*ALIGN_TEXT, "--html", "{file:text}"], ["--html", "text.txt"]),
    ("overlap_json_is_a_tokenizer_input", ["overlap-report", "bert-uncased", "{tok}", "--json",
                                           "{tok}/tokenizer.json"], ["--json", "tokenizer.json"]),
    ("align_json_parent_missing", [*ALIGN_TEXT, "--json", "{tmp}/missing-dir/x.jsonl"], ["missing-dir"]),
    ("align_json_is_a_directory", [*ALIGN_TEXT, "--json", "{out}"], ["--json"]),
    ("align_html_is_a_directory", [*ALIGN_TEXT, "--html", "{out}"], ["--html"]),
    ("align_html_dir_with_json_too", [*ALIGN_TEXT, "--json", "{out}/a.jsonl", "--html", "{out}"], ["--html"]),
    ("build_out_parent_missing", ["build-projection", *PAIR, "--out", "{tmp}/missing-dir/p"], ["missing-dir"]),
    ("build_out_is_a_file", ["build-projection", *PAIR, "--out", "{file:text}"], ["text.txt"]),
    ("align_out_parent_missing", [*ALIGN_TEXT, "--out", "{tmp}/missing-dir/a"], ["missing-dir"]),
    ("overlap_json_parent_missing", ["overlap-report", "bert-uncased", "mistral-v1", "--json",
                                     "{tmp}/missing-dir/r.json"], ["missing-dir"]),
    ("overlap_plot_is_a_directory", ["overlap-report", "bert-uncased", "mistral-v1", "--plot", "{out}"],
     ["--plot"]),
    ("inspect_tensors_hash_differs", ["inspect", "{proj:tensors_sha_wrong}"], ["projection.safetensors"]),
]


@pytest.mark.parametrize("args,words", [c[1:] for c in CASES_F], ids=[c[0] for c in CASES_F])
def test_bad_output_is_refused_up_front(tmp_path, request, monkeypatch, args, words):
    check_refused(tmp_path, request, monkeypatch, args, words)


# --- the same checks from Python ---------------------------------------------------------------

def test_library_refuses_the_same_inputs(tmp_path):
    from xtoken_align import load_tokenizer
    from xtoken_align.alignment.chat import render_conversation
    from xtoken_align.batch.collate import CollateConfig
    from xtoken_align.projection.builder import ProjectionConfig
    from xtoken_align.projection.refine import read_corpus
    from xtoken_core.errors import AlignmentError, ConfigError, DataFileError, TokenizerLoadError

    with pytest.raises(ConfigError, match=r"top_k must be <= 256"):
        ProjectionConfig(top_k=1_000_000)
    with pytest.raises(ConfigError, match=r"student_model_vocab_size must be <= 16777216"):
        ProjectionConfig(student_model_vocab_size=10**10)
    with pytest.raises(ConfigError, match=r"max_length must be <= 16777216"):
        CollateConfig(max_length=10**23)
    with pytest.raises(TokenizerLoadError, match=r"added_tokens\[0\] has no 'id'"):
        load_tokenizer(str(_spoiled(tmp_path, "added_id")))
    tok = load_tokenizer(str(_spoiled(tmp_path, None)))
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 5}]
    with pytest.raises(AlignmentError, match=r"^sample 7, message 1 \(assistant\): 'content' must be a string, got 5"):
        render_conversation(tok, conv, where="sample 7")
    with pytest.raises(DataFileError, match=r"line 2: \"text\" holds a lone surrogate \(\\ud800"):
        read_corpus(_data_file(tmp_path, "corpus_surrogate.jsonl"))


def test_config_token_entry_that_is_no_string_names_no_role(tmp_path):
    """`bos_token: {"content": [...]}` in tokenizer_config.json was a TypeError; it names no token."""
    from xtoken_align import load_tokenizer

    d = _spoiled(tmp_path, None)
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["cls_token"] = cfg["bos_token"] = {"content": ["[CLS]"]}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok = load_tokenizer(str(d))
    assert tok.special_tokens[tok.special_roles["bos"]] == "[CLS]"  # from the family table


# Helper H's cases are inputs that must be *accepted* (exit 0), with the bytes each sample counts.
BOM = "\ufeff"
ACCEPTED_H = [
    ("corpus_plain_text_starting_with_brace", ["build-projection", *PAIR, "--out", "{out}/p", "--corpus",
                                               "{file:brace_corpus.txt}"], None),
    ("text_file_bom_dropped", ["align", *PAIR, "--text-file", "{file:bom_text.txt}", "--json", "{out}/a.jsonl"],
     [5, 5]),
    ("jsonl_bom_dropped", ["align", *PAIR, "--jsonl", "{file:bom.jsonl}", "--json", "{out}/a.jsonl"], [5]),
    ("feff_inside_text_is_3_bytes", ["align", *PAIR, "--text-file", "{file:inner_feff.txt}", "--json",
                                     "{out}/a.jsonl"], [9]),
]
_FILES.update({"brace_corpus.txt": "{curly} is not JSON\nsecond line\n", "bom_text.txt": BOM + "hello\nworld\n",
               "bom.jsonl": BOM + '{"text": "hello"}\n', "inner_feff.txt": "ab" + BOM + "cdef\n"})


@pytest.mark.parametrize("args,sample_bytes", [c[1:] for c in ACCEPTED_H], ids=[c[0] for c in ACCEPTED_H])
def test_inputs_that_are_accepted(tmp_path, request, args, sample_bytes):
    out = tmp_path / "out"
    out.mkdir()
    argv = [_expand(a, tmp_path, out, request) for a in args]
    r = CliRunner().invoke(align_cli, argv)
    assert r.exit_code == 0, r.output
    if sample_bytes is not None:
        records = [json.loads(ln) for ln in (out / "a.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [rec["bytes"] for rec in records] == sample_bytes
