"""KD + CE combined (CONTRACTS §5 signature), with fixed weights or dynamic scaling.

Principled default: the KD sum (over chunks or positions) and the CE sum (over next-token positions)
are divided by the *same* normaliser, the number of student next-token positions (or the caller's
`normalizer`, e.g. that count all-reduced over data-parallel ranks). The result is one total divided
by one count, so the KD/CE balance does not drift with how many chunks a batch happens to have, and
gradient accumulation and data parallelism stay exact.
`public=True` reproduces the published trainers: KD divided by its own unit count (chunks for P-KL),
CE by its token count, then added.

Scaling:
- `"fixed"`: `kd_weight * KD + ce_weight * CE`.
- `"dynamic"`: `kd_weight * (sg|CE| / sg|KD|) * KD + ce_weight * CE` (sg = detached); when KD is 0
  the KD term is 0.
"""

from __future__ import annotations

import typing
from typing import Literal

import torch

from xtoken_core.config import Config, config, fields_of, option
from xtoken_core.errors import LossOptionError
from xtoken_loss import registry
from xtoken_loss.chunked import check_choice, check_options
from xtoken_loss.losses.ce import ce_loss
from xtoken_loss.losses.kl import can_fuse_ce
from xtoken_loss.modules import LossModule
from xtoken_loss.projection import as_projection
from xtoken_loss.units import count_units

Scaling = Literal["fixed", "dynamic"]
SCALINGS = typing.get_args(Scaling)


@config
class KDCEOptions(Config):
    """Options of `kd_ce_loss` / `KDCELoss` (the KD loss's own options go in `kd_options`)."""

    error_type = LossOptionError

    kd: str = option("pkl", help="the KD loss kind (one the registry marks usable here)")
    scaling: Scaling = option("fixed", help="'fixed' weights or 'dynamic' (KD rescaled to CE's magnitude)")
    kd_weight: float = option(1.0, help="weight of the KD term")
    ce_weight: float = option(1.0, help="weight of the CE term")
    public: bool = option(False, help="each term divided by its own unit count, KD in its public form")
    position_chunk_size: int | None = option(None, help="rows per step (None: automatic from the width)", min=1)
    check_inputs: bool = option(False, help="check the inputs (syncs)")

    def check(self) -> None:
        kinds = registry.kd_kinds()
        if self.kd not in kinds:
            raise self.fail(f"kd={self.kd!r}: valid values are " + ", ".join(map(repr, kinds)))


def combine_losses(kd: torch.Tensor, ce: torch.Tensor, *, scaling: str = "fixed", kd_weight: float = 1.0,
                   ce_weight: float = 1.0):
    """Combine two already-normalised scalar losses. Returns `(loss, metrics)`; metrics: `kd`, `ce`,
    `kd_scale` (the factor applied to KD)."""
    check_choice("scaling", scaling, SCALINGS)
    if scaling == "fixed":
        scale = torch.as_tensor(float(kd_weight), dtype=kd.dtype, device=kd.device)
    else:
        kd_abs, ce_abs = kd.detach().abs(), ce.detach().abs().to(kd.dtype)
        scale = kd_weight * torch.where(kd_abs > 0, ce_abs / torch.where(kd_abs > 0, kd_abs, torch.ones_like(kd_abs)),
                                        torch.zeros_like(kd_abs))
    loss = scale * kd + ce_weight * ce.to(kd.dtype)
    return loss, {"kd": kd.detach(), "ce": ce.detach(), "kd_scale": scale.detach()}


