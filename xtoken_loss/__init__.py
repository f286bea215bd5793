"""xtoken_loss: framework-agnostic distillation losses that consume xtoken projection artifacts.

The loss functions never import `xtoken_align`: they read the artifact format themselves.

Every loss has the CONTRACTS §5 shape
`loss_fn(student_logits, teacher_outputs, batch, *, normalizer=None, **options) -> (loss, metrics)`
and a thin `nn.Module` wrapper with the same argument order. Formulas: docs/losses.md.
"""

from xtoken_loss.losses.ce import ce_loss
from xtoken_loss.losses.combine import combine_losses, kd_ce_loss
from xtoken_core.errors import LossInputError, LossOptionError, ProjectionArtifactError, XTokenLossError
from xtoken_loss.losses.kl import kl_loss
from xtoken_loss.modules import CELoss, KDCELoss, KLLoss, PKLLoss
from xtoken_loss.losses.alm import alm_loss
from xtoken_loss.losses.hybrid import gold_loss, hkl_loss
from xtoken_loss.losses.learned_pkl import LearnedPKLLoss, LearnedProjection, learned_pkl_loss
from xtoken_loss.modules_extra import EXTRA_LOSSES, ALMLoss, GOLDLoss, HKLLoss, ULDLoss
from xtoken_loss.multi_teacher.aggregate import MultiTeacherConfig, MultiTeacherLoss, multi_teacher_loss
from xtoken_loss.losses.pkl import pkl_loss
from xtoken_loss.projection import Projection, load_projection
from xtoken_loss.multi_teacher.teachers import TeacherSpec, build_teachers
from xtoken_loss.losses.uld import uld_loss
from xtoken_loss.teacher_outputs import TeacherOutputs
from xtoken_loss.units import count_units

from xtoken_core import __version__  # noqa: E402  (one place: the installed metadata)

# Loss kind (CONTRACTS §5 name) -> function.
LOSSES = {"pkl": pkl_loss, "kl": kl_loss, "ce": ce_loss, **EXTRA_LOSSES}

__all__ = [
    "ALMLoss",
    "CELoss",
    "GOLDLoss",
    "HKLLoss",
    "LearnedPKLLoss",
    "LearnedProjection",
    "MultiTeacherConfig",
    "MultiTeacherLoss",
    "TeacherOutputs",
    "TeacherSpec",
    "ULDLoss",
    "alm_loss",
    "build_teachers",
    "gold_loss",
    "hkl_loss",
    "learned_pkl_loss",
    "multi_teacher_loss",
    "uld_loss",
    "KDCELoss",
    "KLLoss",
    "LOSSES",
    "LossInputError",
    "LossOptionError",
    "PKLLoss",
    "Projection",
    "ProjectionArtifactError",
    "XTokenLossError",
    "__version__",
    "ce_loss",
    "combine_losses",
    "count_units",
    "kd_ce_loss",
    "kl_loss",
    "load_projection",
    "pkl_loss",
]
