"""Thin `nn.Module` wrappers: the module holds the options, the function holds the math.

`forward(student_logits, teacher_outputs, batch, *, normalizer=None) -> (loss, metrics)`, the same
argument order and return type as the functions. Options are checked when the module is built.
"""

from __future__ import annotations

import torch
from torch import nn

from xtoken_loss.losses.ce import ce_loss
from xtoken_loss.chunked import check_choice, check_temperature
from xtoken_loss.losses.combine import KD_KINDS, SCALINGS, kd_ce_loss
from xtoken_loss.losses.kl import DIRECTIONS, TAILS, kl_loss
from xtoken_loss.losses.pkl import DEFAULT_TOP_K_COLUMNS, pkl_loss
from xtoken_loss.projection import as_projection


class _LossModule(nn.Module):
    def __init__(self, **options):
        super().__init__()
        if "temperature" in options:
            check_temperature(options["temperature"])
        if "direction" in options:
            check_choice("direction", options["direction"], DIRECTIONS)
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "projection")


class PKLLoss(_LossModule):
    """`pkl_loss` with fixed options. `projection`: a `Projection`, an artifact directory, or
    `(indices, weights)`; loaded once and moved to the logits' device on first use."""

    def __init__(self, projection, *, teacher_index: int = 0, temperature: float = 1.0, direction: str = "forward",
                 top_k_columns: int | None = DEFAULT_TOP_K_COLUMNS, public: bool = False, correct_only: bool = True,
                 process_group=None, position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, direction=direction,
                         top_k_columns=top_k_columns, public=public, correct_only=correct_only,
                         process_group=process_group, position_chunk_size=position_chunk_size,
                         check_inputs=check_inputs)
        self.projection = as_projection(projection, "cpu")

    def forward(self, student_logits: torch.Tensor, teacher_outputs, batch: dict, *, normalizer=None):
        if self.projection.device != student_logits.device:
            self.projection = self.projection.to(student_logits.device)
        return pkl_loss(student_logits, teacher_outputs, batch, projection=self.projection, normalizer=normalizer,
                        **self.options)


class KLLoss(_LossModule):
    """`kl_loss` (same-vocab KD) with fixed options."""

    def __init__(self, *, temperature: float = 1.0, direction: str = "forward", tail: str = "bucket",
                 position_chunk_size: int | None = None, check_inputs: bool = False):
        check_choice("tail", tail, TAILS)
        super().__init__(temperature=temperature, direction=direction, tail=tail,
                         position_chunk_size=position_chunk_size, check_inputs=check_inputs)

    def forward(self, student_logits: torch.Tensor, teacher_outputs, batch: dict, *, normalizer=None):
        return kl_loss(student_logits, teacher_outputs, batch, normalizer=normalizer, **self.options)


class CELoss(_LossModule):
    """`ce_loss` (next-token cross-entropy); `teacher_outputs` is ignored."""

    def __init__(self, *, position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(position_chunk_size=position_chunk_size, check_inputs=check_inputs)

    def forward(self, student_logits: torch.Tensor, teacher_outputs, batch: dict, *, normalizer=None):
        return ce_loss(student_logits, teacher_outputs, batch, normalizer=normalizer, **self.options)


class KDCELoss(_LossModule):
    """`kd_ce_loss` (KD + CE) with fixed options; `kd_options` go to the KD loss."""

    def __init__(self, *, kd: str = "pkl", scaling: str = "fixed", kd_weight: float = 1.0, ce_weight: float = 1.0,
                 public: bool = False, kd_options: dict | None = None, position_chunk_size: int | None = None,
                 check_inputs: bool = False):
        check_choice("kd", kd, KD_KINDS)
        check_choice("scaling", scaling, SCALINGS)
        opts = dict(kd_options or {})
        if "projection" in opts:
            opts["projection"] = as_projection(opts["projection"], "cpu")
        super().__init__(kd=kd, scaling=scaling, kd_weight=kd_weight, ce_weight=ce_weight, public=public,
                         kd_options=opts, position_chunk_size=position_chunk_size, check_inputs=check_inputs)

    def forward(self, student_logits: torch.Tensor, teacher_outputs, batch: dict, *, normalizer=None):
        opts = self.options["kd_options"]
        proj = opts.get("projection")
        if proj is not None and proj.device != student_logits.device:
            opts["projection"] = proj.to(student_logits.device)
        return kd_ce_loss(student_logits, teacher_outputs, batch, normalizer=normalizer, **self.options)
