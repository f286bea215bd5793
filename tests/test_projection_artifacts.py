"""Projection artifacts (round trip, version and fingerprint checks, atomic writes) and the
`build-projection` / `inspect` commands."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xtoken_align import ArtifactError, load_tokenizer
from xtoken_align.projection import artifacts as art
from xtoken_align.projection.builder import ProjectionConfig, build_projection
from xtoken_cli.main import align_cli
from xtoken_core import artifact_format as fmt


@pytest.fixture(scope="module")
def pair():
    return load_tokenizer("mistral-v1", name="mistral-v1"), load_tokenizer("bert-uncased", name="bert-uncased")


@pytest.fixture(scope="module")
def build(pair):
    return build_projection(*pair, ProjectionConfig(both_directions=True, student_model_vocab_size=32000 + 64))


def test_round_trip(tmp_path, pair, build):
    out = tmp_path / "proj"
    build.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["projection.json", "projection.safetensors", "teacher_to_student"]
    fwd = art.read_projection(out, student=pair[0], teacher=pair[1])
    rev = art.read_projection(out, reverse=True, student=pair[0].fingerprint, teacher=pair[1].fingerprint)
    for a, b in [(fwd, build.forward), (rev, build.reverse)]:
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.row_kind, b.row_kind)
        assert a.meta == json.loads(json.dumps(b.meta))
    meta = fwd.meta
    assert meta["schema_version"] == 1 and meta["kind"] == "projection"
    assert meta["direction"] == "student_to_teacher" and meta["top_k"] == 4
    assert set(meta["student"]) == {"name", "fingerprint", "vocab_size", "model_vocab_size"}
    assert meta["student"]["model_vocab_size"] == 32064 and fwd.num_rows == 32064
    assert meta["created_with"].startswith("xtoken ")
    assert {"name", "params"} <= set(meta["method"])
    csr = fwd.to_scipy()
    assert csr.shape == (32064, pair[1].vocab_size)
    sums = np.asarray(csr.sum(axis=1)).ravel()
    np.testing.assert_allclose(sums[fwd.indices[:, 0] >= 0], 1.0, atol=1e-5)


def test_fingerprint_and_version_mismatch(tmp_path, pair, build):
    out = tmp_path / "proj"
    build.save(out)
    other = load_tokenizer("llama3", name="llama3")
    with pytest.raises(ArtifactError, match=r"teacher tokenizer differs .*bert-uncased.*llama3"):
        art.read_projection(out, student=pair[0], teacher=other)
    with pytest.raises(ArtifactError, match="student tokenizer differs"):
        art.read_projection(out, student="sha256:0000")
    meta = json.loads((out / "projection.json").read_text())
    meta["schema_version"] = 2
    (out / "projection.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="schema_version 2 is not supported"):
        art.read_projection(out)
    meta["schema_version"], meta["kind"] = 1, "alignment"
    (out / "projection.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="kind is 'alignment'"):
        art.read_projection(out)
    with pytest.raises(ArtifactError, match="projection.json is missing"):
        art.read_projection(tmp_path)


def test_shape_mismatch_is_an_error(tmp_path, build):
    out = tmp_path / "proj"
    bad = art.ProjectionArtifact(indices=build.forward.indices[:-1], weights=build.forward.weights[:-1],
                                 meta=build.forward.meta)
    art.write_projection(out, bad)
    with pytest.raises(ArtifactError, match="projection.json says"):
        art.read_projection(out)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, build, monkeypatch):
    out = tmp_path / "proj"
    calls = []

    def failing_meta(path, meta):
        calls.append(path)
        if len(calls) == 2:  # the teacher_to_student part fails after the forward part is written
            raise OSError("disk full")
        json.dump(meta, open(path, "w"))

    monkeypatch.setattr(fmt, "write_meta", failing_meta)
    with pytest.raises(OSError, match="disk full"):
        build.save(out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind
    # an existing artifact survives a failed rewrite unchanged
    monkeypatch.undo()
    build.save(out)
    before = (out / "projection.safetensors").read_bytes()
    calls.clear()
    monkeypatch.setattr(fmt, "write_meta", failing_meta)
    with pytest.raises(OSError):
        build.save(out)
    assert (out / "projection.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]
    monkeypatch.undo()
    build.save(out)  # and a successful rewrite replaces it
    assert art.read_projection(out).num_rows == build.forward.num_rows


def test_refuses_non_artifact_directory(tmp_path, build):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="notes.txt, which is not part of a projection artifact"):
        build.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- CLI -----------------------------------------------------------------------------------------

def _run(args):
    return CliRunner().invoke(align_cli, args)


def test_cli_build_and_inspect(tmp_path):
    out = tmp_path / "p"
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello world, this is a test of 123 numbers.\nAnother line.\n", encoding="utf-8")
    r = _run(["build-projection", "--student", "mistral-v1", "--teacher", "bert-uncased", "--out", str(out),
              "--top-k", "3", "--both-directions", "--corpus", str(corpus), "--teacher-vocab-size", "30600"])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}: mistral-v1 -> bert-uncased" in r.stdout and r.stdout.count("\n") == 1
    proj = art.read_projection(out)
    assert proj.top_k == 3 and proj.meta["teacher"]["model_vocab_size"] == 30600
    assert proj.meta["method"]["params"]["corpus"]["path"] == str(corpus)
    assert art.read_projection(out, reverse=True).num_rows == 30600
    r = _run(["inspect", str(out)])
    assert r.exit_code == 0, r.output
    for word in ("exact_rows", "decomposed_rows", "special_rows", "unmapped_rows", "mean_row_entropy",
                 "sample exact rows", "sample decomposed rows", "teacher_to_student"):
        assert word in r.output
    r = _run(["inspect", "--json", str(out / "teacher_to_student")])
    assert r.exit_code == 0 and json.loads(r.stdout)["meta"]["direction"] == "teacher_to_student"


@pytest.mark.parametrize("case", ["unknown_tokenizer", "top_k", "unwritable", "corpus_not_utf8", "bad_width",
                                  "inspect_missing"])
def test_cli_errors_one_line_exit_2(tmp_path, case):
    out = str(tmp_path / "p")
    base = ["build-projection", "--student", "mistral-v1", "--teacher", "bert-uncased", "--out", out]
    if case == "unknown_tokenizer":
        args = ["build-projection", "--student", "./no/such/tokenizer", "--teacher", "bert-uncased", "--out", out]
    elif case == "top_k":
        args = base + ["--top-k", "0"]
    elif case == "unwritable":
        f = tmp_path / "a_file"
        f.write_text("x")
        args = base[:-1] + [str(f / "sub")]
    elif case == "corpus_not_utf8":
        c = tmp_path / "c.txt"
        c.write_bytes(b"fine line\n\xff\xfe broken\n")
        args = base + ["--corpus", str(c)]
    elif case == "bad_width":
        args = base + ["--student-vocab-size", "100"]
    else:
        args = ["inspect", str(tmp_path / "nothing")]
    r = _run(args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert not (tmp_path / "p").exists()
    expected = {"unknown_tokenizer": "tokenizer", "top_k": "top_k", "unwritable": "a_file is not a directory",
                "corpus_not_utf8": "not UTF-8", "bad_width": "--student-vocab-size", "inspect_missing": "nothing"}
    assert expected[case] in lines[0]


def test_docs_python_snippet_runs(tmp_path, monkeypatch):
    doc = (Path(__file__).resolve().parent.parent / "docs" / "projection.md").read_text(encoding="utf-8")
    snippet = doc.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "docs/projection.md", "exec"), scope)
    assert scope["W"].num_rows == 128256 and scope["W"].to_scipy().shape == (128256, 151669)
    assert (tmp_path / "proj" / "teacher_to_student" / "projection.json").exists()


# --- one format, one reader: `read_projection` (numpy) and `load_projection` (torch) agree ----------

V_S, V_T, V_T_MODEL, K = 6, 10, 12, 2  # teacher tokenizer 10 ids, model output 12 wide (2 padding columns)


def _case_tensors():
    idx = np.array([[2, 5], [9, -1], [0, 1], [-1, -1], [3, -1], [7, 8]], np.int64)
    w = np.array([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [1.0, 0.0], [0.9, 0.1]], np.float32)
    kind = np.array([3, 1, 3, 0, 1, 3], np.uint8)
    return idx, w, kind


def _write_raw(path, idx, w, kind=None, **meta_over):
    """An artifact written by hand (safetensors + json), independent of the writers under test."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    tensors = {"indices": idx, "weights": w} if kind is None else {"indices": idx, "weights": w, "row_kind": kind}
    save_file(tensors, str(path / "projection.safetensors"))
    digest = "sha256:" + hashlib.sha256((path / "projection.safetensors").read_bytes()).hexdigest()
    meta = {"schema_version": 1, "kind": "projection", "direction": "student_to_teacher", "top_k": K,
            "tensors_sha256": digest,
            "student": {"name": "s", "fingerprint": "sha256:s", "vocab_size": V_S, "model_vocab_size": V_S},
            "teacher": {"name": "t", "fingerprint": "sha256:t", "vocab_size": V_T, "model_vocab_size": V_T_MODEL},
            "method": {"name": "test"}, "stats": {}, "created_with": "test"}
    meta.update(meta_over)
    (path / "projection.json").write_text(json.dumps(meta))
    return path


