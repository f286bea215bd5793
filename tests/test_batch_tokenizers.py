"""Batches know their tokenizers (issue 11, item 5): the collator records every side's tokenizer
fingerprint per row, and every projection-taking loss refuses a projection built for another pair.

Real tokenizers throughout: a llama3 student with a qwen3 teacher (the batch), and the real
llama3 -> bert-uncased projection (the wrong artifact), built once and read back from disk.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import get_tokenizer
from tests.reference_losses import heldout_texts, real_problem
from xtoken_align.batch.alignment_artifacts import read_alignment_artifact, write_alignment_artifact
from xtoken_align.batch.collate import AlignmentCollator, CollateConfig, collate
from xtoken_core import fingerprints as fpr
from xtoken_core.errors import LossInputError
from xtoken_loss import (
    GOLDLoss,
    HKLLoss,
    LearnedPKLLoss,
    LearnedProjection,
    MultiTeacherConfig,
    MultiTeacherLoss,
    PKLLoss,
    Projection,
    TeacherSpec,
    gold_loss,
    hkl_loss,
    kd_ce_loss,
    learned_pkl_loss,
    load_projection,
    pkl_loss,
)
from xtoken_loss import batch_tokenizers as bt
from xtoken_loss.losses.hybrid import common_by_threshold, common_exact
from xtoken_loss.multi_teacher.scores import projection_accuracy_counts

TEXTS = ["Hello world, the year 2024 had 366 days.", "Café crème: 3.50 euros.", ""]
KEYS = ("tokenizer_fingerprint", "teacher_0_tokenizer_fingerprint")


def toks():
    return get_tokenizer("llama3"), get_tokenizer("qwen3"), get_tokenizer("bert-uncased")


@functools.lru_cache(maxsize=None)
def bert_artifact(root: str) -> str:
    """The real llama3 -> bert-uncased projection artifact (forward pass only: faster to build)."""
    from xtoken_align.projection.builder import ProjectionConfig, build_projection

    llama, _, bert = toks()
    out = f"{root}/llama3-to-bert"
    build_projection(llama, bert, ProjectionConfig(reverse=False)).save(out)
    return out


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return bert_artifact(str(tmp_path_factory.mktemp("proj")))


@pytest.fixture(scope="module")
def bert_proj(bert_dir):
    return load_projection(bert_dir)


def qwen_batch(texts=TEXTS, teachers=None):
    llama, qwen, _ = toks()
    return collate(list(texts), llama, teachers or [qwen])


def full_width_logits(batch, seed=0):
    """Student logits as wide as llama3's output (128,256), teacher logits as wide as Qwen3's (151,936)."""
    g = torch.Generator().manual_seed(seed)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    return torch.randn(B, Ls, 128256, generator=g), torch.randn(B, Lt, 151936, generator=g)


def assert_names_both(err, *, found=("llama3", "qwen3")):
    msg = str(err.value)
    llama, qwen, bert = toks()
    assert "\n" not in msg
    assert "bert-uncased" in msg and fpr.short(bert.fingerprint) in msg  # the projection's teacher
    for name in found:  # the batch's tokenizers, by name and short fingerprint
        assert name in msg
    assert fpr.short(qwen.fingerprint) in msg and fpr.short(llama.fingerprint) in msg


# ---------------------------------------------------------------------------------------------
# the collator records the keys


def test_collator_records_every_sides_fingerprint_per_row():
    llama, qwen, _ = toks()
    batch = AlignmentCollator(llama, [qwen, llama], CollateConfig(max_length=16))(TEXTS)
    B = len(TEXTS)
    want = {"tokenizer_fingerprint": llama, "teacher_0_tokenizer_fingerprint": qwen,
            "teacher_1_tokenizer_fingerprint": llama}  # the same-vocab teacher too
    for key, info in want.items():
        t = batch[key]
        assert t.shape == (B,) and t.dtype == torch.int64, key
        assert t.tolist() == [fpr.fingerprint_id(info.fingerprint)] * B, key
    assert fpr.fingerprint_id(llama.fingerprint) != fpr.fingerprint_id(qwen.fingerprint)
    # the id is the first 8 bytes of the sha256 digest, and named by the registry
    assert fpr.id_to_short(batch["teacher_0_tokenizer_fingerprint"][0]) == fpr.short(qwen.fingerprint)
    assert fpr.describe_id(int(batch["teacher_0_tokenizer_fingerprint"][0])).startswith("qwen3 (sha256:")
    # still a dict of tensors: .to() and row slicing keep the keys valid
    moved = {k: v.to("meta") for k, v in batch.items()}
    assert moved["teacher_0_tokenizer_fingerprint"].shape == (B,)
    rows = {k: v[1:] for k, v in batch.items()}
    assert rows["tokenizer_fingerprint"].tolist() == [fpr.fingerprint_id(llama.fingerprint)] * (B - 1)


def test_alignment_artifacts_carry_the_fingerprints(tmp_path):
    llama, qwen, _ = toks()
    collator = AlignmentCollator(llama, [qwen])
    write_alignment_artifact(tmp_path / "art", llama, qwen, [collator.align(TEXTS)])
    got = read_alignment_artifact(tmp_path / "art").batch([2, 0])  # no tokenizers given: from alignment.json
    assert got["tokenizer_fingerprint"].tolist() == [fpr.fingerprint_id(llama.fingerprint)] * 2
    assert got["teacher_0_tokenizer_fingerprint"].tolist() == [fpr.fingerprint_id(qwen.fingerprint)] * 2


def _worker_batches(collator, texts):
    loader = torch.utils.data.DataLoader(texts, batch_size=2, collate_fn=collator, num_workers=1)
    return list(loader)


def test_fingerprints_survive_a_dataloader_worker(bert_proj):
    llama, qwen, _ = toks()
    texts = heldout_texts(4, 60)
    batches = _worker_batches(AlignmentCollator(llama, [qwen], CollateConfig(max_length=12)), texts)
    assert len(batches) == 2
    for b in batches:
        assert b["tokenizer_fingerprint"].tolist() == [fpr.fingerprint_id(llama.fingerprint)] * 2
        assert b["teacher_0_tokenizer_fingerprint"].tolist() == [fpr.fingerprint_id(qwen.fingerprint)] * 2
        with pytest.raises(LossInputError, match="bert-uncased") as err:
            bt.check_batch_tokenizers(bert_proj, b, 0, loss="pkl")
        assert_names_both(err)


# ---------------------------------------------------------------------------------------------
# every projection-taking loss refuses another pair


def test_every_projection_loss_refuses_a_projection_for_another_pair(bert_proj, bert_dir):
    """The issue's case: a llama3 -> bert-uncased projection, a llama3/qwen3 batch and Qwen-width
    teacher logits. The widths fit (Qwen is wider than BERT), so only the fingerprints can tell."""
    batch = qwen_batch()
    zs, zt = full_width_logits(batch)
    calls = {
        "pkl": lambda: pkl_loss(zs, zt, batch, projection=bert_proj),
        "pkl public": lambda: pkl_loss(zs, zt, batch, projection=bert_proj, public=True),
        "pkl from the directory": lambda: pkl_loss(zs, zt, batch, projection=bert_dir),
        "PKLLoss": lambda: PKLLoss(bert_proj)(zs, zt, batch),
        "hkl": lambda: hkl_loss(zs, zt, batch, projection=bert_proj),
        "hkl public": lambda: hkl_loss(zs, zt, batch, projection=bert_proj, public=True),
        "hkl common set": lambda: hkl_loss(zs, zt, batch, common=common_by_threshold(bert_proj)),
        "HKLLoss": lambda: HKLLoss(bert_proj)(zs, zt, batch),
        "gold": lambda: gold_loss(zs, zt, batch, projection=bert_proj),
        "gold common set": lambda: gold_loss(zs, zt, batch, common=common_exact(bert_dir)),
        "GOLDLoss": lambda: GOLDLoss(projection=bert_dir)(zs, zt, batch),
        "gold public": lambda: gold_loss(zs, zt, batch, projection=bert_proj, public=True),
        "learned_pkl": lambda: learned_pkl_loss(zs, zt, batch, projection=LearnedProjection(bert_proj)),
        "LearnedPKLLoss": lambda: LearnedPKLLoss(bert_dir)(zs, zt, batch),
        "kd_ce": lambda: kd_ce_loss(zs, zt, batch, kd="pkl", kd_options={"projection": bert_proj}),
        "projection_accuracy": lambda: projection_accuracy_counts(zs, zt, batch, bert_proj, teacher_index=0),
    }
    for kind in ("pkl", "hkl", "gold"):
        spec = TeacherSpec(name="teacher", loss=kind, projection=bert_proj)
        calls[f"multi-teacher {kind}"] = functools.partial(
            lambda s: MultiTeacherLoss([s], MultiTeacherConfig(projection_accuracy=False), process_group=None)(
                zs, [zt], batch), spec)
    calls["multi-teacher accuracy"] = lambda: MultiTeacherLoss(
        [TeacherSpec(name="teacher", loss="pkl", projection=bert_proj)], process_group=None)(zs, [zt], batch)
    for name, call in calls.items():
        with pytest.raises(LossInputError, match="bert-uncased") as err:
            call()
        assert_names_both(err)
        assert "teacher 0 qwen3" in str(err.value), name


def test_the_teacher_index_picks_the_compared_teacher(bert_proj):
    llama, qwen, bert = toks()
    batch = qwen_batch(teachers=[qwen, bert])
    zs, _ = full_width_logits(batch)
    zt = torch.randn(zs.shape[0], batch["teacher_1_input_ids"].shape[1], bert.vocab_size)
    with pytest.raises(LossInputError, match="teacher 0 qwen3"):
        pkl_loss(zs, zt, batch, projection=bert_proj, teacher_index=0)
    loss, _ = pkl_loss(zs, zt, batch, projection=bert_proj, teacher_index=1)  # teacher 1 is BERT: accepted
    assert torch.isfinite(loss)


def test_a_batch_mixing_rows_is_refused_and_dropped_rows_do_not_count(bert_proj):
    llama, qwen, bert = toks()
    batch = dict(qwen_batch(TEXTS[:2] + ["One more text."]))  # every row kept
    batch["teacher_0_tokenizer_fingerprint"] = batch["teacher_0_tokenizer_fingerprint"].clone()
    batch["teacher_0_tokenizer_fingerprint"][1] = fpr.fingerprint_id(bert.fingerprint)
    with pytest.raises(LossInputError, match=r"teacher 0 mixed \(") as err:
        bt.check_batch_tokenizers(bert_proj, batch, 0, loss="pkl")
    assert "in 1 row" in str(err.value) and "in 2 rows" in str(err.value) and "\n" not in str(err.value)
    # only row 1 (BERT's) is read: the check passes; rows the batch drops are never compared
    batch["sample_mask"] = torch.tensor([False, True, False])
    bt.check_batch_tokenizers(bert_proj, batch, 0, loss="pkl")
    # an in-place change is seen (the host copy is cached on the tensors' identity and version)
    batch["sample_mask"][0] = True
    with pytest.raises(LossInputError, match="mixed"):
        bt.check_batch_tokenizers(bert_proj, batch, 0, loss="pkl")


def test_the_check_reads_the_batch_once(bert_proj):
    """One host copy per batch, shared by every check on the same tensors (the loss terms of a step)."""
    batch = qwen_batch()
    first = bt._host_rows(batch, "pkl")
    again = bt._host_rows(batch, "hkl")
    assert again[1] is first[1] and again[2] is first[2]
    assert bt._host_rows(dict(batch, sample_mask=batch["sample_mask"].clone()), "pkl")[1] is not first[1]


def test_a_multi_teacher_loss_refuses_a_batch_for_other_teachers():
    """No projection needed: the configured fingerprints against the batch's (ULD, same-vocab KL)."""
    llama, qwen, bert = toks()
    batch = qwen_batch(teachers=[qwen, llama])
    zs, zt = full_width_logits(batch)
    teachers = [TeacherSpec(name="bert", loss="uld", fingerprint=bert.fingerprint),
                TeacherSpec(name="llama", loss="kl", fingerprint=llama.fingerprint)]
    mt = MultiTeacherLoss(teachers, student_fingerprint=llama.fingerprint, process_group=None)
    with pytest.raises(LossInputError, match="multi_teacher: the loss is configured for") as err:
        mt(zs, [zt, zs], batch)
    msg = str(err.value)
    assert "teacher 0 bert-uncased" in msg and "teacher 0 qwen3" in msg and "\n" not in msg
    # the right order is accepted (same-vocab teacher 1 included)
    teachers[0] = TeacherSpec(name="qwen", loss="uld", fingerprint=qwen.fingerprint)
    loss, _ = MultiTeacherLoss(teachers, student_fingerprint=llama.fingerprint, process_group=None)(
        zs, [zt, zs], batch)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# unchecked: batches without the keys, projections without fingerprints


