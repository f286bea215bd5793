"""Outputs never destroy what they did not create, and tensors are tied to their metadata (issue 12).

The writer (`xtoken_core.artifact_format.atomic_dir`): refuses directories holding anything but a
previous artifact of its kind, replaces only its own files (each atomically, the JSON last), cleans
stale temporaries, follows the umask, refuses a concurrent writer (two processes); readers never
return a mismatched pair while a writer runs, and refuse a swapped or edited tensors file
(`tensors_sha256`), bad row sums and out-of-range ids. The CLI checks its output paths before any
work (`cli/outputs.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.alignment_helpers import tok
from xtoken_align.batch.alignment_artifacts import read_alignment_artifact, write_alignment_artifact
from xtoken_align.batch.collate import AlignmentCollator
from xtoken_align.projection import artifacts as art
from xtoken_cli import outputs
from xtoken_cli.main import align_cli
from xtoken_core import artifact_format as fmt
from xtoken_core.errors import ArtifactError

REPO = Path(__file__).resolve().parent.parent
IN_FIXTURE = REPO / "data" / "tokenizers" / "llama3" / "xtoken-safety-test.png"  # must never be written
V_S, V_T, K = 8, 12, 2


def _projection(version: int = 0, *, rows: int = V_S, reverse: bool = False, fp: str = "sha256:t"):
    """A small valid projection whose indices encode `version` (rows sum to 1)."""
    idx = np.full((rows, K), -1, np.int64)
    w = np.zeros((rows, K), np.float32)
    idx[:, 0] = (np.arange(rows) + version) % V_T
    idx[:, 1] = (np.arange(rows) + version + 1) % V_T
    w[:, 0], w[:, 1] = 0.75, 0.25
    side = lambda name, f, v: {"name": name, "fingerprint": f, "vocab_size": v, "model_vocab_size": v}  # noqa: E731
    meta = {"schema_version": 1, "kind": "projection", "direction": "student_to_teacher", "top_k": K,
            "student": side("s", "sha256:s", rows), "teacher": side("t", fp, V_T), "version": version,
            "method": {"name": "test", "params": {}}, "stats": {}, "created_with": "test"}
    fwd = art.ProjectionArtifact(indices=idx, weights=w, meta=meta, row_kind=np.ones(rows, np.uint8))
    if not reverse:
        return fwd, None
    ridx = np.full((V_T, 1), -1, np.int64)
    rw = np.zeros((V_T, 1), np.float32)
    ridx[:, 0], rw[:, 0] = np.arange(V_T) % rows, 1.0
    rmeta = dict(meta, direction="teacher_to_student", top_k=1)
    return fwd, art.ProjectionArtifact(indices=ridx, weights=rw, meta=rmeta)


def _save(out, version=0, **kw):
    fwd, rev = _projection(version, **kw)
    return art.write_projection(out, fwd, rev)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_files(d: Path) -> dict[str, bytes]:
    (d / "checkpoints").mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("my notes")
    (d / "checkpoints" / "model.bin").write_bytes(b"\x00weights")
    return _tree(d)


# --- the writer replaces only its own files ---------------------------------------------------------

def test_writer_refuses_a_directory_with_user_files_and_deletes_nothing(tmp_path):
    d = tmp_path / "d"
    _save(d)
    before = _user_files(d)
    with pytest.raises(ArtifactError, match=r"d/checkpoints and 1 more, which is not part of a projection artifact"):
        _save(d, 1)
    assert _tree(d) == before
    # an alignment artifact's directory, too
    s, t = tok("llama3"), tok("qwen3")
    a = tmp_path / "a"
    write_alignment_artifact(a, s, t, [AlignmentCollator(s, [t]).align(["hi"])])
    before = _user_files(a)
    with pytest.raises(ArtifactError, match="not part of an alignment artifact"):
        write_alignment_artifact(a, s, t, [AlignmentCollator(s, [t]).align(["hello"])])
    assert _tree(a) == before
    # another kind's artifact is foreign too, and so is a symbolic link
    with pytest.raises(ArtifactError, match="alignment-00000.safetensors and 3 more, which is not part of a proj"):
        art.write_projection(a, *_projection())
    e = tmp_path / "e"
    e.mkdir()
    (e / "projection.safetensors").symlink_to(a / "notes.txt")
    with pytest.raises(ArtifactError, match="projection.safetensors"):
        _save(e)
    assert (a / "notes.txt").read_text() == "my notes"


def test_replacing_keeps_the_directory_and_removes_only_old_artifact_files(tmp_path):
    d = tmp_path / "d"
    _save(d, 0, reverse=True)
    assert sorted(_tree(d)) == ["projection.json", "projection.safetensors", "teacher_to_student/projection.json",
                                "teacher_to_student/projection.safetensors"]
    ino = d.stat().st_ino
    _save(d, 1)  # no reverse part this time: the old one goes, the directory stays
    assert sorted(_tree(d)) == ["projection.json", "projection.safetensors"] and d.stat().st_ino == ino
    assert art.read_projection(d).meta["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # nothing next to it
    # alignment shards: 3 before, 1 after
    s, t = tok("llama3"), tok("qwen3")
    a = tmp_path / "a"
    batches = [AlignmentCollator(s, [t]).align([x]) for x in ("one", "two", "three")]
    write_alignment_artifact(a, s, t, batches, shard_size=1)
    assert sorted(_tree(a)) == ["alignment-00000.safetensors", "alignment-00001.safetensors",
                                "alignment-00002.safetensors", "alignment.json"]
    write_alignment_artifact(a, s, t, batches, shard_size=8)
    assert sorted(_tree(a)) == ["alignment-00000.safetensors", "alignment.json"]
    assert read_alignment_artifact(a).aligned([2]).num_bytes.tolist() == [5]


def test_empty_directory_and_dot(tmp_path, monkeypatch):
    d = tmp_path / "empty"
    d.mkdir()
    _save(d)
    assert art.read_projection(d).num_rows == V_S
    e = tmp_path / "cwd"
    e.mkdir()
    monkeypatch.chdir(e)
    _save(Path("."))  # `.` cannot be renamed; the writer never renames the directory itself
    assert sorted(p.name for p in e.iterdir()) == ["projection.json", "projection.safetensors"]


def test_missing_parent_is_an_error_and_is_never_created(tmp_path):
    with pytest.raises(ArtifactError, match=r"missing does not exist \(create it first\)"):
        _save(tmp_path / "missing" / "proj")
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_killed_runs_are_cleaned(tmp_path):
    d = tmp_path / "proj"
    _save(d, 0, reverse=True)
    (d / ".projection.safetensors.tmp-ab12cd34").write_bytes(b"half")
    (d / ".xtoken-staging.tmp-deadbeef").mkdir()
    (d / ".xtoken-staging.tmp-deadbeef" / "projection.json").write_text("{}")
    (d / "teacher_to_student" / ".projection.json.tmp-0a1b").write_text("{")
    (d / fmt.LOCK_NAME).write_text("")  # the lock file of a killed writer (its flock went with it)
    (tmp_path / ".proj.tmp-k2j3h4g5").mkdir()  # what older versions left next to the directory
    (tmp_path / ".proj.old-x9y8z7w6" / "artifact").mkdir(parents=True)
    (tmp_path / ".proj.old-x9y8z7w6" / "artifact" / "projection.json").write_text("{}")
    (tmp_path / ".proj.notes").write_text("a user's file that only looks similar")
    (tmp_path / ".other.tmp-abc").mkdir()  # another artifact's temporary: not ours to clean
    _save(d, 1, reverse=True)
    assert sorted(p.name for p in d.iterdir()) == ["projection.json", "projection.safetensors", "teacher_to_student"]
    assert sorted(p.name for p in (d / "teacher_to_student").iterdir()) == ["projection.json",
                                                                           "projection.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-abc", ".proj.notes", "proj"]


def test_a_failed_write_changes_nothing(tmp_path, monkeypatch):
    d = tmp_path / "d"
    _save(d, 0, reverse=True)
    before = _tree(d)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "write_meta", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(d, 1)
    assert _tree(d) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with pytest.raises(OSError):
        _save(tmp_path / "new", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the directory it made is gone again


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_permissions_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        d = tmp_path / "d"
        _save(d, 0, reverse=True)
        s, t = tok("llama3"), tok("qwen3")
        write_alignment_artifact(tmp_path / "a", s, t, [AlignmentCollator(s, [t]).align(["hi"])])
        outputs.write_text(tmp_path / "o.json", "{}")
    finally:
        os.umask(old)
    for p in (d, d / "teacher_to_student", tmp_path / "a"):
        assert p.stat().st_mode & 0o777 == 0o777 & ~mask, p
    for p in [*d.rglob("*.*"), *(tmp_path / "a").iterdir(), tmp_path / "o.json"]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


# --- concurrent writers and readers (two processes) ------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from xtoken_core import artifact_format as fmt
out, ready, go = map(Path, sys.argv[1:4])
with fmt.writer_lock(out):
    ready.write_text("locked")
    for _ in range(6000):
        if go.exists():
            break
        time.sleep(0.01)
    if len(sys.argv) > 4:  # a writer between its renames (new tensors, old JSON) does the second one
        import os
        os.replace(Path(sys.argv[4]) / "projection.json", out / "projection.json")
"""


