"""The trainer's restricted vocabulary (`xtoken_loss.trainer.vocab_remap`) on real tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xtoken_align import load_tokenizer
from xtoken_core import fingerprints
from xtoken_core.errors import ConfigError, TrainerError
from xtoken_loss import LossInputError, Projection, pkl_loss
from xtoken_loss.trainer import vocab_remap as vr
from xtoken_loss.trainer.data import TrainCollate, read_samples
from xtoken_loss.trainer.vocab_remap import VocabRemap, build_remap, remap_batch, remap_projection

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"


@pytest.fixture(scope="module")
def toks():
    return load_tokenizer("llama3"), load_tokenizer("qwen3")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small JSONL files: 12 plain texts and 4 conversations of the bundled corpus."""
    d = tmp_path_factory.mktemp("remap_data")
    plain = (CORPUS / "train.jsonl").read_text(encoding="utf-8").splitlines()[:12]
    chat = (CORPUS / "chat_train.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    (d / "plain.jsonl").write_text("\n".join(plain) + "\n", encoding="utf-8")
    (d / "chat.jsonl").write_text("\n".join(chat) + "\n", encoding="utf-8")
    return [d / "plain.jsonl", d / "chat.jsonl"]


@pytest.fixture(scope="module")
def remaps(toks, files):
    s, t = toks
    return build_remap(s, files, max_chars=600), build_remap(t, files, max_chars=600)


def _samples(files):
    return [x for f in files for x in read_samples(f, max_chars=600)]


def test_remap_covers_the_collated_data_and_round_trips(toks, files, remaps):
    s, t = toks
    rs, rt = remaps
    assert 300 < rs.size < s.vocab_size // 20 and 300 < rt.size < t.vocab_size // 20
    for info, r in ((s, rs), (t, rt)):
        assert set(info.special_roles.values()) <= set(r.used_ids.tolist())
        assert r.fingerprint.startswith(info.fingerprint + "+remap:") and len(r.fingerprint.split(":")[-1]) == 16
    samples = _samples(files)
    plain = TrainCollate(s, [t], max_length=128)
    restricted = TrainCollate(s, [t], max_length=128, student_remap=rs, teacher_remaps=[rt])
    for start in range(0, len(samples), 6):
        a = plain(samples[start:start + 6])
        b = restricted(samples[start:start + 6])
        for key, r, mask in (("input_ids", rs, "token_mask"), ("teacher_0_input_ids", rt, "teacher_0_token_mask")):
            m = a[mask]
            assert int(b[key].max()) < r.size and int(b[key].min()) >= 0
            assert torch.equal(r.to_real(b[key][m]), a[key][m])
            assert torch.equal(r.to_compact(a[key][m]), b[key][m])
        assert torch.equal(b["tokenizer_fingerprint"], torch.full_like(a["tokenizer_fingerprint"],
                                                                        fingerprints.fingerprint_id(rs.fingerprint)))
        assert int(b["teacher_0_tokenizer_fingerprint"][0]) == fingerprints.fingerprint_id(rt.fingerprint)
        assert torch.equal(a["alignment_0_student_chunk_id"], b["alignment_0_student_chunk_id"])


def test_unknown_ids_are_refused_by_name_and_negative_ids_kept(toks, remaps):
    s, _ = toks
    rs, _ = remaps
    unused = int(np.setdiff1d(np.arange(1000, 5000), rs.used_ids)[0])
    with pytest.raises(TrainerError, match=rf"llama3: token id {unused} is not among the {rs.size} ids"):
        rs.to_compact(torch.tensor([[int(rs.used_ids[3]), unused]]))
    with pytest.raises(TrainerError, match=f"token id {s.vocab_size + 7} "):
        rs.to_compact(torch.tensor([s.vocab_size + 7]))
    with pytest.raises(TrainerError, match=f"compact id {rs.size} is outside"):
        rs.to_real(torch.tensor([rs.size]))
    x = torch.tensor([[-1, int(rs.used_ids[5])], [int(rs.used_ids[-1]), -1]])
    c = rs.to_compact(x)
    assert c.tolist() == [[-1, 5], [rs.size - 1, -1]]
    assert torch.equal(rs.to_real(c), x)


def test_save_load_dict_and_the_disk_cache(toks, files, tmp_path, monkeypatch):
    s, _ = toks
    r = build_remap(s, files, cache_dir=tmp_path)
    cached = list(tmp_path.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("vocab_remap-llama3-") and cached[0].suffix == ".npz"
    loaded = VocabRemap.load(cached[0])
    assert np.array_equal(loaded.used_ids, r.used_ids) and loaded.fingerprint == r.fingerprint
    back = VocabRemap.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.fingerprint == r.fingerprint and back.vocab_size == s.vocab_size

    def refuse(*args, **kw):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(vr, "collect_ids", refuse)
    assert build_remap(s, files, cache_dir=tmp_path).fingerprint == r.fingerprint  # a cache hit
    with pytest.raises(AssertionError, match="cache was not used"):  # other options: another key
        build_remap(s, files, cache_dir=tmp_path, add_special_tokens=False)
    monkeypatch.undo()
    other = tmp_path / "other.jsonl"
    other.write_text(files[0].read_text(encoding="utf-8") + json.dumps({"text": "zebra quagga okapi"}) + "\n",
                     encoding="utf-8")
    r2 = build_remap(s, [other, files[1]], cache_dir=tmp_path)
    assert r2.fingerprint != r.fingerprint and len(list(tmp_path.glob("*.npz"))) == 2
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary file
    with pytest.raises(TrainerError, match="sorted and unique"):
        VocabRemap(np.array([3, 2]), 10, "x")


def test_remap_batch_same_vocab_teacher_shares_the_student_remap(toks, files, remaps):
    s, t = toks
    rs, rt = remaps
    batch = TrainCollate(s, [s, t], max_length=64)(_samples(files)[:3])
    out = remap_batch(batch, rs, [None, rt])
    fid = fingerprints.fingerprint_id(rs.fingerprint)
    assert int(out["teacher_0_tokenizer_fingerprint"][0]) == fid == int(out["tokenizer_fingerprint"][0])
    assert "teacher_0_input_ids" not in out and int(out["teacher_1_input_ids"].max()) < rt.size
    with pytest.raises(ConfigError, match="teacher 0 shares the student's tokenizer"):
        remap_batch(batch, rs, [rt, rt])


def _real_projection(s, t):
    from xtoken_align.projection.builder import build_projection

    f = build_projection(s, t).forward
    return Projection.from_tensors(torch.from_numpy(f.indices), torch.from_numpy(f.weights),
                                   teacher_width=t.vocab_size, metadata=f.meta, row_kind=torch.from_numpy(f.row_kind))


@pytest.fixture(scope="module")
def projections(toks, remaps):
    s, t = toks
    full = _real_projection(s, t)
    return full, remap_projection(full, *remaps)


def test_remap_projection_rows_columns_and_metadata(toks, remaps, projections):
    s, t = toks
    rs, rt = remaps
    full, small = projections
    assert small.num_rows == rs.size and small.teacher_width == rt.size
    assert small.metadata["student"]["fingerprint"] == rs.fingerprint
    assert small.metadata["teacher"]["fingerprint"] == rt.fingerprint
    assert small.metadata["student"]["vocab_size"] == rs.size == small.metadata["student"]["model_vocab_size"]
    assert full.metadata["student"]["fingerprint"] == s.fingerprint  # the original is left alone
    sums = small.weights.double().sum(1)
    assert bool(((sums - 1).abs() < 1e-5).logical_or(sums == 0).all())
    assert torch.equal(small.row_kind, full.row_kind[torch.from_numpy(rs.used_ids.copy())])
    # expected: the used rows' entries whose teacher id is used, columns found by a sorted search
    rows_idx = full.indices[torch.from_numpy(rs.used_ids.copy())].numpy()
    rows_w = full.weights[torch.from_numpy(rs.used_ids.copy())].double().numpy()
    pos = np.searchsorted(rt.used_ids, rows_idx)
    hit = (rows_idx >= 0) & (pos < rt.size) & (rt.used_ids[np.minimum(pos, rt.size - 1)] == rows_idx)
    kept = np.zeros((rs.size, rt.size))
    r, k = np.nonzero(hit)
    np.add.at(kept, (r, pos[r, k]), rows_w[r, k])
    expected = kept / np.where(kept.sum(1, keepdims=True) > 0, kept.sum(1, keepdims=True), 1)
    torch.testing.assert_close(small.dense(dtype=torch.float64), torch.from_numpy(expected), atol=1e-6, rtol=1e-5)
    changed = torch.from_numpy(np.abs(rows_w.sum(1) - kept.sum(1)) > 1e-6)
    assert 0 < int(changed.sum()) < rs.size  # some rows lost columns, most kept all of theirs


def test_remapped_pkl_equals_full_width_pkl_and_the_pair_check(toks, files, remaps, projections):
    """P-KL on compact logits with the remapped W equals P-KL on full-width logits that give unused ids
    (numerically) zero probability, with the remapped W expanded back to real ids."""
    s, t = toks
    rs, rt = remaps
    full, small = projections
    samples = [x for x in _samples(files) if isinstance(x, str)][:2]
    batch = TrainCollate(s, [t], max_length=48)(samples)
    small_batch = remap_batch(batch, rs, [rt])
    g = torch.Generator().manual_seed(0)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs_c = torch.randn(B, Ls, rs.size, generator=g, dtype=torch.float64) * 2
    zt_c = torch.randn(B, Lt, rt.size, generator=g, dtype=torch.float64) * 2
    zs = torch.full((B, Ls, s.vocab_size), -1e4, dtype=torch.float64)
    zs[..., torch.from_numpy(rs.used_ids.copy())] = zs_c
    zt = torch.full((B, Lt, t.vocab_size), -1e4, dtype=torch.float64)
    zt[..., torch.from_numpy(rt.used_ids.copy())] = zt_c
    # the remapped W in real ids (rows at the used student ids, columns back to real teacher ids)
    idx = torch.full((s.vocab_size, small.top_k), -1, dtype=torch.int64)
    w = torch.zeros(s.vocab_size, small.top_k, dtype=small.weights.dtype)
    rows = torch.from_numpy(rs.used_ids.copy())
    idx[rows] = torch.where(small.indices >= 0, rt.to_real(small.indices), -1)
    w[rows] = small.weights
    expanded = Projection.from_tensors(idx, w, teacher_width=t.vocab_size, metadata=full.metadata)
    for public in (False, True):
        a, _ = pkl_loss(zs_c, zt_c, small_batch, projection=small, public=public, top_k_columns=32)
        b, _ = pkl_loss(zs, zt, batch, projection=expanded, public=public, top_k_columns=32)
        assert torch.isfinite(a) and float(a) != 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with pytest.raises(LossInputError, match=r"remap"):  # a remapped batch, the full projection
        pkl_loss(zs_c, zt_c, small_batch, projection=full)
    with pytest.raises(LossInputError, match=r"remap"):  # the full batch, a remapped projection
        pkl_loss(zs, zt, batch, projection=small)