def _restricted(meta=None):
    batch, idx, w, Vs, Vt = real_problem()
    return batch, Projection.from_tensors(idx, w, teacher_width=Vt, metadata=meta), Vs, Vt


def test_matching_pairs_pass_and_missing_fingerprints_are_not_checked(bert_proj):
    llama, qwen, bert = toks()
    meta = {"student": {"name": "llama3", "fingerprint": llama.fingerprint},
            "teacher": {"name": "qwen3", "fingerprint": qwen.fingerprint}}
    batch, proj, Vs, Vt = _restricted(meta)
    _, bare, _, _ = _restricted()
    assert proj.tokenizers.teacher_name == "qwen3" and bare.tokenizers is None
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(*batch["input_ids"].shape, Vs, generator=g, dtype=torch.float64)
    zt = torch.randn(*batch["teacher_0_input_ids"].shape, Vt, generator=g, dtype=torch.float64)
    no_keys = {k: v for k, v in batch.items() if not k.endswith("tokenizer_fingerprint")}
    def run(fn, b, p):
        return float(fn(zs, zt, b, projection=LearnedProjection(p) if fn is learned_pkl_loss else p)[0].detach())

    for fn in (pkl_loss, hkl_loss, learned_pkl_loss):
        checked = run(fn, batch, proj)  # the right pair: accepted
        assert checked == run(fn, batch, bare) == run(fn, no_keys, proj)  # unchecked: the same number
    # a batch from another pipeline (no keys) is not checked, even against another pair's projection
    big = {k: v for k, v in qwen_batch().items() if not k.endswith("tokenizer_fingerprint")}
    zs, zt = full_width_logits(qwen_batch())
    assert torch.isfinite(pkl_loss(zs, zt, big, projection=bert_proj)[0])


