"""Run-time projection: artifact loading and checks, widths, column restriction and selection."""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference_losses import (
    dense_projection,
    is_close,
    random_logits,
    random_projection,
    real_tokenizers,
    reference_common_by_threshold,
    reference_hybrid,
    reference_pkl,
    synthetic_batch,
)
from xtoken_core.artifact_format import ROW_DECOMPOSED, ROW_EXACT, ROW_UNMAPPED
from xtoken_core.errors import ArtifactError
from xtoken_loss import LossInputError, LossOptionError, Projection, ProjectionArtifactError, load_projection
from xtoken_loss.projection import project_probs, reduce_column_scores, restrict_projection, top_columns


def _write(dir_, idx, w, row_kind=None, **meta_over):
    from safetensors.torch import save_file

    dir_.mkdir(parents=True, exist_ok=True)
    tensors = {"indices": idx, "weights": w}
    if row_kind is not None:
        tensors["row_kind"] = row_kind
    save_file(tensors, str(dir_ / "projection.safetensors"))
    meta = {
        "schema_version": 1, "kind": "projection", "direction": "student_to_teacher",
        "student": {"name": "s", "fingerprint": "sha256:aa", "vocab_size": idx.shape[0],
                    "model_vocab_size": idx.shape[0]},
        "teacher": {"name": "t", "fingerprint": "sha256:bb", "vocab_size": 20, "model_vocab_size": 24},
        "top_k": idx.shape[1], "method": {"name": "test"}, "stats": {}, "created_with": "test",
    }
    meta.update(meta_over)
    (dir_ / "projection.json").write_text(json.dumps(meta))
    return dir_


def test_loads_the_real_builders_artifact_and_checks_fingerprints(tmp_path):
    from xtoken_align.projection.artifacts import write_projection

    s_tok, t_tok, forward = real_tokenizers()
    out = write_projection(tmp_path / "proj", forward)
    proj = load_projection(out, student_fingerprint=s_tok.fingerprint, teacher_fingerprint=t_tok.fingerprint)
    assert torch.equal(proj.indices, torch.as_tensor(forward.indices))
    assert torch.equal(proj.weights, torch.as_tensor(forward.weights))
    assert proj.num_rows == 128256 and proj.top_k == forward.top_k
    assert proj.teacher_width >= t_tok.vocab_size > proj.max_index
    assert load_projection(out / "projection.json").num_rows == proj.num_rows  # a file inside works too
    with pytest.raises(ProjectionArtifactError, match="rebuild the projection"):
        load_projection(out, student_fingerprint=t_tok.fingerprint)
    with pytest.raises(ProjectionArtifactError, match="teacher tokenizer"):
        load_projection(out, teacher_fingerprint="sha256:0000")
    # the real model output widths: Qwen3's 151,936 logits are wider than its tokenizer
    proj.check_widths(128256, 151936)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schema_version": 2}, "schema_version 2"),
        ({"kind": "alignment"}, "kind 'alignment'"),
        ({"direction": "teacher_to_student"}, "direction 'teacher_to_student'"),
        ({"student": None}, "`student` is missing"),
    ],
)
def test_artifact_metadata_errors(tmp_path, change, message):
    idx, w = random_projection(0, 10, 20)
    meta = {k: v for k, v in change.items() if v is not None}
    path = _write(tmp_path / "p", idx, w, **meta)
    if change.get("student", 1) is None:
        m = json.loads((path / "projection.json").read_text())
        del m["student"]
        (path / "projection.json").write_text(json.dumps(m))
    with pytest.raises(ProjectionArtifactError, match=message):
        load_projection(path)


def test_artifact_file_errors(tmp_path):
    with pytest.raises(ProjectionArtifactError, match="not a projection artifact"):
        load_projection(tmp_path)
    idx, w = random_projection(0, 10, 20)
    path = _write(tmp_path / "p", idx, w)
    (path / "projection.json").write_text("{not json")
    with pytest.raises(ProjectionArtifactError, match="JSON"):
        load_projection(path)
    path = _write(tmp_path / "q", idx, w)
    (path / "projection.safetensors").write_bytes(b"garbage")
    with pytest.raises(ProjectionArtifactError, match="cannot read"):
        load_projection(path)
    bad = idx.clone()
    bad[0, 0] = 30  # beyond the recorded teacher model vocab size (24)
    with pytest.raises(ProjectionArtifactError, match="teacher index 30"):
        load_projection(_write(tmp_path / "r", bad, w))
    with pytest.raises(ProjectionArtifactError, match="empty slots"):
        Projection.from_tensors(torch.tensor([[-1]]), torch.tensor([[0.5]]))
    with pytest.raises(ProjectionArtifactError, match=">= 0"):
        Projection.from_tensors(torch.tensor([[1]]), torch.tensor([[-0.5]]))
    ok = load_projection(_write(tmp_path / "s", idx, w))
    assert ok.teacher_width == 24 and ok.metadata["teacher"]["name"] == "t"


