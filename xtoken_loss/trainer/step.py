"""One optimizer step: microbatches, normalisation over the whole step, the non-finite guard.

Normalisation (as torchtitan does it): before any forward, every loss term's units are counted over
*all* microbatches of the step and all-reduced over the ranks — the student's next-token positions
for CE, each teacher's own units (chunks or positions, `LossSpec.count_units`) for its KD. Each
microbatch's loss is its *summed* terms divided by those global counts, so the backward passes add
up, over microbatches and ranks, to the gradient of

    loss = ce_weight * CE_sum / N_ce + kd_weight * sum_i w_i * KD_i_sum / N_i

FSDP's own division of gradients by the world size is off (`models.shard_model`), gradients are
synchronised on the last microbatch only, and the reported loss is the same global quantity. A
step whose loss or gradient norm is not finite is skipped (no parameter update), counted, and after
`optim.max_bad_steps` consecutive ones the run stops with a message.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from xtoken_core.errors import XTokenError
from xtoken_loss import registry
from xtoken_loss.losses.ce import ce_loss

# metric pieces averaged over microbatches and ranks (the others are sums of normalised terms)
AVERAGED = ("/weight", "/selected")


class TrainingDiverged(XTokenError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TeacherRuntime:
    """A frozen teacher as the step uses it."""

    name: str
    index: int  # place in the batch's teacher order (`teacher_{index}_*` keys)
    kind: str  # loss kind (registry)
    same_vocab: bool
    model: nn.Module | None  # None: read from a teacher cache (the batch holds its top-k outputs)
    loss_options: dict = field(default_factory=dict)
    top_k: int | None = None  # online teacher: give the loss its top-k form (`teacher_cache.topk_outputs`)
    top_k_dtype: torch.dtype = torch.bfloat16  # the top-k form's storage dtype


def model_inputs(batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` for a model: padding ids replaced by 0 (after a vocabulary remap
    the tokenizer's pad id may lie outside the model's rows; padded positions are masked anyway)."""
    mask = batch[f"{prefix}token_mask"].bool()
    ids = torch.where(mask, batch[f"{prefix}input_ids"], torch.zeros_like(batch[f"{prefix}input_ids"]))
    return ids, mask.long()


TOPK_FIELDS = ("topk_logprobs", "topk_indices", "target_logprob", "rest_logprob")


def teacher_outputs(t: TeacherRuntime, batch: dict):
    """What the losses get from teacher t (CONTRACTS §3), no gradient: its logits on its own tokens
    `[B, T_t, V_t]`; with `top_k`, their top-k form as a teacher cache stores it
    (`teacher_cache.topk_outputs`, the same function the cache writer uses, so the online and cached
    paths agree); from a cache (no model), the batch's `teacher_{i}_topk_*` tensors (`[B, T_t, K]`,
    same-vocab teachers on the student's positions)."""
    if t.model is None:
        from xtoken_loss.teacher_outputs import TeacherOutputs

        return TeacherOutputs(**{f: batch[f"teacher_{t.index}_{f}"] for f in TOPK_FIELDS})
    ids, mask = model_inputs(batch, "" if t.same_vocab else f"teacher_{t.index}_")
    with torch.no_grad():
        logits = t.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if t.top_k is None:
        return logits
    from xtoken_loss.trainer.teacher_cache import topk_outputs

    return topk_outputs(logits, ids, mask, t.top_k, dtype=t.top_k_dtype)


def count_step_units(microbatches: list[dict], teachers: list[TeacherRuntime], dist) -> torch.Tensor:
    """`[1 + n]` float64: the step's CE positions, then each teacher's units, summed over the
    microbatches and all-reduced over the ranks."""
    counts = torch.zeros(1 + len(teachers), dtype=torch.float64)
    ce = registry.REGISTRY["ce"]
    for mb in microbatches:
        counts[0] += float(ce.count_units(mb))
        for j, t in enumerate(teachers):
            spec = registry.REGISTRY[t.kind]
            counts[1 + j] += float(spec.count_units(mb, teacher_index=t.index, **t.loss_options))
    return dist.all_reduce_sum(counts.to(dist.device)).cpu()


def clip_grad_norm(groups: list[list[nn.Parameter]], max_norm: float | None) -> float:
    """The global L2 norm of all gradients (FSDP-sharded DTensors and plain replicated tensors may
    not share one `clip_grad_norm_` call), and, with `max_norm`, every gradient scaled so the norm
    is at most `max_norm` (a non-finite norm leaves them alone: the step is skipped anyway)."""
    squares = []
    for params in groups:
        params = [p for p in params if p.grad is not None]
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, math.inf)  # the group's norm (no clipping)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            squares.append(float(norm) ** 2)
    total = math.sqrt(sum(squares))
    if max_norm is not None and math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for params in groups:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
    return total