def _start(tmp_path, *args) -> tuple[subprocess.Popen, Path, Path]:
    ready, go = tmp_path / "ready", tmp_path / "go"
    for p in (ready, go):
        p.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, *map(str, args[:1]), str(ready), str(go),
                             *map(str, args[1:])], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    for _ in range(6000):  # a safety limit only: the holder reports back in well under a second
        if ready.exists() or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert ready.exists(), "the lock holder did not start"
    return proc, ready, go


def test_a_second_writer_is_refused_while_another_process_writes(tmp_path):
    d = tmp_path / "d"
    _save(d, 0)
    proc, _, go = _start(tmp_path, d)
    try:
        with pytest.raises(ArtifactError, match="another writer is writing it now"):
            _save(d, 1)
        r = CliRunner().invoke(align_cli, ["build-projection", "--student", "llama3", "--teacher", "qwen3",
                                           "--out", str(d)])
        assert r.exit_code == 2 and "another writer is writing it now" in r.stderr, r.output
        assert art.read_projection(d).meta["version"] == 0
    finally:
        go.write_text("go")
        assert proc.wait(timeout=60) == 0
    _save(d, 1)  # once it is done, the next writer goes ahead
    assert art.read_projection(d).meta["version"] == 1
    assert sorted(p.name for p in d.iterdir()) == ["projection.json", "projection.safetensors"]  # lock removed


