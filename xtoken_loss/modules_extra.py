"""Thin `nn.Module` wrappers of the issue-6 losses (H-KL, GOLD, ULD, ALM; the learned-W P-KL module
lives beside its function in `learned_projection.py`). As in `modules.py`: the module holds the
options, checked when it is built, the function holds the math, and
`forward(student_logits, teacher_outputs, batch, *, normalizer=None) -> (loss, metrics)`.

`EXTRA_LOSSES` maps the CONTRACTS §5 kind names to the functions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from xtoken_loss.losses.alm import DEFAULT_TAU, DIVERGENCES, alm_loss
from xtoken_loss.chunked import check_choice, check_temperature
from xtoken_core.errors import LossOptionError
from xtoken_loss.losses.hybrid import DEFAULT_THRESHOLD, CommonSet, common_by_threshold, common_exact, gold_loss, hkl_loss
from xtoken_loss.losses.learned_pkl import LearnedPKLLoss, LearnedProjection
from xtoken_loss.losses.uld import CHUNK_FORMS, check_tail_cut, uld_loss

EXTRA_LOSSES = {"hkl": hkl_loss, "gold": gold_loss, "uld": uld_loss, "alm": alm_loss}

__all__ = ["ALMLoss", "EXTRA_LOSSES", "GOLDLoss", "HKLLoss", "LearnedPKLLoss", "LearnedProjection", "ULDLoss"]


class _Module(nn.Module):
    def __init__(self, **options):
        super().__init__()
        if "temperature" in options:
            check_temperature(options["temperature"])
        if options.get("chunk_form") is not None:
            check_choice("chunk_form", options["chunk_form"], CHUNK_FORMS)
        if "tail_cut" in options:
            check_tail_cut(options["tail_cut"])
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class _HybridModule(_Module):
    common: CommonSet

    def _common_on(self, device) -> CommonSet:
        if self.common.student_ids.device != torch.device(device):
            self.common = self.common.to(device)
        return self.common


class HKLLoss(_HybridModule):
    """`hkl_loss` with fixed options; the common set is computed once from `projection` (a
    `Projection`, an artifact directory or `(indices, weights)`) at `threshold`."""

    def __init__(self, projection, *, threshold: float = DEFAULT_THRESHOLD, teacher_index: int = 0,
                 temperature: float = 1.0, public: bool = False, common_weight: float = 1.0,
                 uncommon_weight: float = 1.0, chunk_form: str | None = None, tail_cut: int | None = None,
                 correct_only: bool = True, position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, public=public,
                         common_weight=common_weight, uncommon_weight=uncommon_weight, chunk_form=chunk_form,
                         tail_cut=tail_cut, correct_only=correct_only, position_chunk_size=position_chunk_size,
                         check_inputs=check_inputs)
        self.common = common_by_threshold(projection, threshold)

    def forward(self, student_logits, teacher_outputs, batch: dict, *, normalizer=None):
        return hkl_loss(student_logits, teacher_outputs, batch, common=self._common_on(student_logits.device),
                        normalizer=normalizer, **self.options)


class GOLDLoss(_HybridModule):
    """`gold_loss` with fixed options; `common`: a `CommonSet`, a `[V_s]` exact map, or an artifact
    directory whose `row_kind` marks the exact rows."""

    def __init__(self, common, *, teacher_index: int = 0, temperature: float = 1.0, public: bool = False,
                 common_weight: float = 1.0, uncommon_weight: float = 1.0, chunk_form: str | None = None,
                 tail_cut: int | None = None, correct_only: bool = True, position_chunk_size: int | None = None,
                 check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, public=public,
                         common_weight=common_weight, uncommon_weight=uncommon_weight, chunk_form=chunk_form,
                         tail_cut=tail_cut, correct_only=correct_only, position_chunk_size=position_chunk_size,
                         check_inputs=check_inputs)
        self.common = common_exact(common)

    def forward(self, student_logits, teacher_outputs, batch: dict, *, normalizer=None):
        return gold_loss(student_logits, teacher_outputs, batch, common=self._common_on(student_logits.device),
                         normalizer=normalizer, **self.options)


class ULDLoss(_Module):
    """`uld_loss` with fixed options."""

    def __init__(self, *, teacher_index: int = 0, temperature: float = 1.0, public: bool = False,
                 chunk_form: str | None = None, tail_cut: int | None = None, correct_only: bool = True,
                 position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, public=public, chunk_form=chunk_form,
                         tail_cut=tail_cut, correct_only=correct_only, position_chunk_size=position_chunk_size,
                         check_inputs=check_inputs)

    def forward(self, student_logits, teacher_outputs, batch: dict, *, normalizer=None):
        return uld_loss(student_logits, teacher_outputs, batch, normalizer=normalizer, **self.options)


class ALMLoss(_Module):
    """`alm_loss` with fixed options (boundary token masks/ids are kept as given)."""

    def __init__(self, *, teacher_index: int = 0, tau: float = DEFAULT_TAU, divergence: str = "bce",
                 debias_gamma: float | None = None, teacher_boundary_tokens=None, student_boundary_tokens=None,
                 correct_only: bool = True, eps: float = 1e-6, position_chunk_size: int | None = None,
                 check_inputs: bool = False):
        check_choice("divergence", divergence, DIVERGENCES)
        if not float(tau) > 0 or math.isinf(float(tau)):
            raise LossOptionError(f"tau must be a finite number > 0, got {tau!r}")
        if debias_gamma is not None and teacher_boundary_tokens is None and student_boundary_tokens is None:
            raise LossOptionError("ALMLoss: debias_gamma needs teacher_boundary_tokens and/or student_boundary_tokens")
        super().__init__(teacher_index=teacher_index, tau=tau, divergence=divergence, debias_gamma=debias_gamma,
                         teacher_boundary_tokens=teacher_boundary_tokens,
                         student_boundary_tokens=student_boundary_tokens, correct_only=correct_only, eps=eps,
                         position_chunk_size=position_chunk_size, check_inputs=check_inputs)

    def forward(self, student_logits, teacher_outputs, batch: dict, *, normalizer=None):
        return alm_loss(student_logits, teacher_outputs, batch, normalizer=normalizer, **self.options)
