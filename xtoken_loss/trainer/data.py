"""The trainer's data: samples from JSONL files, a deterministic global batch stream, each rank's
microbatches, collated in DataLoader workers.

Determinism (docs/trainer.md): the global sample stream depends only on `seed`, the samples'
lengths and `data.batch_size` (B), never on the world size; step s's global batch is
`plan.global_batch(s)`, rank r of W takes the contiguous slice `[r*B/W, (r+1)*B/W)` and cuts it in
microbatches of `data.microbatch_size`. The sampler's whole state is the step, so resuming at step
s yields exactly what an uninterrupted run yields from s on.

API (plain arguments; the trainer's loop calls these):
- `read_samples(path, *, max_chars=None) -> list[str | list[dict]]`: JSONL lines with a `text`
  string (a plain text) or a `messages` list (a conversation); long texts split at line
  boundaries into pieces of at most `max_chars` characters (nothing dropped).
- `sample_lengths(samples) -> np.ndarray [N] int64`: characters per sample (the bucketing key).
- `GlobalBatchPlan(lengths, batch_size, seed, bucket_batches=16)`: `global_batch(step)`,
  `epoch_of(step)`, `steps_per_epoch`.
- `rank_microbatches(indices, rank, world_size, microbatch_size) -> list[np.ndarray]`.
- `TrainCollate(student, teachers, *, max_length, ...)`: picklable `collate(samples) -> batch`
  (tokenize, align, truncate, pad, `target_mask`, vocabulary remap).
- `StepBatches(samples, plan, collate_fn, *, rank, world_size, microbatch_size)`: map-style
  dataset, item `step` = this rank's collated microbatches for that step.
- `make_train_loader(samples, plan, collate_fn, *, start_step, rank, world_size, microbatch_size,
  num_workers, end_step=None) -> iterator` of `list[dict[str, Tensor]]`, one item per step from
  `start_step`.
- `eval_batches(samples, collate_fn, batch_size) -> iterator` of collated batches in file order.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xtoken_core.errors import AlignmentError, ConfigError, DataFileError

_HINT = ' (a line is {"text": "..."} or {"messages": [{"role": ..., "content": ...}, ...]})'


# --------------------------------------------------------------------------------------------------
# samples


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most `max_chars` characters, cut after a line end where possible (a
    longer line is cut after its last space within the limit, else at the limit); the pieces
    concatenate to `text`."""
    if len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # one line over the limit: cut it on its own
            if current:
                pieces.append(current)
                current = ""
            cut = line.rfind(" ", 0, max_chars) + 1 or max_chars
            pieces.append(line[:cut])
            line = line[cut:]
        if current and len(current) + len(line) > max_chars:
            pieces.append(current)
            current = ""
        current += line
    if current:
        pieces.append(current)
    return pieces


def read_samples(path, *, max_chars: int | None = None, with_lines: bool = False):
    """The samples of one JSONL file, in file order: a `str` per `{"text": ...}` line (split by
    `split_text` when longer than `max_chars`), a message list per `{"messages": [...]}` line
    (kept whole). A line that is not such an object raises `DataFileError` naming `file: line n`.
    `with_lines`: returns `(samples, lines)`, `lines[k]` the 1-based file line sample k came from."""
    from xtoken_align.alignment.chat import check_conversation
    from xtoken_align.textio import check_text, iter_jsonl

    if max_chars is not None and max_chars < 1:
        raise ConfigError(f"max_chars={max_chars}: must be at least 1")
    path = Path(path)
    out: list = []
    lines: list[int] = []
    for n, record in iter_jsonl(path, "data file", _HINT):
        where = f"{path}: line {n}"
        if isinstance(record.get("messages"), list):
            try:
                check_conversation(record["messages"], where)
            except AlignmentError as exc:
                raise DataFileError(str(exc)) from None
            check_text(record["messages"], where)
            out.append(record["messages"])
        elif isinstance(record.get("text"), str):
            check_text(record["text"], where)
            text = record["text"]
            out.extend([text] if max_chars is None else split_text(text, max_chars))
        else:
            found = {k: type(v).__name__ for k, v in list(record.items())[:6]}
            raise DataFileError(f"{where}: expected a string 'text' or a list 'messages', found {found}{_HINT}")
        lines.extend([n] * (len(out) - len(lines)))
    return (out, lines) if with_lines else out


def sample_lengths(samples: Sequence) -> np.ndarray:
    """`[N]` int64 characters of each sample (a conversation: its contents), a cheap proxy for its
    token count, used to bucket batches by length."""
    return np.array([len(s) if isinstance(s, str) else sum(len(m.get("content") or "") for m in s)
                     for s in samples], np.int64)