class Timer:
    """Seconds per phase; synchronises CUDA before reading the clock so the phases are honest."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.times: dict[str, float] = {}

    def mark(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, name: str, start: float) -> float:
        now = self.mark()
        self.times[name] = self.times.get(name, 0.0) + now - start
        return now


@dataclass
class StepResult:
    metrics: dict
    skipped: bool


class StepRunner:
    """Runs optimizer steps (module doc). `extra_params`: trainable parameters outside the FSDP
    student (a learned projection), replicated on every rank: their gradients are all-reduced here."""

    def __init__(self, *, student: nn.Module, teachers: list[TeacherRuntime], kd_loss, kd_weight: float,
                 ce_weight: float, optimizer, scheduler, grad_clip: float | None, max_bad_steps: int, dist,
                 extra_params: list[nn.Parameter] = ()):
        self.student, self.teachers, self.kd_loss = student, teachers, kd_loss
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip, self.max_bad_steps = grad_clip, max_bad_steps
        self.dist = dist
        self.extra_params = list(extra_params)
        self.bad_in_a_row = 0
        self.skipped_total = 0

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad] + self.extra_params

    def microbatch_loss(self, mb: dict, counts: torch.Tensor, timer: Timer):
        """The microbatch's loss (summed terms / global counts) and its metric pieces."""
        t0 = timer.mark()
        outs = [teacher_outputs(t, mb) for t in self.teachers]
        t0 = timer.add("teacher_forward", t0)
        ids, mask = model_inputs(mb)
        logits = self.student(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T_s, V_s]
        t0 = timer.add("student_forward", t0)
        pieces: dict[str, torch.Tensor] = {}
        loss = logits.new_zeros((), dtype=torch.float32)
        ce_norm = float(max(counts[0], 1.0))
        # with teachers the KD loss adds the CE itself, inside a same-vocab KL pass where it can
        fused = bool(self.teachers) and self.ce_weight > 0 and self.kd_weight > 0
        if self.ce_weight and not fused:
            ce, _ = ce_loss(logits, None, mb, normalizer=ce_norm)
            loss = loss + self.ce_weight * ce
            pieces["ce"] = ce.detach()
        if self.teachers:
            norms = [float(max(c, 1.0)) for c in counts[1:]]
            extra = {"ce_weight": self.ce_weight / self.kd_weight, "ce_normalizer": ce_norm} if fused else {}
            kd, m = self.kd_loss(logits, outs, mb, normalizer=norms, **extra)
            loss = loss + self.kd_weight * kd
            pieces["kd"] = m["kd"].detach() if fused else kd.detach()
            if fused:
                pieces["ce"] = m["ce"].detach()
            for j in range(len(self.teachers)):
                for key in ("kd", "weight", "selected"):
                    k = f"teacher_{j}/{key}"
                    if k in m:
                        pieces[k] = m[k].detach().double()
        timer.add("loss", t0)
        return loss, pieces

    def run(self, microbatches: list[dict]) -> StepResult:
        """One optimizer step over this rank's microbatches (already on the device)."""
        timer = Timer(self.dist.device)
        counts = count_step_units(microbatches, self.teachers, self.dist)
        sums: dict[str, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        n = len(microbatches)
        for k, mb in enumerate(microbatches):
            last = k == n - 1
            if hasattr(self.student, "set_requires_gradient_sync"):
                self.student.set_requires_gradient_sync(last)
            loss, pieces = self.microbatch_loss(mb, counts, timer)
            t0 = timer.mark()
            loss.backward()
            timer.add("backward", t0)
            total += loss.detach().double()
            for key, v in pieces.items():
                # weights and accuracies are averaged over microbatches, sums added
                v = v if not key.endswith(AVERAGED) else v / n
                sums[key] = sums.get(key, 0) + v.to(self.dist.device)
        t0 = timer.mark()
        for p in self.extra_params:
            if p.grad is not None:
                self.dist.all_reduce_sum(p.grad)
        keys = sorted(sums)
        packed = torch.stack([total] + [sums[k].double().reshape(()) for k in keys])
        packed = self.dist.all_reduce_sum(packed)
        world = self.dist.world_size
        loss_value = float(packed[0])
        metrics = {"loss": loss_value}
        for i, key in enumerate(keys):
            v = float(packed[1 + i])
            metrics[key] = v / world if key.endswith(AVERAGED) else v
        grad_norm = clip_grad_norm([[p for p in self.student.parameters() if p.requires_grad], self.extra_params],
                                   self.grad_clip)
        ok = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if ok:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.bad_in_a_row += 1
            self.skipped_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        with warnings.catch_warnings():
            # a skipped step still advances the schedule (it follows the step index); torch warns
            # when that happens before the first optimizer.step()
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        timer.add("optimizer", t0)
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = int(not ok)
        metrics["skipped_total"] = self.skipped_total
        metrics["units/ce"] = float(counts[0])
        for j in range(len(self.teachers)):
            metrics[f"units/teacher_{j}"] = float(counts[1 + j])
        metrics.update({f"time/{k}": v for k, v in timer.times.items()})
        if self.bad_in_a_row >= self.max_bad_steps:
            raise TrainingDiverged(
                f"stopped: {self.bad_in_a_row} consecutive steps had a non-finite loss or gradient norm (loss "
                f"{loss_value}, grad_norm {grad_norm}); lower optim.lr, check the data, or raise "
                "optim.max_bad_steps"
            )
        return StepResult(metrics, not ok)
