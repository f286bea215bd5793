"""Multi-teacher distillation: several teachers, same-vocab and cross-tokenizer in any mix, combined
into one loss (docs/multi_teacher.md has the formulas).

Modes (`MultiTeacherConfig.mode`):
- `"sum"`: `sum_i w_i * c_i * KD_i`, each `KD_i` the teacher's own loss (`TeacherSpec.loss`);
  static weights, or dynamic weights `w = softmax(alpha * goodness_i + log w_static_i)` from a
  score of each teacher on the batch (`scores.py`); `c_i = log V_i / log min_j V_j` with
  `vocab_size_normalization`, else 1.
- `"averaged_logits"`: one KL against the teacher `softmax(sum_i w_i z_i / sum_i w_i)` of the
  same-vocab teachers' logits (cross-tokenizer teachers are refused when the loss is built).
- `"select_teacher"`: the loss of the teacher with the best score only (lowest CE, or lowest bits per
  byte, which compares teachers with different tokenizers on one scale).
`per_sequence=True` weights or selects per sequence instead of per batch.

Data parallelism: every score that drives a weight or a selection is reduced over the process group
(sums and counts, not means) before the softmax/argmax, so every rank picks the same teacher and the
same weights and issues the same collectives. One all-reduce per call carries the scores, the
projection-accuracy counts and, with `normalizer="global"`, each teacher's unit count.
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Literal, Sequence

import torch
from torch import nn

from xtoken_core import fingerprints
from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss import registry
from xtoken_loss.batch_tokenizers import check_batch_fingerprints
from xtoken_loss.chunked import compute_dtype
from xtoken_loss.losses.ce import ce_loss
from xtoken_loss.losses.kl import can_fuse_ce, kl_loss
from xtoken_loss.multi_teacher.scores import (
    SCORES,
    goodness,
    projection_accuracy_counts,
    reduce_sums,
    score_values,
    teacher_score_sums,
)
from xtoken_loss.multi_teacher.teachers import TeacherSpec
from xtoken_loss.projection import Projection
from xtoken_loss.teacher_outputs import TeacherOutputs, as_teacher_outputs
from xtoken_loss.units import next_token_mask

Mode = Literal["sum", "averaged_logits", "select_teacher"]
Weighting = Literal["static", "dynamic"]
ScoreChoice = Literal[("auto",) + SCORES]
MODES, WEIGHTINGS, SCORE_CHOICES = typing.get_args(Mode), typing.get_args(Weighting), typing.get_args(ScoreChoice)


@config
class MultiTeacherConfig(Config):
    """How the teachers' losses are combined (validated when built; messages name the field).

    mode: `"sum"`, `"averaged_logits"` or `"select_teacher"`.
    weighting: `"static"` (the teachers' `weight`s) or `"dynamic"` (softmax of `alpha` times a
        score, with the static weights as prior); not with `select_teacher`.
    score: what dynamic weights and selection measure: `"ce"`, `"entropy"`, `"max_prob"`, `"bpb"`, or
        `"auto"` = `"bpb"` when some teacher has another tokenizer than the student, else `"ce"`.
    alpha: sharpness of dynamic weights (0: the static prior).
    per_sequence: weight or select per sequence instead of per batch.
    vocab_size_normalization: scale teacher i's KD by `log V_i / log min_j V_j` (needs every
        teacher's vocab size); `sum` and `select_teacher` only.
    projection_accuracy: report, per projection teacher, the fraction of valid chunks where the
        projected student's most likely teacher token is the teacher's (one extra pass over the chunk
        starts, no gradient).
    position_chunk_size: rows per chunk when scoring full teacher logits (None: automatic).
    """

    error_type = LossOptionError

    mode: Mode = option("sum", help="'sum', 'averaged_logits' or 'select_teacher'")
    weighting: Weighting = option("static", help="'static' (the teachers' weights) or 'dynamic' (softmax of alpha "
                                  "times a score)")
    score: ScoreChoice = option("auto", help="what dynamic weights and selection measure ('auto': bpb across "
                                "tokenizers, else ce)")
    alpha: float = option(1.0, help="sharpness of dynamic weights (0: the static prior)")
    per_sequence: bool = option(False, help="weight or select per sequence instead of per batch")
    vocab_size_normalization: bool = option(False, help="scale teacher i's KD by log V_i / log min_j V_j")
    projection_accuracy: bool = option(True, help="report each projection teacher's projection accuracy")
    position_chunk_size: int | None = option(None, help="rows per step when scoring (None: automatic)", min=1)

    def check(self) -> None:
        a = self.alpha
        dynamic = self.weighting == "dynamic"
        if self.mode == "select_teacher" and dynamic:
            raise LossOptionError(
                "MultiTeacherConfig.weighting='dynamic' with mode='select_teacher': selection uses one teacher "
                "unweighted, so weights would be ignored; use weighting='static' (score picks the teacher)"
            )
        if not dynamic and a != 1.0:
            raise LossOptionError("MultiTeacherConfig.alpha is used only with weighting='dynamic'; leave it at 1.0")
        if self.mode != "select_teacher" and not dynamic and self.score != "auto":
            raise LossOptionError(
                f"MultiTeacherConfig.score={self.score!r} is unused with static weights in mode {self.mode!r}; "
                "set weighting='dynamic' or leave score='auto'"
            )
        if self.per_sequence and self.mode != "select_teacher" and not dynamic:
            raise LossOptionError(
                "MultiTeacherConfig.per_sequence=True needs per-sequence scores: use weighting='dynamic' or "
                "mode='select_teacher' (static weights are the same for every sequence)"
            )
        if self.vocab_size_normalization and self.mode == "averaged_logits":
            raise LossOptionError(
                "MultiTeacherConfig.vocab_size_normalization does nothing in mode 'averaged_logits' (all teachers "
                "share the student's vocabulary); leave it False"
            )

    @property
    def needs_scores(self) -> bool:
        return self.weighting == "dynamic" or self.mode == "select_teacher"


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def _names_param(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def resolve_loss_fn(spec: TeacherSpec):
    """The loss function of a teacher: its `loss_fn`, else the registry's function of its kind."""
    if spec.loss_fn is not None:
        return spec.loss_fn
    return spec.loss_spec.function