def test_reader_waits_for_a_writer_between_its_renames(tmp_path, monkeypatch):
    d, new = tmp_path / "d", tmp_path / "new"
    _save(d, 0)
    _save(new, 1)
    os.replace(new / "projection.safetensors", d / "projection.safetensors")  # the writer's first rename
    proc, _, go = _start(tmp_path, d, new)  # holds the lock; does the second rename on `go`
    pauses = []

    def pause():  # the reader found new tensors under the old description and waits: let the writer finish
        pauses.append(1)
        go.write_text("go")
        time.sleep(0.01)

    monkeypatch.setattr(fmt, "_pause", pause)
    try:
        got = art.read_projection(d)
    finally:
        go.write_text("go")
        proc.wait(timeout=60)
    assert pauses and got.meta["version"] == 1
    np.testing.assert_array_equal(got.indices, _projection(1)[0].indices)


_WRITER_LOOP = """
import sys
from pathlib import Path
import numpy as np
from xtoken_core import artifact_format as fmt
out, n, rows = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    v = i % 5
    idx = np.stack([(np.arange(rows) + v) % 12, (np.arange(rows) + v + 1) % 12], 1)
    w = np.tile(np.array([0.75, 0.25], np.float32), (rows, 1))
    side = lambda f, size: {"name": f, "fingerprint": f, "vocab_size": size, "model_vocab_size": size}
    meta = {"schema_version": 1, "kind": "projection", "direction": "student_to_teacher", "top_k": 2,
            "student": side("s", rows), "teacher": side("t", 12), "version": v}
    with fmt.atomic_dir(out, marker=fmt.PROJECTION_JSON) as tmp:
        fmt.write_projection_files(tmp, idx, w, None, meta)
"""


def test_reader_racing_a_writer_sees_the_old_or_the_new_artifact(tmp_path):
    d = tmp_path / "d"
    _save(d, 0, rows=20000)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER_LOOP, str(d), "30", "20000"], cwd=REPO)
    reads = 0
    try:
        while writer.poll() is None or reads < 3:
            got = art.read_projection(d)  # never missing, never a mismatched pair
            v = got.meta["version"]
            assert got.indices[0, 0] == v % V_T and got.indices[1, 1] == (v + 2) % V_T
            reads += 1
    finally:
        assert writer.wait(timeout=300) == 0
    assert reads >= 3