def _edit(name):
    """(indices, weights, row_kind, expected error or None) for case `name`."""
    idx, w, kind = _case_tensors()
    if name == "last_tokenizer_id":
        idx[0, 1] = V_T - 1
    elif name == "first_padding_column":
        idx[0, 1] = V_T
    elif name == "last_padding_column":
        idx[0, 1] = V_T_MODEL - 1
    elif name == "past_model_width":
        idx[0, 1] = V_T_MODEL
    elif name == "below_minus_one":
        idx[0, 1] = -2
    elif name == "empty_slot_with_weight":
        idx[0, 1] = -1
    elif name == "negative_weight":
        w[0] = [1.2, -0.2]
    elif name == "nan_weight":
        w[0, 1] = np.nan
    elif name == "missing_row":
        idx, w, kind = idx[:-1], w[:-1], kind[:-1]
    elif name == "wrong_top_k":
        idx, w = np.concatenate([idx, np.full((V_S, 1), -1)], 1), np.concatenate([w, np.zeros((V_S, 1), np.float32)], 1)
    elif name == "float64_weights":
        w = w.astype(np.float64)
    elif name == "int32_indices":
        idx = idx.astype(np.int32)
    elif name == "unknown_row_kind":
        kind[2] = len(art.ROW_KIND_NAMES)
    elif name == "short_row_kind":
        kind = kind[:-1]
    elif name == "int64_row_kind":
        kind = kind.astype(np.int64)
    elif name == "no_row_kind":
        kind = None
    return idx, w, kind


