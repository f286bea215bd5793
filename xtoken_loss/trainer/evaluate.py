"""Held-out evaluation: bits per byte of the student (and, once, of each teacher), CE, top-1
accuracy and each teacher's KD on the held-out split.

    eval/bpb          = sum over predicted tokens of -log2 p(token) / sum of their text bytes
    eval/ce           = mean nats per predicted token
    eval/top1         = fraction of predicted tokens that are the student's argmax
    eval/teacher_i/kd = teacher i's KD summed over its units / its unit count
    eval/teacher_i/projection_accuracy (projection teachers, with `projection_accuracy`): fraction of
                        chunks where the projected student's top teacher token is the teacher's
    eval/teacher_i/bpb (the teacher's own bits per byte on the same text, its own tokens)

Bytes are the text bytes of the predicted tokens (`token_bytes` of positions 1..T-1), so student and
teachers with different tokenizers are compared on one scale: the bytes a model had to predict. Each
rank evaluates every `world_size`-th batch; sums are all-reduced.
"""

from __future__ import annotations

import math

import torch

from xtoken_loss import registry
from xtoken_loss.multi_teacher.scores import teacher_score_sums
from xtoken_loss.trainer.step import model_inputs, teacher_outputs
from xtoken_loss.units import next_token_mask


def _my_batches(batches: list[dict], dist, max_batches: int | None) -> list[dict]:
    """This rank's share: every `world_size`-th batch, padded with an empty copy (every sample
    masked) so all ranks make the same number of loss calls: the multi-teacher loss reduces its
    statistics over the group on each call."""
    chosen = batches if max_batches is None else batches[:max_batches]
    mine = chosen[dist.rank::dist.world_size]
    rounds = -(-len(chosen) // dist.world_size)
    while chosen and len(mine) < rounds:
        empty = dict(chosen[0])
        empty["sample_mask"] = torch.zeros_like(chosen[0]["sample_mask"])
        mine.append(empty)
    return mine


@torch.no_grad()
def evaluate(student, teachers, kd_loss, batches: list[dict], dist, *, max_batches: int | None = None,
             with_teacher_bpb: bool = False) -> dict:
    """`eval/*` metrics over the held-out `batches` (CPU dicts; moved to the device here)."""
    was_training = student.training
    student.eval()
    n = len(teachers)
    # [bits, bytes, nats, positions, hits, kd_0, units_0, ..., tbits_0, tbytes_0, ..., pacc_0 * units_0, ...]
    acc = torch.zeros(5 + 2 * n + 2 * n + n, dtype=torch.float64, device=dist.device)
    zero = torch.zeros((), dtype=torch.float64, device=dist.device)
    for cpu_batch in _my_batches(batches, dist, max_batches):
        mb = {k: v.to(dist.device) if isinstance(v, torch.Tensor) else v for k, v in cpu_batch.items()}
        ids, mask = model_inputs(mb)
        logits = student(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()  # [B, T, V]
        bits, nbytes = teacher_score_sums(logits, mb, score="bpb")
        nats, npos = teacher_score_sums(logits, mb, score="ce")
        acc[0] += bits.sum()
        acc[1] += nbytes.sum()
        acc[2] += nats.sum()
        acc[3] += npos.sum()
        valid = next_token_mask(mb, logits.shape[0], logits.shape[1], device=logits.device)
        target = torch.zeros_like(ids)
        target[:, :-1] = ids[:, 1:]
        acc[4] += ((logits.argmax(-1) == target) & valid).sum()
        if n:
            outs = [teacher_outputs(t, mb) for t in teachers]
            _, m = kd_loss(logits, outs, mb, normalizer=[1.0] * n)
            for j, t in enumerate(teachers):
                acc[5 + 2 * j] += m.get(f"teacher_{j}/kd", zero).double()
                spec = registry.REGISTRY[t.kind]
                units = float(spec.count_units(mb, teacher_index=t.index, **t.loss_options))
                acc[6 + 2 * j] += units
                acc[5 + 4 * n + j] += m.get(f"teacher_{j}/projection_accuracy", zero).double() * units
                if with_teacher_bpb:
                    tb, tn = teacher_score_sums(outs[j], mb, score="bpb",
                                                teacher_index=None if t.same_vocab else t.index)
                    acc[5 + 2 * n + 2 * j] += tb.sum()
                    acc[6 + 2 * n + 2 * j] += tn.sum()
    acc = dist.all_reduce_sum(acc)
    if was_training:
        student.train()
    a = acc.tolist()
    out = {
        "eval/bpb": a[0] / a[1] if a[1] else math.nan,
        "eval/ce": a[2] / a[3] if a[3] else math.nan,
        "eval/top1": a[4] / a[3] if a[3] else math.nan,
        "eval/bytes": a[1],
    }
    for j in range(n):
        out[f"eval/teacher_{j}/kd"] = a[5 + 2 * j] / a[6 + 2 * j] if a[6 + 2 * j] else math.nan
        if kd_loss is not None and kd_loss.config.projection_accuracy and kd_loss.projections[j] is not None:
            # the batches' accuracies weighted by their unit counts
            out[f"eval/teacher_{j}/projection_accuracy"] = a[5 + 4 * n + j] / a[6 + 2 * j] if a[6 + 2 * j] else math.nan
        if with_teacher_bpb:
            tb, tn = a[5 + 2 * n + 2 * j], a[6 + 2 * n + 2 * j]
            out[f"eval/teacher_{j}/bpb"] = tb / tn if tn else math.nan
    return out