def _resolve_group(process_group):
    if isinstance(process_group, str):
        if process_group != "auto":
            raise LossOptionError(f"process_group={process_group!r}: pass 'auto', None or a process group")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None
    return process_group


class MultiTeacherLoss(nn.Module):
    """Combine several teachers' distillation losses (module doc).

    `teachers`: `TeacherSpec`s, in the batch's teacher order (teacher i reads `teacher_{i}_*` and
    `alignment_{i}_*`). `student_fingerprint` / `student_vocab_size`, when given, are checked against
    same-vocab teachers and the projection artifacts. `process_group`: `"auto"` (the default group when
    `torch.distributed` is initialised, else none), None (no reduction), or the data-parallel group.

    Call: `loss, metrics = mt(student_logits, teacher_outputs, batch, normalizer=None)` with one
    teacher output per teacher (CONTRACTS §3). `normalizer`: None (each loss's local unit count), a
    number (shared), one per teacher, or `"global"` (each teacher's unit count summed over the group).
    """

    def __init__(
        self,
        teachers: Sequence[TeacherSpec],
        config: MultiTeacherConfig | None = None,
        *,
        student_fingerprint: str | None = None,
        student_vocab_size: int | None = None,
        process_group="auto",
    ):
        super().__init__()
        self.teachers = list(teachers)
        self.config = cfg = config if config is not None else MultiTeacherConfig()
        if not isinstance(cfg, MultiTeacherConfig):
            raise LossOptionError("config must be a MultiTeacherConfig")
        if not self.teachers:
            raise LossOptionError("MultiTeacherLoss: teachers is empty; give at least one TeacherSpec")
        for t in self.teachers:
            if not isinstance(t, TeacherSpec):
                raise LossOptionError(f"MultiTeacherLoss: teachers must be TeacherSpec objects, got {type(t).__name__}")
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise LossOptionError(f"MultiTeacherLoss: teacher names must be distinct, got {names}")
        if isinstance(process_group, str) and process_group != "auto":
            raise LossOptionError(f"process_group={process_group!r}: pass 'auto', None or a process group")
        self.process_group = process_group
        self.student_fingerprint = student_fingerprint
        self.student_vocab_size = student_vocab_size
        self._check_vocabularies()
        self._check_mode()
        weights = [float(t.weight) for t in self.teachers]
        if not sum(weights) > 0:
            raise LossOptionError(
                f"teacher weights sum to {sum(weights)}: at least one TeacherSpec.weight must be > 0"
            )
        self.static_weights = weights
        if cfg.score == "auto":
            self.score = "ce" if all(t.is_same_vocab for t in self.teachers) else "bpb"
        else:
            self.score = cfg.score
        self.loss_fns = [resolve_loss_fn(t) for t in self.teachers]
        for t, fn in zip(self.teachers, self.loss_fns):
            if not t.is_same_vocab and not _accepts(fn, "teacher_index"):
                raise LossOptionError(f"teacher {t.name!r}: its loss function takes no `teacher_index` option")
            if cfg.per_sequence and cfg.mode == "sum" and not _accepts(fn, "sequence_weights"):
                raise LossOptionError(
                    f"teacher {t.name!r}: per-sequence dynamic weights in mode 'sum' need a loss function with a "
                    f"`sequence_weights` option, which {getattr(fn, '__name__', fn)!r} lacks; use "
                    "mode='select_teacher' (per-sequence selection works with every loss) or per_sequence=False"
                )
        self.vocab_factors = self._vocab_factors()
        self.projections: list[Projection | None] = [
            t.load_projection(student_fingerprint=student_fingerprint) for t in self.teachers
        ]
        self.fixed_options = [self._fixed_options(i) for i in range(len(self.teachers))]
        self._argmax_cache: dict = {}  # projection-accuracy tables per teacher

    def _fixed_options(self, i: int) -> dict:
        """Options set once per teacher: the projection, and what the kind's `LossSpec.prepare_teacher`
        computes once instead of on every call (the library H-KL / GOLD common set)."""
        spec, fn = self.teachers[i], self.loss_fns[i]
        opts = {}
        proj = self.projections[i]
        if proj is not None and _accepts(fn, "projection"):
            opts["projection"] = proj
        prepare = spec.loss_spec.prepare_teacher
        if spec.loss_fn is None and prepare is not None:
            opts.update(prepare(spec, proj))  # e.g. the H-KL / GOLD common set
        return opts

    def extra_repr(self) -> str:
        names = ", ".join(f"{t.name}:{t.loss}" for t in self.teachers)
        return f"teachers=[{names}], config={self.config!r}, score={self.score!r}"

    # ---------------------------------------------------------------------------------------------
    # construction checks

    def _check_vocabularies(self) -> None:
        for t in self.teachers:
            if not t.is_same_vocab:
                continue
            if self.student_fingerprint is not None and t.fingerprint is not None and (
                str(t.fingerprint) != str(self.student_fingerprint)
            ):
                raise LossOptionError(
                    f"teacher {t.name!r} uses loss {t.loss!r} (same-vocab) but its fingerprint {t.fingerprint!r} "
                    f"differs from the student's {self.student_fingerprint!r}; a teacher with another tokenizer "
                    "needs a cross-tokenizer loss (" + ", ".join(map(repr, registry.cross_tokenizer_kinds())) + ")"
                )
            if self.student_vocab_size is not None and t.vocab_size is not None and (
                t.vocab_size != self.student_vocab_size
            ):
                raise LossOptionError(
                    f"teacher {t.name!r} uses loss {t.loss!r} (same-vocab) but its vocab_size {t.vocab_size} differs "
                    f"from the student's {self.student_vocab_size}; use a cross-tokenizer loss for it"
                )

    def _check_mode(self) -> None:
        cfg = self.config
        if cfg.mode == "averaged_logits":
            cross = [t.name for t in self.teachers if not t.is_same_vocab]
            if cross:
                raise LossOptionError(
                    f"mode 'averaged_logits' averages logits over one shared vocabulary, but teacher(s) {cross} are "
                    "cross-tokenizer; use mode 'sum' or 'select_teacher', or give only same-vocab ("
                    + ", ".join(map(repr, registry.kinds(lambda s: s.same_vocab))) + ") teachers"
                )
            first = self.teachers[0]
            for t in self.teachers[1:]:
                if dict(t.loss_options) != dict(first.loss_options) or t.loss_fn is not first.loss_fn:
                    raise LossOptionError(
                        f"mode 'averaged_logits' computes one KL, but teacher {t.name!r} has other "
                        f"loss_options/loss_fn than {first.name!r}; give every teacher the same options"
                    )
        if cfg.mode == "select_teacher" and len(set(t.weight for t in self.teachers)) > 1:
            raise LossOptionError(
                "mode 'select_teacher' uses the selected teacher's loss unweighted, so TeacherSpec.weight would be "
                f"ignored; leave every weight equal (got {[t.weight for t in self.teachers]})"
            )

    def _vocab_factors(self) -> list[float]:
        if not self.config.vocab_size_normalization:
            return [1.0] * len(self.teachers)
        sizes = []
        for t in self.teachers:
            v = t.vocab_size if t.vocab_size is not None else (self.student_vocab_size if t.is_same_vocab else None)
            if v is None:
                raise LossOptionError(
                    f"vocab_size_normalization needs every teacher's vocab size: set TeacherSpec.vocab_size for "
                    f"{t.name!r}" + (" (or pass student_vocab_size)" if t.is_same_vocab else "")
                )
            sizes.append(v)
        lo = math.log(min(sizes))
        return [math.log(v) / lo for v in sizes]

    # ---------------------------------------------------------------------------------------------
    # the call

    def forward(self, student_logits: torch.Tensor, teacher_outputs, batch: dict, *, normalizer=None,
                ce_weight: float = 0.0, ce_normalizer=None):
        """`(loss, metrics)`; see the class doc. Same argument order as the single-teacher losses, with
        `teacher_outputs` a list (one entry per teacher).

        `ce_weight > 0`: the loss also holds `ce_weight * CE_sum / ce_normalizer`, the student's
        next-token CE (`ce_normalizer` None: its own count of next-token positions). Where a teacher is
        a same-vocab forward KL at temperature 1 on full logits with a fixed weight, and both
        normalisers are numbers, the CE is computed inside that teacher's pass (`kl_loss(ce_weight=)`:
        one student softmax for both, about a third of a CE's cost saved); else by `ce_loss`. Metrics:
        `ce` (CE_sum / ce_normalizer, unweighted), `ce_fused` (1 or 0), and `kd` the KD part alone."""
        cfg = self.config
        n = len(self.teachers)
        if not isinstance(teacher_outputs, (list, tuple)) or len(teacher_outputs) != n:
            got = len(teacher_outputs) if isinstance(teacher_outputs, (list, tuple)) else type(teacher_outputs).__name__
            raise LossInputError(
                f"teacher_outputs: expected a list of {n} teacher outputs (one per teacher), got {got}"
            )
        if student_logits.dim() != 3:
            raise LossInputError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
        B = student_logits.shape[0]
        dev = student_logits.device
        group = _resolve_group(self.process_group)
        f64 = dict(dtype=torch.float64, device=dev)
        kept = batch.get("sample_mask")
        kept = torch.ones(B, dtype=torch.bool, device=dev) if kept is None else kept.to(device=dev, dtype=torch.bool)
        projections = [self._projection(i, dev) for i in range(n)]
        self._check_batch_tokenizers(batch)

        # 1. Local statistics, reduced in one collective: scores, accuracy, unit counts, seq weights.
        pieces: dict[str, torch.Tensor] = {}
        seq_good = None
        if cfg.needs_scores:
            sums, counts = self._score_sums(teacher_outputs, batch, B)  # [n, B] each
            if cfg.per_sequence:
                seq_good = goodness(self.score, score_values(sums, counts))  # [n, B] local, final
            pieces["score_sum"], pieces["score_count"] = sums.sum(dim=1), counts.sum(dim=1)
        if cfg.projection_accuracy:
            hits, units = self._accuracy_counts(student_logits, teacher_outputs, batch, projections)
            pieces["acc_hits"], pieces["acc_units"] = hits, units
        norm_mode = self._normalizer_mode(normalizer)
        if norm_mode in ("global", "all_kept"):
            pieces["units"] = self._unit_counts(batch, dev)
        seq_weights = seq_sel = None
        if seq_good is not None:
            if cfg.mode == "select_teacher":
                seq_sel = _select(seq_good)  # [B]
                onehot = torch.nn.functional.one_hot(seq_sel, n).T.to(torch.float64)  # [n, B]
                pieces["seq_weight_sum"] = (onehot * kept).sum(dim=1)
            else:
                seq_weights = self._dynamic(seq_good)  # [n, B]
                pieces["seq_weight_sum"] = (seq_weights * kept).sum(dim=1)
            pieces["kept"] = kept.to(torch.float64).sum().reshape(1)
        stats = _reduce(pieces, group, f64)

        # 2. Weights / selection (identical on every rank).
        metrics: dict[str, torch.Tensor] = {}
        batch_good = None
        weights = None  # per-sequence modes weigh inside the losses
        if cfg.needs_scores:
            values = score_values(stats["score_sum"], stats["score_count"])  # [n]
            batch_good = goodness(self.score, values)
            for i in range(n):
                metrics[f"teacher_{i}/score_{self.score}"] = values[i]
        if cfg.per_sequence:
            frac = stats["seq_weight_sum"] / stats["kept"].clamp_min(1)
            key = "selected" if cfg.mode == "select_teacher" else "weight"
            for i in range(n):
                metrics[f"teacher_{i}/{key}"] = frac[i]
            if cfg.mode == "select_teacher":
                for i in range(n):
                    metrics[f"teacher_{i}/weight"] = frac[i]
        elif cfg.mode == "select_teacher":
            sel = int(_select(batch_good[:, None])[0])
            weights = [1.0 if i == sel else 0.0 for i in range(n)]
        elif cfg.weighting == "dynamic":
            weights = list(self._dynamic(batch_good[:, None])[:, 0].unbind())  # tensors: no host sync
        elif cfg.mode == "averaged_logits":
            s = sum(self.static_weights)
            weights = [w / s for w in self.static_weights]
        else:
            weights = list(self.static_weights)
        if not cfg.per_sequence:
            for i in range(n):
                metrics[f"teacher_{i}/weight"] = torch.as_tensor(weights[i], **f64)
                if cfg.mode == "select_teacher":
                    metrics[f"teacher_{i}/selected"] = torch.tensor(float(weights[i] > 0), **f64)
        if cfg.projection_accuracy:
            for i in range(n):
                if projections[i] is not None:
                    acc = stats["acc_hits"][i] / stats["acc_units"][i].clamp_min(1)
                    metrics[f"teacher_{i}/projection_accuracy"] = acc

        # 3. Normalizers and the losses.
        norms = self._normalizers(normalizer, norm_mode, stats, n)
        if cfg.mode == "averaged_logits":
            w = seq_weights if seq_weights is not None else torch.stack([torch.as_tensor(x, **f64) for x in weights])
            averaged = _average_outputs(teacher_outputs, w, batch, dev, self.teachers[0])
            loss, m = self._call(0, student_logits, averaged, batch, norms[0], projections)
            metrics.update({f"averaged/{k}": v for k, v in m.items()})
            metrics["kd"] = loss.detach()
            return self._add_ce(loss, metrics, student_logits, batch, ce_weight, ce_normalizer)

        total = None
        kd_part = None  # the KD terms alone, when the CE is fused into one of them
        fuse_into = self._ce_host(teacher_outputs, norms, weights, seq_sel, seq_weights, ce_weight, ce_normalizer)
        for i in range(n):
            b_i, extra = batch, {}
            if seq_sel is not None:
                b_i = dict(batch)
                b_i["sample_mask"] = kept & (seq_sel == i)
                scale = self.vocab_factors[i]
            elif seq_weights is not None:
                extra["sequence_weights"] = seq_weights[i]  # [B] float64, detached
                scale = self.vocab_factors[i]
            else:
                if cfg.mode == "select_teacher" and weights[i] == 0.0:
                    continue  # every rank skips the same teachers
                scale = weights[i] * self.vocab_factors[i]
            if i == fuse_into:  # loss = kl_term + c ce_term; scale * c * ce_term = ce_weight * CE_sum / ce_normalizer
                extra["ce_weight"] = ce_weight * float(norms[i]) / (scale * float(ce_normalizer))
            kd, m = self._call(i, student_logits, teacher_outputs[i], b_i, norms[i], projections, **extra)
            kd_i = kd
            if i == fuse_into:
                kd_i, ce_term = m.pop("kl_term"), m.pop("ce_term")
                m.pop("ce")
                metrics["ce"] = (ce_term * (float(norms[i]) / float(ce_normalizer))).detach()
                metrics["ce_fused"] = torch.ones((), **f64)
            metrics[f"teacher_{i}/kd"] = kd_i.detach()
            metrics.update({f"teacher_{i}/{k}": v for k, v in m.items()})
            if isinstance(scale, torch.Tensor):
                term, term_kd = kd * scale.to(kd.dtype), kd_i.detach() * scale.to(kd.dtype)
            else:
                term, term_kd = (kd * scale, kd_i.detach() * scale) if scale != 1.0 else (kd, kd_i.detach())
            total = term if total is None else total + term
            kd_part = term_kd if kd_part is None else kd_part + term_kd
        if total is None:  # cannot happen (a teacher is always selected); keep the type stable
            total = student_logits.sum() * 0.0
            kd_part = total.detach()
        metrics["kd"] = kd_part.detach()
        if fuse_into is not None:
            return total, metrics
        return self._add_ce(total, metrics, student_logits, batch, ce_weight, ce_normalizer)

    # ---------------------------------------------------------------------------------------------
    # pieces

    def _ce_host(self, teacher_outputs, norms, weights, seq_sel, seq_weights, ce_weight, ce_normalizer):
        """The teacher whose KL pass also computes the CE (`forward`'s doc), or None."""
        if not ce_weight or weights is None or seq_sel is not None or seq_weights is not None:
            return None
        if not isinstance(ce_normalizer, (int, float)) or not ce_normalizer > 0:
            return None
        for i, spec in enumerate(self.teachers):
            w = weights[i]
            if self.loss_fns[i] is not kl_loss or not isinstance(w, float) or not w * self.vocab_factors[i] > 0:
                continue
            if not isinstance(norms[i], (int, float)) or not norms[i] > 0:
                continue
            if can_fuse_ce(teacher_outputs[i], spec.loss_options):
                return i
        return None

    @staticmethod
    def _add_ce(loss, metrics, student_logits, batch, ce_weight, ce_normalizer):
        """`loss + ce_weight * CE` computed apart (no teacher pass could hold it)."""
        if not ce_weight:
            return loss, metrics
        ce, _ = ce_loss(student_logits, None, batch, normalizer=ce_normalizer)
        metrics["ce"] = ce.detach()
        metrics["ce_fused"] = torch.zeros((), dtype=torch.float64, device=student_logits.device)
        return loss + ce_weight * ce.to(loss.dtype), metrics

    def _check_batch_tokenizers(self, batch) -> None:
        """Refuse a batch aligned for other tokenizers than the configured student / teachers (their
        fingerprints, where given; the loss of each projection teacher checks its projection too)."""
        expected = [(fingerprints.STUDENT_KEY, "student", self.student_fingerprint)]
        for i, t in enumerate(self.teachers):
            fp = t.fingerprint if t.fingerprint is not None else (self.student_fingerprint if t.is_same_vocab else None)
            expected.append((fingerprints.teacher_key(i), f"teacher {i}", fp))

        def configured():
            return "the loss is configured for " + " and ".join(
                f"{role} {fingerprints.describe(fp)}" for _, role, fp in expected if fp is not None)

        check_batch_fingerprints(batch, expected, loss="multi_teacher", what=configured,
                                 fix="give the TeacherSpecs in the batch's teacher order (teacher i reads "
                                     "teacher_{i}_*) with their tokenizers' fingerprints")

    def _projection(self, i: int, device) -> Projection | None:
        p = self.projections[i]
        if p is not None and p.device != torch.device(device):
            p = self.projections[i] = p.to(device)
        return p

    def _call(self, i, student_logits, outputs, batch, normalizer, projections, **extra):
        spec = self.teachers[i]
        fn = self.loss_fns[i]
        opts = dict(spec.loss_options)
        if not spec.is_same_vocab:
            opts["teacher_index"] = i
        opts.update(self.fixed_options[i])
        if "projection" in opts and projections[i] is not None:
            opts["projection"] = projections[i]  # on the logits' device
        group = _resolve_group(self.process_group)
        # e.g. the P-KL's top-k column choice over the global batch; the public forms choose theirs per
        # microbatch as NeMo-RL does, unless the teacher's options name a group
        if group is not None and "process_group" not in opts and _names_param(fn, "process_group") \
                and not opts.get("public"):
            opts["process_group"] = group
        opts.update(extra)
        return fn(student_logits, outputs, batch, normalizer=normalizer, **opts)

    def _score_sums(self, teacher_outputs, batch, B):
        sums, counts = [], []
        for i, spec in enumerate(self.teachers):
            s, c = teacher_score_sums(
                teacher_outputs[i], batch, score=self.score, teacher_index=None if spec.is_same_vocab else i,
                position_chunk_size=self.config.position_chunk_size,
            )
            if s.shape[0] != B:
                raise LossInputError(f"teacher {spec.name!r}: outputs have batch size {s.shape[0]}, the student's {B}")
            sums.append(s)
            counts.append(c)
        return torch.stack(sums), torch.stack(counts)

    def _dynamic(self, good: torch.Tensor) -> torch.Tensor:
        """`[n, S]` weights softmax(alpha * goodness + log w_static) per column; a column with no defined
        score falls back to the normalised static weights."""
        alpha = float(self.config.alpha)
        prior = torch.tensor(self.static_weights, dtype=torch.float64, device=good.device)[:, None]
        defined = torch.isfinite(good)
        logits = torch.where(defined, alpha * torch.where(defined, good, torch.zeros_like(good)),
                             torch.full_like(good, float("-inf"))) + torch.log(prior)
        ok = torch.isfinite(logits).any(dim=0, keepdim=True)
        w = torch.softmax(torch.where(ok, logits, torch.zeros_like(logits)), dim=0)
        return torch.where(ok, w, (prior / prior.sum()).expand_as(w))

    def _normalizer_mode(self, normalizer) -> str:
        if isinstance(normalizer, str):
            if normalizer != "global":
                raise LossOptionError(f"normalizer={normalizer!r}: pass None, a number, one per teacher, or 'global'")
            return "global"
        if normalizer is None:
            # per-sequence selection: each teacher's part is divided by its units in *all* kept sequences
            per_seq_select = self.config.per_sequence and self.config.mode == "select_teacher"
            return "all_kept" if per_seq_select else "none"
        if isinstance(normalizer, (list, tuple)):
            if len(normalizer) != len(self.teachers):
                raise LossInputError(
                    f"normalizer: {len(normalizer)} values for {len(self.teachers)} teachers; give one per teacher"
                )
            return "list"
        return "shared"

    def _unit_counts(self, batch, dev) -> torch.Tensor:
        """`[n]` each teacher's local unit count (its kind's `LossSpec.count_units` with its options)."""
        out = []
        for i, spec in enumerate(self.teachers):
            try:
                names = spec.loss_spec.option_names()  # the options that decide the units
                opts = {k: v for k, v in spec.loss_options.items() if k in names}
                c = spec.loss_spec.count_units(batch, teacher_index=i, device=dev, **opts)
            except LossOptionError as exc:
                raise LossOptionError(
                    f"teacher {spec.name!r}: cannot count the units of loss {spec.loss!r} here ({exc}); pass the "
                    "normalizers yourself (normalizer=[...], one per teacher)"
                ) from None
            out.append(c.to(torch.float64))
        return torch.stack(out)

    def _normalizers(self, normalizer, mode, stats, n):
        if mode == "none":
            return [None] * n
        if mode in ("global", "all_kept"):
            return [stats["units"][i].clamp_min(1.0) for i in range(n)]
        if mode == "list":
            return list(normalizer)
        return [normalizer] * n

    def _accuracy_counts(self, student_logits, teacher_outputs, batch, projections):
        n = len(self.teachers)
        dev = student_logits.device
        hits = torch.zeros(n, dtype=torch.float64, device=dev)
        units = torch.zeros(n, dtype=torch.float64, device=dev)
        for i, proj in enumerate(projections):
            if proj is None:
                continue
            h, u = projection_accuracy_counts(
                student_logits, teacher_outputs[i], batch, proj, teacher_index=i,
                correct_only=bool(self.teachers[i].loss_options.get("correct_only", True)),
                position_chunk_size=self.config.position_chunk_size, cache=self._argmax_cache.setdefault(i, {}),
            )
            hits[i], units[i] = h, u
        return hits, units


