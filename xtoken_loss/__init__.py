"""xtoken_loss: framework-agnostic distillation losses that consume xtoken projection artifacts.

The loss functions never import `xtoken_align` (nor numba or scipy): the artifact format they read
lives in `xtoken_core`.

Every loss has the CONTRACTS §5 shape
`loss_fn(student_logits, teacher_outputs, batch, *, normalizer=None, **options) -> (loss, metrics)`,
an options config and a thin `nn.Module` with the same argument order; `registry.REGISTRY` lists
them by kind. Formulas: docs/losses.md.
"""

# ruff: noqa: F401  (the imports are the public surface; `__all__` is computed from the registry below)

from xtoken_core import __version__  # one place: the installed metadata
from xtoken_core.errors import LossInputError, LossOptionError, ProjectionArtifactError, XTokenLossError
from xtoken_loss.losses.alm import ALMLoss, ALMOptions, alm_loss
from xtoken_loss.losses.ce import CELoss, CEOptions, ce_loss
from xtoken_loss.losses.combine import KDCELoss, KDCEOptions, combine_losses, kd_ce_loss
from xtoken_loss.losses.hybrid import GOLDLoss, GOLDOptions, HKLLoss, HKLOptions, gold_loss, hkl_loss
from xtoken_loss.losses.kl import KLLoss, KLOptions, kl_loss
from xtoken_loss.losses.learned_pkl import LearnedPKLLoss, LearnedPKLOptions, LearnedProjection, learned_pkl_loss
from xtoken_loss.losses.pkl import PKLLoss, PKLOptions, pkl_loss
from xtoken_loss.losses.uld import ULDLoss, ULDOptions, uld_loss
from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig, MultiTeacherLoss, multi_teacher_loss
from xtoken_loss.multi_teacher.teachers import TeacherSpec, build_teachers
from xtoken_loss.projection import Projection, load_projection
from xtoken_loss.registry import REGISTRY, LossSpec
from xtoken_loss.teacher_outputs import TeacherOutputs
from xtoken_loss.units import count_units

# Loss kind (CONTRACTS §5 name) -> function.
LOSSES = {kind: spec.function for kind, spec in REGISTRY.items()}


def _public_names() -> list[str]:
    per_kind = [obj.__name__ for spec in REGISTRY.values() for obj in (spec.function, spec.module, spec.options)]
    others = [
        # beside the kinds: the learned-W P-KL and KD + CE
        "LearnedPKLLoss", "LearnedPKLOptions", "LearnedProjection", "learned_pkl_loss",
        "KDCELoss", "KDCEOptions", "combine_losses", "kd_ce_loss",
        # the registry and unit counts
        "LOSSES", "REGISTRY", "LossSpec", "count_units",
        # multi-teacher
        "MultiTeacherConfig", "MultiTeacherLoss", "TeacherSpec", "build_teachers", "multi_teacher_loss",
        # teacher outputs and projection artifacts
        "TeacherOutputs", "Projection", "load_projection",
        # errors
        "LossInputError", "LossOptionError", "ProjectionArtifactError", "XTokenLossError",
        "__version__",
    ]
    return sorted(set(per_kind) | set(others))


__all__ = _public_names()
