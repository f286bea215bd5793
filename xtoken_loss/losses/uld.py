"""ULD (loss kind `"uld"`): Universal Logit Distillation, the L1 distance between the student's and the
teacher's next-token distributions *sorted* in descending order (the shorter one zero-padded). It
needs no vocabulary relation: only the shapes of the two distributions are compared.

One comparison per valid aligned chunk (CONTRACTS §2, `units.chunk_units`). What "the chunk's
distribution" is on each side is the `chunk_form`:
- `"start"` (principled, default): the next-token distribution at the chunk start, the logit just
  before the chunk's first token. Both models have read exactly the same text there.
- `"chain"` (public ULD, `public=True`; TRL's GOLD merge): the chunk-start distribution times the
  probabilities the model gives the chunk's remaining actual tokens (chain rule); not normalised.
- `"mean_log"` (public H-KL / GOLD hybrid): `exp` of the mean over the chunk's positions of the
  log-softmax (a geometric mean; not normalised).

The chunk-unit machinery it shares with the hybrid losses (`hybrid.py`) lives in
`xtoken_loss/chunk_runner.py` (unit grouping, chunk distributions, the memory-bounded runner) and
`xtoken_loss/sorted_l1.py` (the sorted L1 with its gradient). `ChunkLossOptions`, the options all
three share, is defined here. Top-k teacher outputs (with `rest_logprob`, CONTRACTS §3): the listed
ranks plus one rest outcome on both sides, chunk form `"start"`, T = 1 (`losses/sorted_topk.py`).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossOptionError
from xtoken_loss.checks import check_chunk_inputs
from xtoken_loss.chunk_runner import prepare, run_units
from xtoken_loss.chunked import check_options
from xtoken_loss.losses.sorted_topk import uld_topk_loss
from xtoken_loss.modules import LossModule
from xtoken_loss.sorted_l1 import Workspace, sorted_l1, sorted_l1_signs
from xtoken_loss.teacher_outputs import TOPK_REST_KEYS, as_teacher_outputs
from xtoken_loss.topk import refuse_topk_options

TEACHER_FORMS = ("logits", "topk")  # top-k: the pair + rest_logprob (losses/sorted_topk.py)
ChunkForm = Literal["start", "chain", "mean_log"]


@config
class ChunkLossOptions(Config):
    """Options every chunk-unit loss (ULD, H-KL, GOLD) shares."""

    error_type = LossOptionError

    teacher_index: int = option(0, help="which teacher's batch keys (teacher_{i}_*, alignment_{i}_*) to read", min=0)
    temperature: float = option(1.0, help="softmax temperature of both models", gt=0)
    public: bool = option(False, help="reproduce the published form (its chunk form and tail cut)")
    chunk_form: ChunkForm | None = option(None, help="chunk distribution: 'start', 'chain' or 'mean_log' "
                                          "(None: the form's default)")
    tail_cut: int | None = option(None, help="keep only the largest entries of each sorted vector (None: all)",
                                  min=1)
    correct_only: bool = option(True, help="count only chunks whose pair is correct (pair_is_correct)")
    position_chunk_size: int | None = option(None, help="units per step (None: automatic from the width)", min=1)
    check_inputs: bool = option(False, help="check the inputs for NaN/inf and bad chunk ids (syncs)")

    default_form: ClassVar[str] = "start"  # the chunk form without public=True
    public_form: ClassVar[str] = "chain"  # ... and with it

    @property
    def form(self) -> str:
        """The chunk form in use (`chunk_form`, else the default of the principled or public form)."""
        if self.chunk_form is not None:
            return self.chunk_form
        return type(self).public_form if self.public else type(self).default_form

    @property
    def unit_mode(self) -> str:
        """How `units.chunk_units` turns a chunk into a unit for this form: `"start"` or `"mean"`."""
        return "start" if self.form == "start" else "mean"


@config
class ULDOptions(ChunkLossOptions):
    """Options of `uld_loss` / `ULDLoss` (public form: chunk form `"chain"`)."""


def uld_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    teacher_index: int = 0,
    normalizer=None,
    temperature: float = 1.0,
    public: bool = False,
    chunk_form: str | None = None,
    tail_cut: int | None = None,
    correct_only: bool = True,
    position_chunk_size: int | None = None,
    check_inputs: bool = False,
):
    """ULD of teacher `teacher_index`: `sum over valid chunks of L1(sort(q_c), sort(p_c)) / normalizer`.

    `chunk_form` (module doc) defaults to `"start"`, or `"chain"` with `public=True`; `tail_cut` keeps
    only the largest entries of each sorted vector (None: all). No T^2 factor (the L1 is not a KL).
    Returns `(loss, metrics)`; metrics: `uld` (mean L1 per valid chunk).
    """
    o = check_options(ULDOptions, teacher_index=teacher_index, temperature=temperature, public=public,
                      chunk_form=chunk_form, tail_cut=tail_cut, correct_only=correct_only,
                      position_chunk_size=position_chunk_size, check_inputs=check_inputs)
    T, form = float(temperature), o.form
    teacher_outputs = as_teacher_outputs(teacher_outputs, loss="uld", accepts=TEACHER_FORMS, needs=TOPK_REST_KEYS)
    if teacher_outputs.form == "topk":
        refuse_topk_options("uld", temperature=temperature, public=public, chunk_form=chunk_form, tail_cut=tail_cut)
        return uld_topk_loss(student_logits, teacher_outputs, batch, teacher_index=teacher_index,
                             normalizer=normalizer, correct_only=correct_only, check_inputs=check_inputs)
    normalizer = check_chunk_inputs("uld", student_logits, teacher_outputs.logits, batch, teacher_index, normalizer,
                                    correct_only=correct_only, student_ids=form == "chain", teacher_ids=form == "chain")
    zt, units = prepare(student_logits, teacher_outputs, batch, loss_name="uld", teacher_index=teacher_index,
                        correct_only=correct_only, check_inputs=check_inputs, form=form)

    def unit_fn(log_q, log_p):
        l1 = sorted_l1(torch.exp(log_q), torch.exp(log_p), tail_cut)
        return l1, {"uld": l1}

    work = Workspace()

    def row_fn(zs, zt, want_grad, mx_s, mx_t):
        # the "start" form on logit rows (in place): dz = q (sigma - <q, sigma>) / T, sigma = d L1 / d q
        q, p = _softmax_(zs, mx_s, T), _softmax_(zt, mx_t, T)
        l1, g = sorted_l1_signs(q, p, want_grad, tail_cut, work=work, overwrite_t=True)
        if want_grad:
            c = torch.linalg.vecdot(q, g)[:, None]
            g = g.sub_(c).mul_(q)
            if T != 1.0:
                g.mul_(1.0 / T)
        return l1, g, {"uld": l1}

    return run_units(student_logits, zt, units, batch, teacher_index, unit_fn, form=form, temperature=T,
                     normalizer=normalizer, position_chunk_size=position_chunk_size, metric_names=("uld",),
                     row_fn=row_fn)


def _softmax_(z: torch.Tensor, mx: torch.Tensor, T: float) -> torch.Tensor:
    """`softmax(z / T)` in place, given the row maxima `mx` (rows without a finite maximum are
    poisoned by the runner; here they only must not fail)."""
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    z.sub_(mx[:, None])
    if T != 1.0:
        z.mul_(1.0 / T)
    z.exp_()
    s = z.sum(dim=1)
    return z.mul_(torch.where(s > 0, 1.0 / s, torch.zeros_like(s))[:, None])


class ULDLoss(LossModule):
    """`uld_loss` with fixed options."""

    function = staticmethod(uld_loss)
    options_type = ULDOptions

    def __init__(self, *, teacher_index: int = 0, temperature: float = 1.0, public: bool = False,
                 chunk_form: str | None = None, tail_cut: int | None = None, correct_only: bool = True,
                 position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, public=public, chunk_form=chunk_form,
                         tail_cut=tail_cut, correct_only=correct_only, position_chunk_size=position_chunk_size,
                         check_inputs=check_inputs)
