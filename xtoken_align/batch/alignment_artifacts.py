"""Precomputed alignments on disk (`xtoken-align align --out DIR`), read back by a data pipeline.

A directory in the shared artifact format (`xtoken_core.artifact_format`: schema version, file
names, metadata and fingerprint checks), written by `artifact_format.atomic_dir`
(own files only, each replaced atomically with `alignment.json` last, under a writer lock):
- `alignment.json`: `schema_version` (1), `kind` ("alignment"), `student` and `teacher`
  (`{name, fingerprint, vocab_size, model_vocab_size}`), `num_samples`, `shards` (`[{file,
  num_samples}]`), `options` (how the batch was made: max_length, add_special_tokens, ...),
  `stats`, `created_with`. Each shard entry records `tensors_sha256` (`"sha256:<hex>"` of the
  file), checked when the shard is read (a swapped or edited shard is refused; an artifact without
  the keys loads with an `ArtifactWarning`); so are the offsets and the ids against the recorded
  vocab sizes.
- `alignment-00000.safetensors`, ...: per shard, flat arrays with per-sample offsets:
  `student_input_ids [N_s]` int64, `student_token_bytes [N_s]` int32, `student_offsets [n + 1]`
  int64, the same three for `teacher_`, `chunks [C, 7]` int64 (rows `byte_start, byte_end,
  s_start, s_end, t_start, t_end, correct`, token indices local to the sample), `chunk_offsets
  [n + 1]` int64, `num_bytes [n]` int64.

Token-level chunk ids and exact masks are not stored: chunks tile both token sequences in order, so
they are rebuilt on reading; the batch's tokenizer fingerprint keys come from `alignment.json`.
Reading checks the schema, the kind and, when tokenizers are given, their fingerprints
(`ArtifactError` naming what differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from xtoken_align.alignment.aligner import PairBatch, SideBatch
from xtoken_align.batch.collate import AlignedBatch, pad_id, to_tensors, truncate
from xtoken_align.tokenizer.canonical_bytes import offsets_from_counts
from xtoken_align.tokenizer.loader import TokenizerInfo
from xtoken_core.artifact_format import (
    ALIGNMENT_JSON,
    ALIGNMENT_KIND,
    SCHEMA_VERSION,
    TENSORS_SHA256,
    alignment_shard_name,
    atomic_dir,
    check_tokenizers,
    created_with,
    read_meta,
    read_tensors,
    tokenizer_meta,
    warn_unchecked,
    write_meta,
    write_tensors,
    writer_active,
)
from xtoken_core.errors import ArtifactError
from xtoken_core.fingerprints import register_name

_REQUIRED = {
    "student_input_ids": np.int64, "student_token_bytes": np.int32, "student_offsets": np.int64,
    "teacher_input_ids": np.int64, "teacher_token_bytes": np.int32, "teacher_offsets": np.int64,
    "chunks": np.int64, "chunk_offsets": np.int64, "num_bytes": np.int64,
}



def _shard_arrays(batches: list[AlignedBatch], teacher_index: int) -> dict[str, np.ndarray]:
    out: dict[str, list] = {k: [] for k in _REQUIRED}
    for batch in batches:
        s, t, p = batch.student, batch.teachers[teacher_index], batch.pairs[teacher_index]
        out["student_input_ids"].append(s.ids)
        out["student_token_bytes"].append(s.token_bytes)
        out["student_offsets"].append(np.diff(s.offsets))
        out["teacher_input_ids"].append(t.ids)
        out["teacher_token_bytes"].append(t.token_bytes)
        out["teacher_offsets"].append(np.diff(t.offsets))
        out["chunks"].append(p.chunks)
        out["chunk_offsets"].append(np.diff(p.offsets))
        out["num_bytes"].append(np.asarray(batch.num_bytes, np.int64))
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    for k in ("student_offsets", "teacher_offsets", "chunk_offsets"):
        arrays[k] = offsets_from_counts(arrays[k])
    arrays["chunks"] = arrays["chunks"].reshape(-1, 7)
    return {k: np.ascontiguousarray(v, dtype=_REQUIRED[k]) for k, v in arrays.items()}


def write_alignment_artifact(out: str | Path, student: TokenizerInfo, teacher: TokenizerInfo,
                             batches: Iterable[AlignedBatch], *, teacher_index: int = 0,
                             shard_size: int = 4096, options: dict | None = None) -> dict:
    """Write aligned batches (from `AlignmentCollator.align`) for teacher `teacher_index` as an
    alignment artifact at `out`; returns the metadata written."""
    if student.fingerprint == teacher.fingerprint:
        raise ArtifactError(f"{student.name} and {teacher.name} are the same tokenizer: a same-vocab "
                            f"teacher needs no alignment artifact")
    if shard_size < 1:
        raise ArtifactError(f"shard_size must be at least 1, got {shard_size}")
    out = Path(out)
    shards, pending, pending_n = [], [], 0
    stats = {"student_tokens": 0, "teacher_tokens": 0, "chunks": 0, "correct_chunks": 0,
             "bytes": 0, "bytes_in_exact_1to1": 0}
    with atomic_dir(out, marker=ALIGNMENT_JSON) as tmp:
        def flush():
            nonlocal pending, pending_n
            if not pending_n:
                return
            arrays = _shard_arrays(pending, teacher_index)
            name = alignment_shard_name(len(shards))
            digest = write_tensors(tmp / name, arrays, kind=ALIGNMENT_KIND)
            shards.append({"file": name, "num_samples": pending_n, TENSORS_SHA256: digest})
            pending, pending_n = [], 0

        for batch in batches:
            p = batch.pairs[teacher_index]
            if p is None:
                raise ArtifactError(f"teacher {teacher_index} of this batch is same-vocab: nothing to store")
            ch = p.chunks
            one = (ch[:, 3] - ch[:, 2] == 1) & (ch[:, 5] - ch[:, 4] == 1) & (ch[:, 6] == 1)
            stats["student_tokens"] += len(batch.student.ids)
            stats["teacher_tokens"] += len(batch.teachers[teacher_index].ids)
            stats["chunks"] += len(ch)
            stats["correct_chunks"] += int(ch[:, 6].sum())
            stats["bytes"] += int(batch.num_bytes.sum())
            stats["bytes_in_exact_1to1"] += int((ch[:, 1] - ch[:, 0])[one].sum())
            pending.append(batch)
            pending_n += len(batch.num_bytes)
            if pending_n >= shard_size:
                flush()
        flush()
        meta = {
            "schema_version": SCHEMA_VERSION,
            "kind": ALIGNMENT_KIND,
            "student": tokenizer_meta(student),
            "teacher": tokenizer_meta(teacher),
            "num_samples": sum(s["num_samples"] for s in shards),
            "shards": shards,
            "options": dict(options or {}),
            "stats": stats,
            "created_with": created_with(),
        }
        write_meta(tmp / ALIGNMENT_JSON, meta)
    return meta


@dataclass
class AlignmentArtifact:
    """A precomputed alignment directory, opened with `read_alignment_artifact`."""

    path: Path
    meta: dict
    _shards: dict[int, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._shards:
            entry = self.meta["shards"][k]
            file = self.path / entry["file"]
            try:
                arrays = read_tensors(file, _REQUIRED, sha256=entry.get(TENSORS_SHA256),
                                      described_by=self.path / ALIGNMENT_JSON)
            except ArtifactError:
                if writer_active(self.path) or _rewritten(self.path, self.meta):
                    raise ArtifactError(f"{file}: {self.path} was rewritten since it was opened (or is being "
                                        f"rewritten); open the artifact again") from None
                raise
            _check_shard(arrays, int(entry["num_samples"]), self.meta, file)
            self._shards[k] = arrays
        return self._shards[k]

    def aligned(self, indices) -> AlignedBatch:
        """Samples `indices` (global, in order) as an `AlignedBatch` with one teacher."""
        counts = np.array([s["num_samples"] for s in self.meta["shards"]], np.int64)
        starts = offsets_from_counts(counts)
        parts = {k: [] for k in ("s_ids", "s_tb", "s_n", "t_ids", "t_tb", "t_n", "ch", "c_n", "nb")}
        for g in indices:
            g = int(g)
            if not 0 <= g < self.num_samples:
                raise ArtifactError(f"{self.path}: sample {g} out of range (0..{self.num_samples - 1})")
            k = int(np.searchsorted(starts, g, side="right") - 1)
            a, i = self._shard(k), g - int(starts[k])
            so, to, co = a["student_offsets"], a["teacher_offsets"], a["chunk_offsets"]
            parts["s_ids"].append(a["student_input_ids"][so[i]:so[i + 1]])
            parts["s_tb"].append(a["student_token_bytes"][so[i]:so[i + 1]])
            parts["s_n"].append(so[i + 1] - so[i])
            parts["t_ids"].append(a["teacher_input_ids"][to[i]:to[i + 1]])
            parts["t_tb"].append(a["teacher_token_bytes"][to[i]:to[i + 1]])
            parts["t_n"].append(to[i + 1] - to[i])
            parts["ch"].append(a["chunks"][co[i]:co[i + 1]])
            parts["c_n"].append(co[i + 1] - co[i])
            parts["nb"].append(a["num_bytes"][i])
        cat = lambda key, dtype: (np.concatenate(parts[key]).astype(dtype) if parts[key]  # noqa: E731
                                  else np.zeros(0, dtype))
        student = _side(cat("s_ids", np.int64), offsets_from_counts(parts["s_n"]), cat("s_tb", np.int64))
        teacher = _side(cat("t_ids", np.int64), offsets_from_counts(parts["t_n"]), cat("t_tb", np.int64))
        chunks = np.concatenate(parts["ch"]) if parts["ch"] else np.zeros((0, 7), np.int64)
        pair = _pair(chunks, offsets_from_counts(parts["c_n"]))
        if len(pair.a_chunk) != len(student.ids) or len(pair.b_chunk) != len(teacher.ids):
            raise ArtifactError(f"{self.path}: chunks do not tile the stored tokens (corrupt shard)")
        return AlignedBatch(student, [teacher], [pair], np.asarray(parts["nb"], np.int64),
                            self.fingerprint("student"), [self.fingerprint("teacher")])

    def fingerprint(self, side: str) -> str | None:
        """The recorded fingerprint of the `"student"` or `"teacher"` tokenizer (None if absent)."""
        entry = self.meta.get(side)
        fp = entry.get("fingerprint") if isinstance(entry, dict) else None
        return None if fp is None else str(fp)

    def batch(self, indices, *, max_length: int | None = None, teacher_max_length: int | None = None,
              student: TokenizerInfo | None = None, teacher: TokenizerInfo | None = None
              ) -> dict[str, torch.Tensor]:
        """The CONTRACTS §2 batch of samples `indices` (teacher index 0), optionally truncated
        further; padding ids come from the tokenizers when given, else 0."""
        aligned = truncate(self.aligned(indices), max_length,
                           teacher_max_length if teacher_max_length is not None else max_length)
        return to_tensors(aligned, pad_id(student) if student else 0, [pad_id(teacher) if teacher else 0])


def _rewritten(path: Path, meta: dict) -> bool:
    try:
        return read_meta(path / ALIGNMENT_JSON, kind=ALIGNMENT_KIND) != meta
    except ArtifactError:
        return True


def _check_shard(a: dict[str, np.ndarray], n: int, meta: dict, file: Path) -> None:
    """The shard's arrays fit together and the ids fit the tokenizers recorded in `meta`."""
    for side, ids, offsets in (("student", "student_input_ids", "student_offsets"),
                               ("teacher", "teacher_input_ids", "teacher_offsets"), (None, "chunks", "chunk_offsets")):
        off = a[offsets]
        if off.shape != (n + 1,):
            raise ArtifactError(f"{file}: {offsets} has shape {off.shape}, expected ({n + 1},)")
        if off[0] != 0 or off[-1] != len(a[ids]) or bool((np.diff(off) < 0).any()):
            raise ArtifactError(f"{file}: {offsets} must rise from 0 to {len(a[ids])} (the length of {ids})")
        vocab = (meta.get(side) or {}).get("vocab_size") if side else None
        if isinstance(vocab, int) and len(a[ids]) and (int(a[ids].min()) < 0 or int(a[ids].max()) >= vocab):
            raise ArtifactError(f"{file}: {ids} must be in [0, {vocab}) (the {side} tokenizer's vocab size), "
                                f"found {int(a[ids].min())}..{int(a[ids].max())}")
    if a["num_bytes"].shape != (n,) or a["chunks"].ndim != 2 or a["chunks"].shape[1:] != (7,):
        raise ArtifactError(f"{file}: num_bytes must be [{n}] and chunks [C, 7], got {list(a['num_bytes'].shape)} "
                            f"and {list(a['chunks'].shape)}")