def multi_teacher_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    teachers: Sequence[TeacherSpec],
    normalizer=None,
    student_fingerprint: str | None = None,
    student_vocab_size: int | None = None,
    process_group="auto",
    **config,
):
    """Function form: builds a `MultiTeacherLoss` (config fields as keywords) and calls it once.
    Projections given as paths are loaded on every call; pass loaded `Projection`s, or keep a
    `MultiTeacherLoss`, in a training loop."""
    mt = MultiTeacherLoss(teachers, MultiTeacherConfig(**config), student_fingerprint=student_fingerprint,
                          student_vocab_size=student_vocab_size, process_group=process_group)
    return mt(student_logits, teacher_outputs, batch, normalizer=normalizer)


# -------------------------------------------------------------------------------------------------
# helpers


def _select(good: torch.Tensor) -> torch.Tensor:
    """`[S]` index of the best teacher per column of `good [n, S]` (ties: lowest index; no defined
    score: teacher 0)."""
    return torch.argmax(good, dim=0)


def _reduce(pieces: dict, group, f64) -> dict:
    """Concatenate, sum-all-reduce once over `group`, split back."""
    if not pieces:
        return {}
    names = list(pieces)
    flat = torch.cat([pieces[k].to(**f64).reshape(-1) for k in names])
    reduce_sums(flat, group)
    out, at = {}, 0
    for k in names:
        size = pieces[k].numel()
        out[k] = flat[at:at + size].view(pieces[k].shape)
        at += size
    return out