def test_widths():
    idx, w = random_projection(1, 10, 20, empty_rows=0)
    proj = Projection.from_tensors(idx, w, teacher_width=20)
    proj.check_widths(10, 20)
    proj.check_widths(16, 25)  # wider model outputs: extra student rows are empty
    with pytest.raises(LossInputError, match="student logits have 9 columns"):
        proj.check_widths(9, 20)
    with pytest.raises(LossInputError, match="teacher logits have"):
        proj.check_widths(10, int(idx.max()))
    # rows past the last mapped one may be cut
    idx2, w2 = torch.cat([idx, torch.full((3, idx.shape[1]), -1)]), torch.cat([w, torch.zeros(3, w.shape[1])])
    Projection.from_tensors(idx2, w2).check_widths(10, 20)


def test_restriction_and_projection_match_dense_w():
    idx, w = random_projection(2, 30, 40, top_k=4)
    proj = Projection.from_tensors(idx.to(torch.int64), w.double())
    W = dense_projection(idx, w, 33, 44)  # 3 extra student rows, 4 extra teacher columns
    cols = torch.tensor([0, 3, 7, 8, 21, 36])
    restr = restrict_projection(proj, cols, 33, 44, torch.float64)
    p = torch.softmax(torch.randn(5, 33, dtype=torch.float64), dim=1)
    a, rest, pe = project_probs(p, restr)
    q = p @ W
    reach = W.sum(0) > 0
    in_s = torch.zeros(44, dtype=torch.bool)
    in_s[cols] = True
    torch.testing.assert_close(a, q[:, cols])
    torch.testing.assert_close(rest, q[:, reach & ~in_s].sum(1))
    assert torch.equal(proj.reachable_columns(44), reach)
    torch.testing.assert_close(proj.dense(33, 44), W)


def test_top_columns_break_ties_towards_lower_ids_and_skip_minus_inf():
    s = torch.tensor([1.0, 3.0, float("-inf"), 3.0, 2.0, 3.0, float("-inf")])
    assert top_columns(s, 2).tolist() == [1, 3]
    assert top_columns(s, 4).tolist() == [1, 3, 4, 5]
    assert top_columns(s, 100).tolist() == [0, 1, 3, 4, 5]
    assert top_columns(s, None).tolist() == [0, 1, 3, 4, 5]
    assert torch.equal(reduce_column_scores(s.clone()), s)  # no group: unchanged


# --- a loaded Projection carries row_kind; every loss takes a Projection or a directory -------------

EXACT_ROWS, EXACT_TEACHER = [0, 3, 5, 8, 12, 20], [4, 9, 1, 30, 22, 41]


class _FsPath:
    """An `os.PathLike` that is neither `str` nor `pathlib.Path`."""

    def __init__(self, path):
        self._path = str(path)

    def __fspath__(self):
        return self._path


def _gold_artifact(dir_):
    """A 40 x 50 artifact: a random W whose rows EXACT_ROWS are one-hot on EXACT_TEACHER (row kind exact)."""
    idx, w = random_projection(7, 40, 50)
    kind = torch.full((40,), ROW_DECOMPOSED, dtype=torch.uint8)
    kind[(idx < 0).all(dim=1)] = ROW_UNMAPPED
    for r, t in zip(EXACT_ROWS, EXACT_TEACHER):
        idx[r], w[r], kind[r] = torch.tensor([t, -1, -1, -1]), torch.tensor([1.0, 0, 0, 0]), ROW_EXACT
    side = {"name": "t", "fingerprint": "sha256:bb", "vocab_size": 50, "model_vocab_size": 50}
    return _write(dir_, idx, w, kind, teacher=side), idx, w, kind


