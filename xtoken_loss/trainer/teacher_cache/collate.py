"""The cached path of the trainer's collator: teacher i's tokens and top-k outputs read from a cache.

    caches = [CachedTeacher("cache/qwen3", remap=teacher_remap), None]   # one per teacher
    collate = TrainCollate(student, teachers, max_length=..., teacher_caches=caches, ...)
    batch = collate(samples)      # + teacher_0_topk_logprobs / _topk_indices / _target_logprob / _rest_logprob

Each sample is found in the cache by its hash (`format.document_sha256`); a sample the cache does
not hold is refused. The cached teacher ids are placed on the sample's bytes without tokenizing it
again (`alignment.encode_ids`; a text whose tokens do not spell it is re-encoded for the
tokenizer's offsets, and ids that differ from that encoding are refused), the student's own
tokenization is aligned to them, and every side is cut by the collator's `truncate` with the
teacher budget `min(config budget, cached positions)` (for a same-vocab cached teacher the
student's budget). Since the teacher is causal, the kept teacher tokens are a prefix of those the
cache computed its outputs on, so position j's outputs are those of the online teacher on the same
tokens; the last kept position's `target_logprob` is 0, as `topk_outputs` gives online (its next
token is cut). Pads: index -1, values 0.

Restricted runs (`remap`): cached ids are real ids; they are mapped to the run's compact ids, and an
id the run's remap does not keep leaves its slot empty (index -1, log-prob 0) and its probability
is added to `rest_logprob` (`log(exp(rest) + sum exp(lp))`, float32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from xtoken_core.errors import ConfigError, DataFileError
from xtoken_loss.trainer.teacher_cache.format import CachedDocument, TeacherCache, document_sha256, open_cache

TOPK_KEYS = ("topk_logprobs", "topk_indices", "target_logprob", "rest_logprob")


class CachedTeacher:
    """One teacher read from the cache folder `path` (picklable: the cache is opened lazily in each
    process). `remap`: the run's `VocabRemap` of this teacher's side (a same-vocab teacher: the
    student's), or None for an unrestricted run."""

    def __init__(self, path, *, remap=None):
        self.path = Path(path)
        self.remap = remap
        self._cache: TeacherCache | None = None

    def __getstate__(self):
        return {"path": self.path, "remap": self.remap, "_cache": None}

    @property
    def cache(self) -> TeacherCache:
        if self._cache is None:
            self._cache = open_cache(self.path)
        return self._cache

    def documents(self, samples: list) -> list[CachedDocument]:
        """The cached document of each sample (found by hash); a sample not in the cache raises."""
        out = []
        for b, s in enumerate(samples):
            sha = document_sha256(s)
            where = self.cache.lookup(sha)
            if where is None:
                head = (s if isinstance(s, str) else str(s))[:40]
                raise DataFileError(f"teacher cache {self.path}: sample {b} of the batch ({head!r}..., sha256 "
                                    f"{sha[:16]}) is not among its documents (built from "
                                    f"{', '.join(str(v.get('file')) for v in self.cache.info['splits'].values())}); "
                                    "rebuild it with xtoken-train cache-teacher for this data")
            out.append(self.cache.document(*where))
        return out

    def topk_keys(self, docs: list[CachedDocument], lengths: np.ndarray, width: int) -> dict[str, torch.Tensor]:
        """`[B, width, k]` / `[B, width]` padded top-k tensors of the first `lengths[b]` positions of
        each document (module doc), ids in the run's id space."""
        k, b_count = self.cache.k, len(docs)
        lp = torch.zeros(b_count, width, k, dtype=self.cache.dtype)
        idx = torch.full((b_count, width, k), -1, dtype=torch.int64)
        target = torch.zeros(b_count, width, dtype=torch.float32)
        rest = torch.zeros(b_count, width, dtype=torch.float32)
        for b, (doc, n) in enumerate(zip(docs, lengths.tolist())):
            if n == 0:
                continue
            if n > doc.positions:
                raise DataFileError(f"teacher cache {self.path}: {n} positions asked of a document with "
                                    f"{doc.positions} cached (internal error; please report it)")
            lp[b, :n] = doc.topk_logprobs[:n]
            idx[b, :n] = doc.topk_ids[:n]
            target[b, :n - 1] = doc.target_logprob[:n - 1]
            rest[b, :n] = doc.rest_logprob[:n]
        if self.remap is not None:
            idx, lp, rest = remap_topk(idx, lp, rest, self.remap)
        return {"topk_logprobs": lp, "topk_indices": idx, "target_logprob": target, "rest_logprob": rest}


def remap_topk(idx: torch.Tensor, lp: torch.Tensor, rest: torch.Tensor, remap):
    """Real ids -> the remap's compact ids; ids it lacks fold into `rest` (module doc)."""
    table = np.asarray(remap._compact)
    real = idx.numpy()
    valid = real >= 0
    inside = valid & (real < table.size)
    compact = np.where(inside, table[np.where(inside, real, 0)], -1)
    missing = valid & (compact < 0)
    if missing.any():
        miss = torch.from_numpy(missing)
        rows = miss.any(dim=-1)
        extra = torch.logsumexp(lp.float().masked_fill(~miss, float("-inf")), -1)
        rest = torch.where(rows, torch.logaddexp(rest, extra), rest)
        lp = lp.masked_fill(miss, 0)
    return torch.from_numpy(np.where(valid, compact, real)), lp, rest


def collate_cached(student, teachers: list, config, samples: list, caches: list) -> dict[str, torch.Tensor]:
    """The CONTRACTS §2 batch of `AlignmentCollator(student, teachers, config)(samples)`, with each
    teacher i that has `caches[i]` (a `CachedTeacher`) read from its cache and given the
    `teacher_{i}_topk_*` keys (for a same-vocab teacher on the student's positions)."""
    from xtoken_align.batch.collate import align_batch, pad_id, to_tensors, truncate

    if len(caches) != len(teachers):
        raise ConfigError(f"{len(caches)} teacher caches for {len(teachers)} teachers")
    docs, given = {}, {}
    max_s, max_t = config.max_length, config.teacher_budget
    for i, (tok, c) in enumerate(zip(teachers, caches)):
        if c is None:
            continue
        if c.cache.tokenizer_fingerprint != tok.fingerprint:
            raise ConfigError(f"teachers.{i}.cache: {c.path} was built for tokenizer "
                              f"{c.cache.info['tokenizer'].get('name')!r} ({c.cache.tokenizer_fingerprint[:19]}...), "
                              f"but teacher {i}'s tokenizer is {tok.name!r} ({tok.fingerprint[:19]}...)")
        if c.remap is not None and c.remap.base_fingerprint != tok.fingerprint:
            raise ConfigError(f"teachers.{i}.cache: the remap given for {c.path} is of another tokenizer "
                              f"({c.remap.base_fingerprint[:19]}...), not teacher {i}'s {tok.name!r}")
        docs[i] = c.documents(samples)
        given.setdefault(tok.fingerprint, [d.token_ids for d in docs[i]])
        p = c.cache.positions_budget
        if tok.fingerprint == student.fingerprint:
            max_s = p if max_s is None else min(max_s, p)
        else:
            max_t = p if max_t is None else min(max_t, p)
    aligned = truncate(align_batch(samples, student, teachers, config, given_ids=given), max_s, max_t)
    batch = to_tensors(aligned, pad_id(student), [pad_id(t) for t in teachers])
    for i, c in enumerate(caches):
        if c is None:
            continue
        side = aligned.teachers[i] if aligned.teachers[i] is not None else aligned.student
        key = f"teacher_{i}_input_ids" if aligned.teachers[i] is not None else "input_ids"
        keys = c.topk_keys(docs[i], np.diff(side.offsets), int(batch[key].shape[1]))
        batch.update({f"teacher_{i}_{k}": v for k, v in keys.items()})
    return batch


def check_cache(cache: TeacherCache, cfg, i: int, *, tokenizer_fingerprint: str, data: dict | None = None) -> None:
    """Refuse (one ConfigError / DataFileError line naming the cache's cache.json or the data file)
    a cache that is not of run `cfg`'s teacher i: another model identity (`writer.teacher_identity`),
    tokenizer, or data. `data`: split -> `(path, samples, lines)` as `read_samples(...,
    with_lines=True)` gives them (each sample must equal the cache's document of the same index)."""
    from xtoken_loss.trainer.teacher_cache.format import CACHE_JSON
    from xtoken_loss.trainer.teacher_cache.writer import _first_difference, _lookup, teacher_identity

    where = f"teachers.{i}.cache: {cache.path / CACHE_JSON}"
    if cache.tokenizer_fingerprint != tokenizer_fingerprint:
        raise ConfigError(f"{where} was built for tokenizer {cache.info['tokenizer'].get('name')!r} "
                          f"({cache.tokenizer_fingerprint[:19]}...), not teacher {i}'s "
                          f"({tokenizer_fingerprint[:19]}...)")
    mine, theirs = teacher_identity(cfg, i), cache.info["teacher"].get("identity")
    diff = _first_difference(theirs, mine)
    if diff is not None:
        raise ConfigError(f"{where} was built for another teacher model ({diff}: {_lookup(theirs, diff)!r} there, "
                          f"{_lookup(mine, diff)!r} in this run); rebuild it with xtoken-train cache-teacher")
    for split, (path, samples, lines) in (data or {}).items():
        cache.check_samples(samples, path, split, lines)