CASES = {  # name -> a piece of the expected message (None: accepted)
    "as_built": None, "last_tokenizer_id": None, "no_row_kind": None,
    "first_padding_column": "teacher index 10 is out of range", "last_padding_column": "teacher index 11",
    "past_model_width": "teacher index 12", "below_minus_one": "below -1", "empty_slot_with_weight": "empty slots",
    "negative_weight": ">= 0", "nan_weight": "finite", "missing_row": "projection.json says",
    "wrong_top_k": "projection.json says", "float64_weights": "'weights' is float64",
    "int32_indices": "'indices' is int32", "unknown_row_kind": "row_kind holds code 8",
    "short_row_kind": "row_kind must be", "int64_row_kind": "'row_kind' is int64",
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_readers_accept_and_refuse_the_same_files(tmp_path, name):
    import torch

    from xtoken_loss import load_projection

    idx, w, kind = _edit(name)
    path = _write_raw(tmp_path / name, idx, w, kind)
    expected = CASES[name]
    if expected is None:
        a = art.read_projection(path)
        p = load_projection(path)
        for got in (a.indices, p.indices.numpy()):
            np.testing.assert_array_equal(got, idx)
        for got in (a.weights, p.weights.numpy()):
            np.testing.assert_array_equal(got, w)
        if kind is None:
            assert a.row_kind is None and p.row_kind is None
        else:
            np.testing.assert_array_equal(a.row_kind, kind)
            assert p.row_kind.dtype == torch.uint8 and p.row_kind.tolist() == kind.tolist()
        assert p.teacher_width == V_T_MODEL  # logits may be the model width; ids stay below the tokenizer's
        return
    with pytest.raises(ArtifactError, match=expected) as from_numpy:
        art.read_projection(path)
    with pytest.raises(ArtifactError, match=expected) as from_torch:
        load_projection(path)
    assert str(from_numpy.value) == str(from_torch.value)  # one reader, one message


def test_reverse_part_index_rule_uses_the_student_tokenizer(tmp_path):
    idx = np.full((V_T_MODEL, 1), -1, np.int64)
    w = np.zeros((V_T_MODEL, 1), np.float32)
    idx[:V_T, 0], w[:V_T, 0] = np.arange(V_T) % V_S, 1.0
    path = _write_raw(tmp_path / "r", idx, w, direction="teacher_to_student", top_k=1)
    assert art.read_projection(path).num_rows == V_T_MODEL
    idx[0, 0] = V_S
    bad = _write_raw(tmp_path / "bad", idx, w, direction="teacher_to_student", top_k=1)
    with pytest.raises(ArtifactError, match="student index 6 is out of range"):
        art.read_projection(bad)
    from xtoken_loss import load_projection

    with pytest.raises(ArtifactError, match="direction 'teacher_to_student', expected 'student_to_teacher'"):
        load_projection(path)


def test_every_reader_ignores_unknown_json_keys(tmp_path):
    import torch

    from xtoken_align.batch.alignment_artifacts import read_alignment_artifact
    from xtoken_loss import LearnedProjection, load_projection
    from xtoken_loss.losses.hybrid import common_exact

    idx, w, kind = _case_tensors()
    extra = {"future_field": {"nested": [1, 2]}, "notes": "written by a newer xtoken"}
    path = _write_raw(tmp_path / "p", idx, w, kind, **extra)
    assert art.read_projection(path).meta["notes"] == extra["notes"]
    assert load_projection(path).num_rows == V_S
    assert torch.equal(LearnedProjection.from_artifact(path).row_kind, torch.as_tensor(kind))
    cs = common_exact(path)
    assert cs.student_ids.tolist() == [1, 4] and cs.teacher_ids.tolist() == [9, 3]  # the rows of kind 1 (exact)
    side = {"name": "s", "fingerprint": "sha256:s", "vocab_size": V_S, "model_vocab_size": V_S}
    align = tmp_path / "a"
    align.mkdir()
    (align / "alignment.json").write_text(json.dumps({
        "schema_version": 1, "kind": "alignment", "student": side, "teacher": dict(side, fingerprint="sha256:t"),
        "num_samples": 0, "shards": [], "options": {}, "stats": {}, "created_with": "test", **extra}))
    assert read_alignment_artifact(align, student="sha256:s", teacher="sha256:t").num_samples == 0


def test_fingerprint_message_names_both_tokenizers(tmp_path):
    idx, w, kind = _case_tensors()
    path = _write_raw(tmp_path / "p", idx, w, kind)
    from xtoken_loss import load_projection

    msg = r"teacher tokenizer differs \(artifact: 't', fingerprint sha256:t; given: fingerprint sha256:x\)"
    with pytest.raises(ArtifactError, match=msg):
        art.read_projection(path, teacher="sha256:x")
    with pytest.raises(ArtifactError, match=msg + ".*rebuild the projection"):
        load_projection(path, teacher_fingerprint="sha256:x")
    art.read_projection(path, student="sha256:s", teacher="sha256:t")