def kd_ce_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    normalizer=None,
    kd: str = "pkl",
    scaling: str = "fixed",
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    public: bool = False,
    kd_options: dict | None = None,
    check_inputs: bool = False,
    position_chunk_size: int | None = None,
):
    """KD of kind `kd` (`registry.kd_kinds()`, options in `kd_options`, e.g. the P-KL `projection`)
    plus next-token CE, combined as the module doc says. Returns `(loss, metrics)`; metrics: the KD
    loss's own metrics prefixed `kd_`, plus `kd`, `ce`, `kd_scale`.

    With `public=True` a KD loss with a public form (P-KL) runs in it unless `kd_options` says otherwise.
    """
    check_options(KDCEOptions, kd=kd, scaling=scaling, kd_weight=kd_weight, ce_weight=ce_weight, public=public,
                  position_chunk_size=position_chunk_size, check_inputs=check_inputs)
    spec = registry.REGISTRY[kd]
    opts = dict(kd_options or {})
    common = {"check_inputs": check_inputs, "position_chunk_size": position_chunk_size}
    if "normalizer" in opts:
        raise LossOptionError("kd_ce_loss: pass `normalizer` to kd_ce_loss itself, not in kd_options")
    if public:
        if any(f.name == "public" for f in fields_of(spec.options)):
            opts.setdefault("public", True)
        kd_norm = ce_norm = None  # each divided by its own unit count
    else:
        if normalizer is None:
            normalizer = count_units(batch, "ce", device=student_logits.device).clamp_min(1)
        kd_norm = ce_norm = normalizer
    if _fuses_ce(kd, opts, teacher_outputs, scaling, public, kd_weight, ce_weight):
        # same-vocab forward KL at T = 1: the CE comes out of the KL's own pass (kl_loss(ce_weight=))
        fused, kd_metrics = spec.function(student_logits, teacher_outputs, batch, normalizer=kd_norm, **common,
                                          **opts, ce_weight=ce_weight / kd_weight)
        kd_value, ce_term = kd_metrics.pop("kl_term"), kd_metrics.pop("ce_term")
        kd_metrics.pop("ce")
        loss = kd_weight * fused
        scale = torch.as_tensor(float(kd_weight), dtype=loss.dtype, device=loss.device)
        metrics = {"kd": kd_value, "ce": ce_term, "kd_scale": scale}
    else:
        kd_value, kd_metrics = spec.function(student_logits, teacher_outputs, batch, normalizer=kd_norm, **common,
                                             **opts)
        ce_value, ce_metrics = ce_loss(student_logits, None, batch, normalizer=ce_norm, **common)
        loss, metrics = combine_losses(kd_value, ce_value, scaling=scaling, kd_weight=kd_weight, ce_weight=ce_weight)
    metrics.update({f"kd_{k}": v for k, v in kd_metrics.items()})
    return loss, metrics


def _fuses_ce(kd, opts, teacher_outputs, scaling, public, kd_weight, ce_weight) -> bool:
    """KD `"kl"` that can carry the CE (`kl.can_fuse_ce`), fixed positive weights: one pass for both."""
    if kd != "kl" or scaling != "fixed" or public or not kd_weight > 0 or not ce_weight > 0:
        return False
    return can_fuse_ce(teacher_outputs, opts)


class KDCELoss(LossModule):
    """`kd_ce_loss` (KD + CE) with fixed options; `kd_options` go to the KD loss (a `projection` among
    them is loaded once and kept as non-persistent buffers)."""

    function = staticmethod(kd_ce_loss)
    options_type = KDCEOptions

    def __init__(self, *, kd: str = "pkl", scaling: str = "fixed", kd_weight: float = 1.0, ce_weight: float = 1.0,
                 public: bool = False, kd_options: dict | None = None, position_chunk_size: int | None = None,
                 check_inputs: bool = False):
        opts = dict(kd_options or {})
        projection = opts.pop("projection", None)
        super().__init__(kd=kd, scaling=scaling, kd_weight=kd_weight, ce_weight=ce_weight, public=public,
                         kd_options=opts, position_chunk_size=position_chunk_size, check_inputs=check_inputs)
        self.register_artifact("projection", None if projection is None else as_projection(projection, "cpu"))

    def forward(self, student_logits: torch.Tensor, teacher_outputs, batch: dict, *, normalizer=None):
        options = dict(self.options)
        proj = self.artifacts_on(student_logits.device)["projection"]
        if proj is not None:
            options["kd_options"] = {**options["kd_options"], "projection": proj}
        return kd_ce_loss(student_logits, teacher_outputs, batch, normalizer=normalizer, **options)