def _side(ids: np.ndarray, offsets: np.ndarray, token_bytes: np.ndarray) -> SideBatch:
    ends = np.cumsum(token_bytes)
    base = np.repeat(np.concatenate([[0], ends])[offsets[:-1]], np.diff(offsets))
    ends = ends - base
    starts = ends - token_bytes
    return SideBatch(ids, offsets, starts, ends, np.zeros(len(ids), bool), np.full(len(ids), -1, np.int64))


def _pair(chunks: np.ndarray, offsets: np.ndarray) -> PairBatch:
    local = np.arange(len(chunks)) - np.repeat(offsets[:-1], np.diff(offsets))
    a_w, b_w = chunks[:, 3] - chunks[:, 2], chunks[:, 5] - chunks[:, 4]
    exact = (a_w == 1) & (b_w == 1) & (chunks[:, 6] == 1)
    return PairBatch(chunks, offsets, np.repeat(local, a_w), np.repeat(local, b_w),
                     np.repeat(exact, a_w), np.repeat(exact, b_w))


def read_alignment_artifact(path: str | Path, *, student: TokenizerInfo | str | None = None,
                            teacher: TokenizerInfo | str | None = None) -> AlignmentArtifact:
    """Open an alignment artifact; with `student`/`teacher` (TokenizerInfo or fingerprint), check
    it was built for them."""
    path = Path(path)
    meta = read_meta(path / ALIGNMENT_JSON, kind=ALIGNMENT_KIND)
    check_tokenizers(meta, path, student=student, teacher=teacher)
    for side in ("student", "teacher"):
        entry = meta.get(side)
        if isinstance(entry, dict):
            register_name(entry.get("fingerprint"), entry.get("name"))
    if not isinstance(meta.get("shards"), list):
        raise ArtifactError(f"{path / ALIGNMENT_JSON}: 'shards' is missing")
    if any(isinstance(sh, dict) and TENSORS_SHA256 not in sh for sh in meta["shards"]):
        warn_unchecked(path / ALIGNMENT_JSON, "its shards")
    return AlignmentArtifact(path, meta)