def test_projection_round_trip_keeps_row_kind(tmp_path):
    from xtoken_loss import LearnedProjection
    from xtoken_loss.losses.hybrid import common_exact

    path, idx, w, kind = _gold_artifact(tmp_path / "p")
    proj = load_projection(path)
    assert proj.row_kind.dtype == torch.uint8 and proj.row_kind.tolist() == kind.tolist()
    assert proj.to("cpu").row_kind.tolist() == kind.tolist()
    assert proj.to("meta").row_kind.device.type == "meta"  # moves with the other tensors
    again = Projection.from_tensors(proj.indices, proj.weights, teacher_width=50, row_kind=proj.row_kind)
    assert again.row_kind.tolist() == kind.tolist()
    with pytest.raises(ArtifactError, match="row_kind holds code 9"):
        Projection.from_tensors(idx, w, row_kind=torch.full((40,), 9, dtype=torch.uint8))
    with pytest.raises(ArtifactError, match="row_kind must be"):
        Projection.from_tensors(idx, w, row_kind=kind[:-1])
    lp = LearnedProjection(proj)
    assert lp.row_kind.tolist() == kind.tolist() and lp.to_projection().row_kind.tolist() == kind.tolist()
    back = load_projection(lp.save(tmp_path / "learned"))
    assert back.row_kind.tolist() == kind.tolist()
    cs = common_exact(back)
    assert cs.student_ids.tolist() == EXACT_ROWS and cs.teacher_ids.tolist() == EXACT_TEACHER


def test_gold_needs_row_kind(tmp_path):
    from xtoken_loss.losses.hybrid import common_exact

    idx, w = random_projection(0, 10, 20)
    with pytest.raises(LossOptionError, match="has no `row_kind`"):
        common_exact(Projection.from_tensors(idx, w))
    with pytest.raises(ArtifactError, match="has no `row_kind`"):
        common_exact(_write(tmp_path / "p", idx, w))


@pytest.mark.parametrize("kind", ["pkl", "hkl", "gold", "learned"])
def test_losses_take_a_loaded_projection_or_a_directory(tmp_path, kind):
    from xtoken_loss import GOLDLoss, HKLLoss, LearnedPKLLoss, PKLLoss, gold_loss, hkl_loss, pkl_loss

    path, idx, w, _ = _gold_artifact(tmp_path / "p")
    batch = synthetic_batch(5)
    Ls, Lt = batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]
    zs, zt = random_logits(6, (3, Ls, 40)), random_logits(7, (3, Lt, 50))
    W = dense_projection(idx, w, 40, 50)
    tol = 1e-6
    if kind == "pkl":
        ref = reference_pkl(zs, zt, batch, W)[0]
        fn, module = (lambda p: pkl_loss(zs, zt, batch, projection=p)), PKLLoss
    elif kind == "hkl":
        ref = reference_hybrid(zs, zt, batch, reference_common_by_threshold(W, 0.6))[0]
        fn, module = (lambda p: hkl_loss(zs, zt, batch, projection=p)), HKLLoss
    elif kind == "gold":
        ref = reference_hybrid(zs, zt, batch, (EXACT_ROWS, EXACT_TEACHER))[0]
        fn, module = (lambda p: gold_loss(zs, zt, batch, projection=p)), GOLDLoss
    else:
        ref, tol = reference_pkl(zs, zt, batch, W)[0], 1e-5  # the learned W starts at the float32 artifact
        fn, module = (lambda p: LearnedPKLLoss(p)(zs, zt, batch)), LearnedPKLLoss
    for source in (load_projection(path), str(path), path, _FsPath(path)):
        assert is_close(fn(source)[0].detach(), ref, tol), (kind, type(source).__name__)
        assert is_close(module(source)(zs, zt, batch)[0].detach(), ref, tol), (kind, type(source).__name__)


def test_multi_teacher_gold_from_a_loaded_projection(tmp_path):
    from xtoken_loss import MultiTeacherLoss, TeacherSpec, gold_loss

    path, _, _, _ = _gold_artifact(tmp_path / "p")
    batch = synthetic_batch(6)
    Ls, Lt = batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]
    zs, zt = random_logits(8, (3, Ls, 40)), random_logits(9, (3, Lt, 50))
    ref = reference_hybrid(zs, zt, batch, (EXACT_ROWS, EXACT_TEACHER))[0]
    for source in (load_projection(path), path):
        mt = MultiTeacherLoss([TeacherSpec(name="t", loss="gold", projection=source)], process_group=None)
        assert is_close(mt(zs, [zt], batch)[0], ref), type(source).__name__
    assert is_close(gold_loss(zs, zt, batch, projection=path)[0], ref)