def _average_outputs(outputs, w: torch.Tensor, batch: dict, dev, spec: TeacherSpec):
    """The averaged teacher of mode `averaged_logits`. `w`: `[n]` normalised weights, or `[n, B]` per
    sequence. Full logits: `sum_i w_i z_i` over the common width. Top-k: the teachers must list the same
    token set at every counted position; the average of their log-probabilities on it is returned as a
    top-k teacher (compared by the KL conditioned on the set, `tail='renormalize'`). Returns a
    `TeacherOutputs`."""
    forms = []
    for o in outputs:
        t = as_teacher_outputs(o, loss="averaged_logits", accepts=("logits", "topk"))
        forms.append(("logits", t.logits, None) if t.form == "logits" else ("topk", t.topk_logprobs, t.topk_indices))
    shapes = {tuple(f[1].shape[:2]) for f in forms}
    if len(shapes) != 1:
        raise LossInputError(f"averaged_logits: teacher outputs cover different [B, T] shapes {sorted(shapes)}")
    B, L = forms[0][1].shape[:2]

    def wt(i):  # weight i, broadcastable over [B, T, k]
        wi = w[i]
        return wi.reshape(-1, 1, 1) if wi.dim() == 1 else wi

    def add(acc, i, x):
        wi = wt(i).to(x.dtype)
        term = torch.where(wi > 0, wi * x, torch.zeros((), dtype=x.dtype, device=x.device))
        return term if acc is None else acc + term

    if all(f[0] == "logits" for f in forms):
        width = min(f[1].shape[2] for f in forms)
        cdt = compute_dtype(forms[0][1].dtype)
        acc = None
        for i, f in enumerate(forms):
            acc = add(acc, i, f[1][..., :width].to(device=dev, dtype=cdt))  # [B, T, V]
        return TeacherOutputs(logits=acc)

    if spec.loss_options.get("tail", "bucket") != "renormalize":
        raise LossInputError(
            "averaged_logits with top-k teacher outputs: the average is known on the shared top-k set only, so the "
            "KL must be conditioned on it; build the teachers with loss_options={'tail': 'renormalize'}"
        )
    valid = next_token_mask(batch, B, L, "", dev)  # [B, T]
    ref = next(f for f in forms if f[0] == "topk")
    support, _ = torch.sort(ref[2].to(device=dev, dtype=torch.int64), dim=2)  # [B, T, k]
    safe = support.clamp(min=0)
    acc = None
    for i, (form, main, idx) in enumerate(forms):
        if form == "topk":
            idx = idx.to(device=dev, dtype=torch.int64)
            s_idx, order = torch.sort(idx, dim=2)
            if not bool(((s_idx == support).all(dim=2) | ~valid).all()):
                raise LossInputError(
                    "averaged_logits: teachers list different top-k token sets at some counted position; the "
                    "average of their logits is undefined there. Give every teacher the same top-k indices (e.g. "
                    "select them from one teacher), or pass full logits"
                )
            x = main.to(device=dev, dtype=torch.float64).gather(2, order)
        else:
            x = main.to(device=dev, dtype=torch.float64).gather(2, safe)
        x = torch.where(support >= 0, x, torch.full_like(x, float("-inf")))
        acc = add(acc, i, x)
    acc = torch.where(support >= 0, acc, torch.full_like(acc, float("-inf")))
    return TeacherOutputs(topk_logprobs=acc, topk_indices=support)