def batch_from_artifacts(artifacts: list[AlignmentArtifact], indices, *, max_length: int | None = None,
                         teacher_max_length: int | None = None, student: TokenizerInfo | None = None,
                         teachers: list[TokenizerInfo] | None = None) -> dict[str, torch.Tensor]:
    """The multi-teacher CONTRACTS §2 batch from one artifact per teacher (teacher i = artifacts[i]).

    The artifacts must hold the same student tokens (same student tokenizer and options; write them
    untruncated and pass `max_length` here, so that the cut is shared by every teacher)."""
    if not artifacts:
        raise ArtifactError("batch_from_artifacts needs at least one alignment artifact")
    fps = {a.meta["student"]["fingerprint"] for a in artifacts}
    if len(fps) > 1:
        raise ArtifactError("the alignment artifacts were built for different student tokenizers: "
                            + ", ".join(str(a.path) for a in artifacts))
    parts = [a.aligned(indices) for a in artifacts]
    first = parts[0].student
    for a, part in zip(artifacts[1:], parts[1:]):
        if not (np.array_equal(part.student.offsets, first.offsets)
                and np.array_equal(part.student.ids, first.ids)):
            raise ArtifactError(f"{a.path} holds other student tokens than {artifacts[0].path} for these "
                                f"samples (built from other data or with another max_length?)")
    combined = AlignedBatch(first, [p.teachers[0] for p in parts], [p.pairs[0] for p in parts],
                            parts[0].num_bytes, parts[0].student_fingerprint,
                            [p.teacher_fingerprints[0] for p in parts])
    combined = truncate(combined, max_length,
                        teacher_max_length if teacher_max_length is not None else max_length)
    pads = [pad_id(t) for t in teachers] if teachers else [0] * len(artifacts)
    return to_tensors(combined, pad_id(student) if student else 0, pads)