def test_names_fall_back_to_the_short_fingerprint():
    fp = "sha256:" + "ab" * 32
    assert fpr.describe_id(fpr.fingerprint_id(fp)) == "an unregistered tokenizer (sha256:abababababababab)"
    assert fpr.short(fp) == "sha256:abababababababab" and fpr.describe(fp, "x") == "x (sha256:abababababababab)"
    other = "not-a-sha"  # any other string still gets a stable id
    assert fpr.fingerprint_id(other) == fpr.fingerprint_id(other) != fpr.fingerprint_id(fp)


def test_projection_json_records_the_pair(bert_dir, bert_proj):
    meta = json.loads((Path(bert_dir) / "projection.json").read_text())
    pair = bert_proj.tokenizers
    assert (pair.student_name, pair.teacher_name) == ("llama3", "bert-uncased")
    assert (pair.student_fingerprint, pair.teacher_fingerprint) == (meta["student"]["fingerprint"],
                                                                    meta["teacher"]["fingerprint"])
    assert common_exact(bert_dir).tokenizers == pair == common_by_threshold(bert_proj).tokenizers
    assert common_exact(bert_proj).to("cpu").tokenizers == pair  # CommonSet.to keeps them
    assert bt.tokenizers_of(LearnedProjection(bert_proj)) == pair == bert_proj.to("cpu").tokenizers
    assert bt.tokenizers_of(LearnedProjection(bert_proj).to_projection()) == pair


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_check_on_a_cuda_batch(bert_proj):
    batch = {k: v.cuda() for k, v in qwen_batch().items()}
    with pytest.raises(LossInputError, match="teacher 0 qwen3"):
        bt.check_batch_tokenizers(bert_proj.to("cuda"), batch, 0, loss="pkl")
    bt.check_batch_tokenizers(bert_proj.to("cuda"), {k: v[:0] for k, v in batch.items()}, 0, loss="pkl")  # no rows