# --------------------------------------------------------------------------------------------------
# the global batch stream


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) % (1 << 63) for w in words])


class GlobalBatchPlan:
    """An infinite, deterministic stream of global batches of sample indices.

    Epoch e: a permutation of the samples from `(seed, e)`; its first `steps_per_epoch * batch_size`
    samples (the rest, fewer than a batch, wait for another epoch's shuffle) are cut into windows of
    `bucket_batches * batch_size`; each window is sorted by length (stable) and cut into batches,
    whose order within the window is shuffled from `(seed, e, window)`. Sorting within windows
    puts samples of similar length together (less padding) while the stream stays random. Depends
    only on `lengths`, `batch_size` and `seed`; `global_batch(step)` costs one permutation of the
    samples (the last epoch's is cached).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, bucket_batches: int = 16):
        self.lengths = np.asarray(lengths, np.int64).reshape(-1)
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: must be at least 1")
        if bucket_batches < 1:
            raise ConfigError(f"bucket_batches={bucket_batches}: must be at least 1")
        if len(self.lengths) < batch_size:
            raise ConfigError(f"data.batch_size={batch_size} is larger than the {len(self.lengths)} training "
                              "samples; lower it or add data")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.bucket_batches = int(bucket_batches)
        self.steps_per_epoch = len(self.lengths) // self.batch_size
        self._epoch: tuple[int, np.ndarray] | None = None

    def epoch_of(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """`[steps_per_epoch, batch_size]` sample indices of the epoch's batches, in stream order."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        b, per_window = self.batch_size, self.bucket_batches
        perm = _rng(self.seed, epoch).permutation(len(self.lengths))[:self.steps_per_epoch * b]
        batches = []
        for w, start in enumerate(range(0, len(perm), per_window * b)):
            window = perm[start:start + per_window * b]
            window = window[np.argsort(self.lengths[window], kind="stable")].reshape(-1, b)
            batches.append(window[_rng(self.seed, epoch, 1, w).permutation(len(window))])
        order = np.concatenate(batches, axis=0)
        self._epoch = (epoch, order)
        return order

    def global_batch(self, step: int) -> np.ndarray:
        """`[batch_size]` int64 sample indices of optimizer step `step` (0-based)."""
        if step < 0:
            raise ConfigError(f"step {step}: steps count from 0")
        return self._epoch_order(self.epoch_of(step))[int(step) % self.steps_per_epoch].copy()


def rank_microbatches(indices: np.ndarray, rank: int, world_size: int, microbatch_size: int
                      ) -> list[np.ndarray]:
    """Rank `rank`'s contiguous slice of a global batch, cut into microbatches of `microbatch_size`
    (`[microbatch_size]` index arrays, `len(indices) / (world_size * microbatch_size)` of them)."""
    b = len(indices)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} of world size {world_size}: need 0 <= rank < world size")
    if b % world_size:
        raise ConfigError(f"data.batch_size={b} is not divisible by the world size {world_size}: each rank "
                          "takes an equal slice of the global batch")
    per_rank = b // world_size
    if microbatch_size < 1 or per_rank % microbatch_size:
        raise ConfigError(f"data.microbatch_size={microbatch_size} does not divide the {per_rank} sequences each "
                          f"rank gets per step (data.batch_size={b} / world size {world_size})")
    mine = np.asarray(indices)[rank * per_rank:(rank + 1) * per_rank]
    return [mine[k:k + microbatch_size] for k in range(0, per_rank, microbatch_size)]


# --------------------------------------------------------------------------------------------------
# collation


