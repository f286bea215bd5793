"""The loss registry: one `LossSpec` per loss kind, the one place that lists the kinds.

Everything that depends on the kind reads it from here: `xtoken_loss.LOSSES` (kind -> function) and
`__all__`, the KD kinds of `kd_ce_loss`, `count_units`, the checks of `TeacherSpec`, and the
multi-teacher loss's dispatch (function, per-teacher preparation, unit counts).

Adding a loss kind is one file in `xtoken_loss/losses/` (the function, its options config, its
module, its `TEACHER_FORMS`) plus one `LossSpec` below.

Units (CONTRACTS §5: a loss is a sum over units divided by `normalizer`, by default the number of
units): `"position"` kinds count next-token positions (`units.next_token_mask`); `"chunk"` kinds
count the valid chunks of teacher i's alignment (`units.chunk_units`), in the mode the options'
`unit_mode` names: `"start"` (one unit per chunk start on each side) or `"mean"` (chunks with at
least one position on each side). The two modes can differ: a chunk whose first token is a
sample's first token has positions but no start position.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from xtoken_core.config import Config, fields_of
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.losses import alm, ce, hybrid, kl, learned_pkl, pkl, uld
from xtoken_loss.units import chunk_units, get_key, next_token_mask

ProjectionNeed = Literal["none", "required", "projection_or_common"]


@dataclass(frozen=True)
class LossSpec:
    """What the library knows about one loss kind.

    name: the CONTRACTS §5 kind name.
    function / module / options: the loss function, its `nn.Module` and its options config.
    projection: `"none"`, `"required"` (a projection artifact), or `"projection_or_common"` (a
        projection, or a precomputed common set passed as the option `common`).
    teacher_forms: the teacher-output forms the function accepts (its module's `TEACHER_FORMS`;
        empty: the loss uses no teacher).
    unit: `"position"` or `"chunk"` (module doc).
    same_vocab: the teacher shares the student's tokenizer (per-position path, no alignment).
    kd_ce: usable as the KD term of `kd_ce_loss`.
    prepare_teacher: `(teacher_spec, loaded_projection) -> {option: value}`, the options the
        multi-teacher loss computes once per teacher of this kind (e.g. a common set); None: none.
    """

    name: str
    function: Callable
    module: type
    options: type[Config]
    projection: ProjectionNeed
    teacher_forms: tuple[str, ...]
    unit: Literal["position", "chunk"]
    same_vocab: bool = False
    kd_ce: bool = False
    prepare_teacher: Callable | None = None

    @property
    def uses_teacher(self) -> bool:
        return bool(self.teacher_forms)

    @property
    def needs_projection(self) -> bool:
        """A projection (or, where allowed, a common set) is required."""
        return self.projection != "none"

    @property
    def takes_common(self) -> bool:
        return self.projection == "projection_or_common"

    def option_names(self) -> tuple[str, ...]:
        """The options config's field names."""
        return tuple(f.name for f in fields_of(self.options))

    def build_options(self, **options) -> Config:
        """The options config from the loss function's keyword options. Options the config lacks (the
        projection, the common set, ...) are left out; a name the function does not take raises."""
        names = set(self.option_names())
        unknown = sorted(set(options) - names - _function_options(self.function) - {"public", "correct_only"})
        if unknown:
            raise LossOptionError(f"loss {self.name!r} has no option(s) {', '.join(map(repr, unknown))}; its options "
                                  "are " + ", ".join(self.option_names()))
        return self.options(**{k: v for k, v in options.items() if k in names})

    def count_units(self, batch: dict, *, teacher_index: int = 0, device=None, **options) -> torch.Tensor:
        """The number of units the loss divides by on `batch` with `options` (normalizer=None)."""
        o = self.build_options(**options)
        if self.unit == "position":
            return _count_positions(batch, device)
        if getattr(o, "debias_gamma", None) is not None:
            raise LossOptionError(
                f"count_units: loss {self.name!r} with debias_gamma drops chunks by the models' boundary "
                "probabilities, so its unit count depends on the logits; read it from the loss (kept_fraction) "
                "or pass the normalizer yourself"
            )
        only_correct = getattr(o, "only_correct", o.correct_only)  # correct_only=None: the form's default
        return _count_chunks(batch, teacher_index, o.unit_mode, only_correct, device)