# --- tensors tied to their metadata ------------------------------------------------------------------

def test_json_records_the_tensors_hash(tmp_path):
    d = _save(tmp_path / "d", 0, reverse=True)
    for part in (d, d / "teacher_to_student"):
        meta = json.loads((part / "projection.json").read_text())
        assert meta["tensors_sha256"] == fmt.sha256_of((part / "projection.safetensors").read_bytes())
    s, t = tok("llama3"), tok("qwen3")
    meta = write_alignment_artifact(tmp_path / "a", s, t, [AlignmentCollator(s, [t]).align(["a", "b"])],
                                    shard_size=1)
    for shard in meta["shards"]:
        assert shard["tensors_sha256"] == fmt.sha256_of((tmp_path / "a" / shard["file"]).read_bytes())


def _both_readers_refuse(path, pattern):
    from xtoken_loss import load_projection

    with pytest.raises(ArtifactError, match=pattern) as a:
        art.read_projection(path)
    with pytest.raises(ArtifactError, match=pattern) as b:
        load_projection(path)
    assert str(a.value) == str(b.value)


def test_a_tensors_file_from_another_pair_or_edited_is_refused(tmp_path):
    d = _save(tmp_path / "d", 0)
    other = _save(tmp_path / "other", 3, fp="sha256:other")  # same shapes, another teacher
    shutil.copy(other / "projection.safetensors", d / "projection.safetensors")
    _both_readers_refuse(d, r"d/projection.safetensors does not belong to .*d/projection.json")
    _save(d, 0)
    data = bytearray((d / "projection.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    (d / "projection.safetensors").write_bytes(bytes(data))
    _both_readers_refuse(d, "projection.safetensors does not belong to")
    meta = json.loads((d / "projection.json").read_text())
    meta["tensors_sha256"] = "md5:123"
    (d / "projection.json").write_text(json.dumps(meta))
    _both_readers_refuse(d, "tensors_sha256 must be 'sha256:<64 hex digits>'")


def test_an_artifact_without_the_hash_loads_with_a_warning(tmp_path):
    from xtoken_loss import load_projection

    d = _save(tmp_path / "d", 2)
    meta = json.loads((d / "projection.json").read_text())
    del meta["tensors_sha256"]
    (d / "projection.json").write_text(json.dumps(meta))
    with pytest.warns(fmt.ArtifactWarning, match="records no tensors_sha256"):
        assert art.read_projection(d).meta["version"] == 2
    with pytest.warns(fmt.ArtifactWarning, match="older xtoken"):
        assert load_projection(d).num_rows == V_S
    s, t = tok("llama3"), tok("qwen3")
    a = tmp_path / "a"
    write_alignment_artifact(a, s, t, [AlignmentCollator(s, [t]).align(["a"])])
    meta = json.loads((a / "alignment.json").read_text())
    del meta["shards"][0]["tensors_sha256"]
    (a / "alignment.json").write_text(json.dumps(meta))
    with pytest.warns(fmt.ArtifactWarning, match="its shards cannot be checked"):
        assert read_alignment_artifact(a).aligned([0]).num_bytes.tolist() == [1]


@pytest.mark.parametrize("case, pattern", [
    ("row_sums_to_7", "row 0 sums to 7"),
    ("row_sums_to_half", "row 3 sums to 0.5"),
    ("teacher_id_at_vocab_size", "teacher index 12 is out of range"),
    ("float64_weights", "'weights' is float64"),
])
def test_readers_check_ranges_sums_and_dtypes(tmp_path, case, pattern):
    fwd, _ = _projection(0)
    if case == "row_sums_to_7":
        fwd.weights[0] = [6.0, 1.0]
    elif case == "row_sums_to_half":
        fwd.weights[3] = [0.25, 0.25]
    elif case == "teacher_id_at_vocab_size":
        fwd.meta["teacher"]["model_vocab_size"] = V_T + 4  # below the model width, beyond the tokenizer
        fwd.indices[0, 0] = V_T
    d = tmp_path / "d"
    if case == "float64_weights":  # a file another tool wrote, with a correct hash
        from safetensors.numpy import save

        data = save({"indices": fwd.indices, "weights": fwd.weights.astype(np.float64)})
        d.mkdir()
        (d / "projection.safetensors").write_bytes(data)
        fmt.write_meta(d / "projection.json", dict(fwd.meta, tensors_sha256=fmt.sha256_of(data)))
    else:
        art.write_projection(d, fwd)  # the writer does not validate; the readers do
    _both_readers_refuse(d, pattern)


def test_alignment_shards_are_checked(tmp_path):
    s, t = tok("llama3"), tok("qwen3")
    a, b = tmp_path / "a", tmp_path / "b"
    write_alignment_artifact(a, s, t, [AlignmentCollator(s, [t]).align(["abc"])])
    write_alignment_artifact(b, s, t, [AlignmentCollator(s, [t]).align(["xyz"])])
    shutil.copy(b / "alignment-00000.safetensors", a / "alignment-00000.safetensors")
    with pytest.raises(ArtifactError, match=r"alignment-00000.safetensors does not belong to .*a/alignment.json"):
        read_alignment_artifact(a).aligned([0])
    opened = read_alignment_artifact(b)  # opened, then rewritten underneath: an error saying so
    write_alignment_artifact(b, s, t, [AlignmentCollator(s, [t]).align(["another text"])])
    with pytest.raises(ArtifactError, match="was rewritten since it was opened"):
        opened.aligned([0])
    meta = json.loads((b / "alignment.json").read_text())
    meta["teacher"]["vocab_size"] = 10  # ids recorded against a smaller tokenizer
    (b / "alignment.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"teacher_input_ids must be in \[0, 10\)"):
        read_alignment_artifact(b).aligned([0])


# --- the CLI: output paths checked before the work ---------------------------------------------------

def _run(*args):
    return CliRunner().invoke(align_cli, [*map(str, args)])


def _error(r, pattern):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert pattern in lines[0], lines[0]


def test_cli_never_deletes_user_files_in_out(tmp_path):
    d = tmp_path / "d"
    _save(d)
    before = _user_files(d)
    _error(_run("build-projection", "--student", "llama3", "--teacher", "qwen3", "--out", d),
           "checkpoints and 1 more, which is not part of a projection artifact")
    assert _tree(d) == before
    s, t = tok("llama3"), tok("qwen3")
    a = tmp_path / "a"
    write_alignment_artifact(a, s, t, [AlignmentCollator(s, [t]).align(["hi"])])
    before = _user_files(a)
    (tmp_path / "in.txt").write_text("hello\n")
    _error(_run("align", "--student", "llama3", "--teacher", "qwen3", "--text-file", tmp_path / "in.txt",
                "--out", a), "which is not part of an alignment artifact")
    assert _tree(a) == before


def _cases(tmp_path: Path) -> dict[str, tuple[list, str]]:
    f = tmp_path / "f.jsonl"
    x = tmp_path / "x.txt"
    tokdir = tmp_path / "tokdir"
    tokdir.mkdir()
    shutil.copy(REPO / "data" / "tokenizers" / "bert-uncased" / "tokenizer.json", tokdir / "tokenizer.json")
    (tmp_path / "adir").mkdir()
    (tmp_path / "art").mkdir()
    al = ["align", "--student", "llama3", "--teacher", "qwen3"]
    return {
        "jsonl_is_json": (al + ["--jsonl", f, "--json", f], "--json " + str(f) + " is the input --jsonl"),
        "text_is_html": (al + ["--text-file", x, "--html", x], "is the input --text-file"),
        "overlap_json_is_tokenizer": (["overlap-report", "llama3", tokdir, "--json", tokdir / "tokenizer.json"],
                                      "is inside the input TOKENIZER"),
        "overlap_plot_in_fixture": (["overlap-report", "llama3", "qwen3", "--plot", IN_FIXTURE],
                                    "is inside the input TOKENIZER llama3"),
        "json_missing_dir": (al + ["--jsonl", f, "--json", tmp_path / "missing-dir" / "x.jsonl"],
                             "missing-dir does not exist (create it first)"),
        "json_is_dir": (al + ["--jsonl", f, "--json", tmp_path / "adir"], "is a directory"),
        "html_is_dir": (al + ["--jsonl", f, "--json", tmp_path / "o.jsonl", "--html", tmp_path / "adir"],
                        "--html " + str(tmp_path / "adir") + " is a directory"),
        "json_and_html_same": (al + ["--jsonl", f, "--json", tmp_path / "o", "--html", tmp_path / "o"],
                               "are the same path"),
        "json_inside_out": (al + ["--jsonl", f, "--json", tmp_path / "art" / "o.jsonl", "--out", tmp_path / "art"],
                            "are the same path or one lies inside the other"),
        "out_holds_input": (al + ["--text-file", tmp_path / "adir" / "in.txt", "--out", tmp_path / "adir"],
                            "holds the input --text-file"),
        "out_missing_parent": (["build-projection", "--student", "llama3", "--teacher", "qwen3", "--out",
                                tmp_path / "nope" / "p"], "nope does not exist (create it first)"),
        "out_is_tokenizer_dir": (["build-projection", "--student", tokdir, "--teacher", "qwen3", "--out", tokdir],
                                 "is the input --student"),
        "out_is_corpus_file": (["build-projection", "--student", "llama3", "--teacher", "qwen3", "--corpus", x,
                                "--out", x], "is the input --corpus"),
    }


CASES = ["jsonl_is_json", "text_is_html", "overlap_json_is_tokenizer", "overlap_plot_in_fixture",
         "json_missing_dir", "json_is_dir", "html_is_dir", "json_and_html_same", "json_inside_out",
         "out_holds_input", "out_missing_parent", "out_is_tokenizer_dir", "out_is_corpus_file"]


@pytest.mark.parametrize("case", CASES)
def test_cli_output_paths_are_refused_before_the_work(tmp_path, case):
    (tmp_path / "f.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "x.txt").write_text("hello\n")
    args, pattern = _cases(tmp_path)[case]
    if case == "out_holds_input":
        (tmp_path / "adir" / "in.txt").write_text("hello\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    try:
        _error(_run(*args), pattern)
    finally:
        leaked = IN_FIXTURE.exists()
        IN_FIXTURE.unlink(missing_ok=True)
    assert not leaked
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing replaced
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(  # nothing created
        ["f.jsonl", "x.txt", "tokdir", "tokenizer.json", "adir", "art"] + (["in.txt"] if case == "out_holds_input"
                                                                            else []))


def test_cli_out_dot_in_an_empty_directory(tmp_path, monkeypatch):
    (tmp_path / "in.txt").write_text("hello world\nsecond line\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    r = _run("align", "--student", "llama3", "--teacher", "qwen3", "--text-file", tmp_path / "in.txt", "--out", ".")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in work.iterdir()) == ["alignment-00000.safetensors", "alignment.json"]
    assert read_alignment_artifact(work).num_samples == 2
    r = _run("align", "--student", "llama3", "--teacher", "qwen3", "--text-file", tmp_path / "in.txt", "--out", ".",
             "--json", "o.jsonl")  # an output inside the artifact directory is refused
    _error(r, "are the same path or one lies inside the other")


def test_output_file_is_replaced_only_when_complete(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text("previous\n")
    fh = outputs.OutputFile(p)
    fh.write("half of a new")
    fh.close()  # not committed: a failed run
    assert p.read_text() == "previous\n" and sorted(x.name for x in tmp_path.iterdir()) == ["o.jsonl"]
    with pytest.raises(RuntimeError):
        with outputs.atomic_output(p) as fh:
            fh.write("new")
            raise RuntimeError("boom")
    assert p.read_text() == "previous\n" and sorted(x.name for x in tmp_path.iterdir()) == ["o.jsonl"]
    with outputs.atomic_output(p) as fh:
        fh.write("new\n")
    assert p.read_text() == "new\n"


def test_cli_inspect_warns_in_one_line_for_an_artifact_without_the_hash(tmp_path):
    d = _save(tmp_path / "d", 0)
    meta = json.loads((d / "projection.json").read_text())
    del meta["tensors_sha256"]
    (d / "projection.json").write_text(json.dumps(meta))
    r = _run("inspect", d)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "records no tensors_sha256" in lines[0]
    shutil.copy(_save(tmp_path / "other", 3) / "projection.safetensors", d / "projection.safetensors")
    meta["tensors_sha256"] = fmt.sha256_of(b"something else")
    (d / "projection.json").write_text(json.dumps(meta))
    _error(_run("inspect", d), "projection.safetensors does not belong to")