class TrainCollate:
    """Picklable `collate(samples) -> dict[str, Tensor]` for DataLoader workers: the CONTRACTS §2
    batch of `AlignmentCollator(student, teachers, CollateConfig(max_length, teacher_max_length,
    train_on, add_special_tokens))`, then `remap_batch(batch, student_remap, teacher_remaps)` when
    any side is restricted. The collator is built on first use in each process. `teacher_caches`:
    one `teacher_cache.collate.CachedTeacher` or None per teacher; a cached teacher's tokens and
    top-k outputs come from its cache (`teacher_cache.collate.collate_cached`)."""

    def __init__(self, student, teachers, *, max_length: int | None, teacher_max_length: int | None = None,
                 train_on: str = "all", add_special_tokens: bool = True, student_remap=None,
                 teacher_remaps: list | None = None, teacher_caches: list | None = None):
        from xtoken_align.batch.collate import CollateConfig

        self.student = student
        self.teachers = list(teachers)
        self.config = CollateConfig(max_length=max_length, teacher_max_length=teacher_max_length,
                                    train_on=train_on, add_special_tokens=add_special_tokens)
        self.student_remap = student_remap
        self.teacher_remaps = list(teacher_remaps) if teacher_remaps is not None else [None] * len(self.teachers)
        if len(self.teacher_remaps) != len(self.teachers):
            raise ConfigError(f"{len(self.teacher_remaps)} teacher remaps for {len(self.teachers)} teachers")
        self.teacher_caches = list(teacher_caches) if teacher_caches is not None else [None] * len(self.teachers)
        if len(self.teacher_caches) != len(self.teachers):
            raise ConfigError(f"{len(self.teacher_caches)} teacher caches for {len(self.teachers)} teachers")
        self._collator = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_collator"] = None
        return state

    def __call__(self, samples: list) -> dict[str, torch.Tensor]:
        if self._collator is None:
            from xtoken_align.batch.collate import AlignmentCollator

            self._collator = AlignmentCollator(self.student, self.teachers, self.config)
        if any(c is not None for c in self.teacher_caches):
            from xtoken_loss.trainer.teacher_cache.collate import collate_cached

            batch = collate_cached(self.student, self.teachers, self.config, list(samples), self.teacher_caches)
        else:
            batch = self._collator(list(samples))
        if self.student_remap is not None or any(r is not None for r in self.teacher_remaps):
            from xtoken_loss.trainer.vocab_remap import remap_batch

            batch = remap_batch(batch, self.student_remap, self.teacher_remaps)
        return batch


# --------------------------------------------------------------------------------------------------
# loaders


class StepBatches(Dataset):
    """Map-style dataset over steps: item `step` is the list of this rank's collated microbatches of
    global batch `plan.global_batch(step)` (collation runs in the DataLoader's workers)."""

    def __init__(self, samples: Sequence, plan: GlobalBatchPlan, collate_fn: Callable, *, rank: int,
                 world_size: int, microbatch_size: int):
        self.samples = samples
        self.plan = plan
        self.collate_fn = collate_fn
        self.rank, self.world_size, self.microbatch_size = rank, world_size, microbatch_size
        rank_microbatches(np.zeros(plan.batch_size, np.int64), rank, world_size, microbatch_size)  # checks

    def indices(self, step: int) -> list[np.ndarray]:
        return rank_microbatches(self.plan.global_batch(step), self.rank, self.world_size, self.microbatch_size)

    def __getitem__(self, step: int) -> list[dict[str, torch.Tensor]]:
        return [self.collate_fn([self.samples[i] for i in mb]) for mb in self.indices(int(step))]


class _Steps(Sampler):
    """Steps `start, start + 1, ...` (to `end`, exclusive; None: forever)."""

    def __init__(self, start: int, end: int | None = None):
        self.start, self.end = int(start), end

    def __iter__(self):
        return iter(itertools.count(self.start) if self.end is None else range(self.start, self.end))

    def __len__(self):
        if self.end is None:
            raise TypeError("an endless step sampler has no length")
        return max(0, self.end - self.start)


def _as_is(item):
    return item


def make_train_loader(samples: Sequence, plan: GlobalBatchPlan, collate_fn: Callable, *, start_step: int, rank: int,
                      world_size: int, microbatch_size: int, num_workers: int, end_step: int | None = None,
                      prefetch_factor: int = 2) -> Iterator[list[dict[str, torch.Tensor]]]:
    """An iterator over steps `start_step, start_step + 1, ...` (to `end_step`, exclusive; None:
    endless), each item this rank's list of collated microbatches; `num_workers` DataLoader worker
    processes collate ahead (0: in this process). Items come in step order whatever `num_workers`."""
    dataset = StepBatches(samples, plan, collate_fn, rank=rank, world_size=world_size,
                          microbatch_size=microbatch_size)
    loader = DataLoader(dataset, batch_size=None, sampler=_Steps(start_step, end_step), collate_fn=_as_is,
                        num_workers=num_workers, prefetch_factor=prefetch_factor if num_workers else None,
                        persistent_workers=False)
    return iter(loader)


def eval_batches(samples: Sequence, collate_fn: Callable, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of `batch_size` samples in order (the last one may be smaller), no shuffle."""
    if batch_size < 1:
        raise ConfigError(f"eval batch_size={batch_size}: must be at least 1")
    for start in range(0, len(samples), batch_size):
        yield collate_fn(list(samples[start:start + batch_size]))