def _function_options(fn) -> set[str]:
    params = inspect.signature(fn).parameters
    return {n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY}


def _count_positions(batch: dict, device) -> torch.Tensor:
    tm = batch.get("token_mask")
    if tm is None:
        raise LossInputError("count_units: batch key 'token_mask' is missing (which positions are real)")
    return next_token_mask(batch, tm.shape[0], tm.shape[1], "", device or tm.device).sum()


def _count_chunks(batch: dict, i: int, mode: str, correct_only: bool, device) -> torch.Tensor:
    s = get_key(batch, f"alignment_{i}_student_chunk_id")
    t = get_key(batch, f"alignment_{i}_teacher_chunk_id")
    return chunk_units(batch, i, s.shape[0], s.shape[1], t.shape[1], mode=mode, correct_only=correct_only,
                       device=device or s.device).num_units


def _spec(name, mod, function, module, options, **kw) -> LossSpec:
    return LossSpec(name=name, function=function, module=module, options=options,
                    teacher_forms=tuple(mod.TEACHER_FORMS), **kw)


# kind -> spec; the order is the order of messages that list kinds
REGISTRY: dict[str, LossSpec] = {
    s.name: s
    for s in (
        _spec("pkl", pkl, pkl.pkl_loss, pkl.PKLLoss, pkl.PKLOptions, projection="required", unit="chunk",
              kd_ce=True),
        _spec("hkl", hybrid, hybrid.hkl_loss, hybrid.HKLLoss, hybrid.HKLOptions, projection="projection_or_common",
              unit="chunk", prepare_teacher=hybrid.prepare_hkl_teacher),
        _spec("gold", hybrid, hybrid.gold_loss, hybrid.GOLDLoss, hybrid.GOLDOptions,
              projection="projection_or_common", unit="chunk", prepare_teacher=hybrid.prepare_gold_teacher),
        _spec("uld", uld, uld.uld_loss, uld.ULDLoss, uld.ULDOptions, projection="none", unit="chunk"),
        _spec("alm", alm, alm.alm_loss, alm.ALMLoss, alm.ALMOptions, projection="none", unit="chunk"),
        _spec("kl", kl, kl.kl_loss, kl.KLLoss, kl.KLOptions, projection="none", unit="position", same_vocab=True,
              kd_ce=True),
        _spec("ce", ce, ce.ce_loss, ce.CELoss, ce.CEOptions, projection="none", unit="position"),
    )
}

# Loss modules and configs that are no kind of their own: the learned-W P-KL (trains the projection)
# and KD + CE (combines two kinds); exported beside the registry's.
VARIANT_MODULES = {"LearnedPKLLoss": learned_pkl.LearnedPKLLoss}
VARIANT_OPTIONS = {"LearnedPKLOptions": learned_pkl.LearnedPKLOptions}


def get(kind: str, *, what: str = "loss") -> LossSpec:
    """The spec of `kind`; an unknown kind raises, listing the valid ones."""
    try:
        return REGISTRY[kind]
    except (KeyError, TypeError):
        raise LossOptionError(f"{what}: kind {kind!r}: valid kinds are " + ", ".join(map(repr, REGISTRY))) from None


def kinds(predicate: Callable[[LossSpec], bool] = lambda s: True) -> tuple[str, ...]:
    return tuple(k for k, s in REGISTRY.items() if predicate(s))


def teacher_kinds() -> tuple[str, ...]:
    """Kinds that distil a teacher (every kind but CE)."""
    return kinds(lambda s: s.uses_teacher)


def cross_tokenizer_kinds() -> tuple[str, ...]:
    return kinds(lambda s: s.uses_teacher and not s.same_vocab)


def kd_kinds() -> tuple[str, ...]:
    """Kinds `kd_ce_loss` accepts as its KD term."""
    return kinds(lambda s: s.kd_ce)


def count_units(batch: dict, kind: str, *, teacher_index: int = 0, device=None, **options) -> torch.Tensor:
    """`LossSpec.count_units` of `kind` (see `units.count_units`)."""
    return get(kind, what="count_units").count_units(batch, teacher_index=teacher_index, device=device, **options)
