"""P-KL (loss kind `"pkl"`): cross-tokenizer KD through the sparse projection W (student -> teacher).

Student probabilities are projected into the teacher vocabulary, `q = softmax(z_s / T) W`, and compared
with the teacher's `softmax(z_t / T)` per aligned chunk, on a batch-wide set S of teacher columns.
Two forms (docs/losses.md has the formulas and the reasons):

Principled (default, `public=False`)
- One comparison per valid chunk, at the chunk *start*: the student logit just before the chunk's
  first student token and the teacher logit just before its first teacher token. Both models have
  read exactly the same text there, so their next-token distributions are comparable.
- Both distributions live on the teacher columns W can reach (the projection's image): the teacher is
  renormalised over them, the student over its mapped mass (rows W maps). They are compared on S plus
  one *rest* outcome (the reachable columns outside S), so the value is a true KL between two
  distributions: >= 0, and 0 exactly when they agree on S and on the rest.
- S: the `top_k_columns` reachable columns with the highest teacher log-probability at any counted
  position (padding never counts), max-reduced over `process_group` so every rank picks the same S.
Public (`public=True`): NeMo-RL's published P-KL, its defaults included (`losses/public.py`)
- Chunk distributions averaged over every position whose next token is in the chunk: the student's
  projected probabilities arithmetically (then renormalised over S, `log(Q / (sum Q + eps) + eps)`),
  the teacher's log-softmax over S only (a geometric mean, not renormalised), so the "KL" can be
  negative. Every valid chunk counts, correct or not (`correct_only=None`).
- S: top `top_k_columns` columns by raw teacher logit over *all* positions, padding included, of the
  teacher logits cut to the projection's teacher vocabulary.

Both: sum over valid chunks of `T^2 * KL`, divided by `normalizer` (default: the number of valid
chunks). Teacher outputs are treated as constants (no gradient).
"""

from __future__ import annotations

from typing import Literal

import torch

from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.batch_tokenizers import check_batch_tokenizers
from xtoken_loss.checks import check_chunk_inputs
from xtoken_loss.chunked import (
    attach_grad,
    check_options,
    coarse_divergence,
    compute_dtype,
    exp_rows,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
)
from xtoken_loss.losses.public import public_pkl
from xtoken_loss.modules import LossModule
from xtoken_loss.projection import (
    as_projection,
    reduce_column_scores,
    restrict_projection,
    top_columns,
)
from xtoken_loss.teacher_outputs import as_teacher_outputs
from xtoken_loss.units import check_chunk_ids, check_finite, chunk_units

DEFAULT_TOP_K_COLUMNS = 8192
TEACHER_FORMS = ("logits",)


@config
class PrincipledPKLOptions(Config):
    """The options of the principled P-KL (shared with the learned-W P-KL, `learned_pkl.py`)."""

    error_type = LossOptionError

    teacher_index: int = option(0, help="which teacher's batch keys (teacher_{i}_*, alignment_{i}_*) to read", min=0)
    temperature: float = option(1.0, help="softmax temperature of both models", gt=0)
    direction: Literal["forward", "reverse"] = option("forward", help="'forward' KL(teacher || student) or "
                                                      "'reverse' KL(student || teacher)")
    top_k_columns: int | None = option(DEFAULT_TOP_K_COLUMNS, help="teacher columns compared (None: every "
                                       "reachable column)", min=1)
    correct_only: bool = option(True, help="count only chunks whose pair is correct (pair_is_correct)")
    position_chunk_size: int | None = option(None, help="rows per step (None: automatic from the width)", min=1)
    check_inputs: bool = option(False, help="check the inputs for NaN/inf and bad chunk ids (syncs)")

    @property
    def unit_mode(self) -> str:
        """`units.chunk_units` mode: one unit per chunk start."""
        return "start"


@config
class PKLOptions(PrincipledPKLOptions):
    """Options of `pkl_loss` / `PKLLoss` (module doc); the projection and `columns` are passed beside."""

    correct_only: bool | None = option(None, help="count only chunks whose pair is correct (pair_is_correct); None: "
                                       "yes, except with public=True (NeMo-RL counts every valid chunk)")
    public: bool = option(False, help="NeMo-RL's published P-KL, its defaults included (docs/losses.md)")
    public_eps: float = option(1e-10, help="public form: the eps of log(Q / (sum Q + eps) + eps)", gt=0)

    @property
    def only_correct(self) -> bool:
        """`correct_only` resolved: its value, else True (principled) / False (public)."""
        return (not self.public) if self.correct_only is None else self.correct_only

    @property
    def unit_mode(self) -> str:
        """`units.chunk_units` mode: chunk starts (principled) or every position of the chunk (public)."""
        return "mean" if self.public else "start"


def pkl_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    projection,
    teacher_index: int = 0,
    normalizer=None,
    temperature: float = 1.0,
    direction: str = "forward",
    top_k_columns: int | None = DEFAULT_TOP_K_COLUMNS,
    columns: torch.Tensor | None = None,
    public: bool = False,
    correct_only: bool | None = None,
    process_group=None,
    position_chunk_size: int | None = None,
    public_eps: float = 1e-10,
    check_inputs: bool = False,
):
    """P-KL of teacher `teacher_index` (module doc). Returns `(loss, metrics)`.

    `projection`: a `Projection` (see `load_projection`), an artifact directory, or
    `(indices, weights)`. `top_k_columns=None` uses every reachable teacher column (exact, slower);
    `columns` fixes the teacher column set instead of choosing it. `direction="reverse"` gives
    KL(student || teacher). `correct_only` (None: True, with `public=True` False) counts only the
    chunks whose pair is correct. Metrics (means over valid chunks): `kl` (without
    T^2), `teacher_mass_in_columns`; principled form also `teacher_reachable_mass` and
    `student_mapped_mass`.
    """
    o = check_options(PKLOptions, teacher_index=teacher_index, temperature=temperature, direction=direction,
                      top_k_columns=top_k_columns, public=public, correct_only=correct_only,
                      position_chunk_size=position_chunk_size, public_eps=public_eps, check_inputs=check_inputs)
    correct_only = o.only_correct
    T = float(temperature)
    zt = as_teacher_outputs(teacher_outputs, loss="pkl", accepts=TEACHER_FORMS).logits
    proj = as_projection(projection, student_logits.device)
    check_batch_tokenizers(proj, batch, teacher_index, loss="pkl")  # a batch for other tokenizers: say so first
    normalizer = check_chunk_inputs("pkl", student_logits, zt, batch, teacher_index, normalizer,
                                    correct_only=correct_only)
    if public:
        return public_pkl(student_logits, zt, batch, projection=proj, teacher_index=teacher_index,
                          normalizer=normalizer, temperature=temperature, direction=direction,
                          top_k_columns=top_k_columns, columns=columns, correct_only=correct_only,
                          process_group=process_group, position_chunk_size=position_chunk_size, eps=public_eps,
                          check_inputs=check_inputs)
    if student_logits.dim() != 3 or zt.dim() != 3:
        raise LossInputError(
            f"pkl: student logits {tuple(student_logits.shape)} and teacher logits {tuple(zt.shape)} must be [B, T, V]"
        )
    B, Ls, Vs = student_logits.shape
    if zt.shape[0] != B:
        raise LossInputError(f"pkl: teacher logits batch size {zt.shape[0]} != student batch size {B}")
    Lt, Vt = zt.shape[1], zt.shape[2]
    dev = student_logits.device
    proj.check_widths(Vs, Vt)
    if check_inputs:
        check_finite("student_logits", student_logits)
        check_finite("teacher logits", zt)
        check_chunk_ids(batch, teacher_index)
    units = chunk_units(batch, teacher_index, B, Ls, Lt, mode="start", correct_only=correct_only, device=dev)
    cdt = compute_dtype(student_logits.dtype)
    norm = resolve_normalizer(normalizer, units.num_units, cdt)
    zs_flat = student_logits.reshape(B * Ls, Vs)
    zt_flat = zt.reshape(B * Lt, Vt)
    n = rows_per_chunk(position_chunk_size, max(Vs, Vt))
    want_grad = needs_grad(student_logits)
    args = (zs_flat, zt_flat, units, proj, norm, T, n, want_grad, cdt)
    with torch.no_grad():
        total, grad, metrics = _principled(*args, top_k_columns, columns, process_group, direction)
    count = units.num_units.to(cdt).clamp_min(1)
    metrics = {k: (v / count).detach() for k, v in metrics.items()}
    loss = total * (T * T) / norm
    return attach_grad(student_logits, loss, grad.view(B, Ls, Vs) if grad is not None else None), metrics


def _principled(zs_flat, zt_flat, units, proj, norm, T, n, want_grad, cdt, top_k, columns, group, direction):
    """One comparison per chunk start. Both passes walk contiguous row slices (views, no gathers):
    the teacher once for normalisers, reachable mass and column scores, then the student once,
    computing loss and gradient together and writing the gradient rows in place."""
    dev = zs_flat.device
    Ns, Vs = zs_flat.shape
    Nt, Vt = zt_flat.shape
    srows, trows = units.student_rows, units.teacher_rows
    U = srows.shape[0]
    reach = proj.reachable_columns(Vt)  # [V_t]
    t_is_unit = torch.zeros(Nt, dtype=cdt, device=dev)
    t_is_unit[trows] = 1.0

    # Teacher pass: log-normaliser, log of the reachable mass, and each column's max probability.
    sums_t = torch.stack([torch.ones(Vt, dtype=cdt, device=dev), reach.to(cdt)], dim=1)  # [V_t, 2]
    lse_all = torch.zeros(Nt, dtype=cdt, device=dev)
    log_mass_all = torch.zeros(Nt, dtype=cdt, device=dev)
    scores = torch.zeros(Vt, dtype=cdt, device=dev)
    slices = _slices_with_rows(t_is_unit > 0, n)
    tbuf = torch.empty(min(n, Nt), Vt, dtype=cdt, device=dev) if slices else None
    for r0, r1 in slices:
        e, mx = exp_rows(zt_flat[r0:r1], T, out=tbuf[: r1 - r0])
        sums = e @ sums_t  # [m, 2]: total and reachable mass
        lse_all[r0:r1] = mx / T + torch.log(sums[:, 0])
        log_mass_all[r0:r1] = torch.log(sums[:, 1]) - torch.log(sums[:, 0])
        if columns is None:
            e.mul_((t_is_unit[r0:r1] / sums[:, 0])[:, None])  # probabilities, 0 on rows that are no unit
            torch.maximum(scores, e.amax(dim=0), out=scores)
    del tbuf
    if columns is not None:
        cols = torch.as_tensor(columns, dtype=torch.int64, device=dev)
        cols = torch.unique(cols[(cols >= 0) & (cols < Vt)])
        cols = cols[reach[cols]]
    else:
        log_scores = torch.where(reach & (scores > 0), torch.log(scores), torch.full_like(scores, float("-inf")))
        log_scores = reduce_column_scores(log_scores, group)
        cols = top_columns(log_scores, top_k)
    restr = restrict_projection(proj, cols, Vs, Vt, cdt)
    rest_empty = cols.shape[0] == int(reach.sum())
    floor = cols.shape[0] * torch.finfo(cdt).eps
    k, E = cols.shape[0], restr.entry_rows.shape[0]
    sums_s = torch.stack([torch.ones(Vs, dtype=cdt, device=dev), restr.rest_weights], dim=1)  # [V_s, 2]
    odd = restr.odd_rows
    r_odd = restr.rest_weights[odd]

    unit_of = torch.full((Ns,), -1, dtype=torch.int64, device=dev)
    unit_of[srows] = torch.arange(U, device=dev)
    grad = torch.empty_like(zs_flat) if want_grad else None
    direct = want_grad and grad.dtype == cdt
    zero = torch.zeros((), dtype=cdt, device=dev)
    total, m_in, m_mapped = zero.clone(), zero.clone(), zero.clone()
    s_slices = _slices_with_rows(unit_of >= 0, n)
    if want_grad:
        _zero_outside(grad, s_slices)
    sbuf = torch.empty(min(n, Ns), Vs, dtype=cdt, device=dev) if s_slices and not direct else None
    for r0, r1 in s_slices:
        m = r1 - r0
        uid = unit_of[r0:r1]
        w = uid >= 0
        uid = uid.clamp(min=0)
        e, _ = exp_rows(zs_flat[r0:r1], T, out=grad[r0:r1] if direct else sbuf[:m])  # [m, V_s]
        sums = e @ sums_s  # [m, 2]: total mass, mass W sends to the rest
        inv_s = 1.0 / sums[:, 0]
        pe = e[:, restr.entry_rows] * restr.entry_weights  # [m, E]
        a = torch.zeros(m, k, dtype=cdt, device=dev).scatter_add_(1, restr.entry_slots.expand(m, E), pe)
        a_aug = torch.cat([a, sums[:, 1:2]], dim=1) * inv_s[:, None]  # projected student masses on S + rest
        # teacher log-probabilities on S and the rest, renormalised over the reachable columns
        t_r = trows[uid]
        log_p_s = zt_flat[t_r[:, None], cols[None, :]].to(cdt) / T - (lse_all[t_r] + log_mass_all[t_r])[:, None]
        p_s_sum = torch.exp(log_p_s).sum(dim=1)
        p_rest = 1.0 - p_s_sum  # below the rounding floor of that difference it is 0
        p_rest = torch.where((p_rest > floor) & (not rest_empty), p_rest, torch.zeros_like(p_rest))
        log_p = torch.cat([log_p_s, torch.log(p_rest)[:, None]], dim=1)
        kl, d_a = coarse_divergence(a_aug, log_p, direction)  # [m], [m, k + 1]
        total += torch.where(w, kl, zero).sum()
        m_in += torch.where(w, p_s_sum, zero).sum()
        m_mapped += torch.where(w, a_aug.sum(dim=1), zero).sum()
        if want_grad:
            # grad = (T / norm) p * (g - <p, g>), g_v = r_v d_rest + sum_k W[v, k] d_k, p = e / s
            scale = torch.where(w, (T / norm) * inv_s, zero)  # [m]
            d_rest = d_a[:, -1]
            c = (a_aug * d_a).sum(dim=1)
            alpha, beta = scale * d_rest, -scale * c
            e_odd = e[:, odd]
            e.mul_((alpha + beta)[:, None])  # right for every row whose rest weight is 1
            e[:, odd] = e_odd * (alpha[:, None] * r_odd + beta[:, None])
            e.scatter_add_(1, restr.entry_rows.expand(m, E), pe * (d_a[:, restr.entry_slots] * scale[:, None]))
            if not direct:
                grad[r0:r1] = e
    metrics = {
        "kl": total.clone(),
        "teacher_mass_in_columns": m_in,
        "teacher_reachable_mass": torch.exp(log_mass_all[trows]).sum(),
        "student_mapped_mass": m_mapped,
    }
    return total, grad, metrics


def _slices_with_rows(has_unit: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """Contiguous row slices of at most n rows, skipping slices with no unit row (one host sync)."""
    N = has_unit.shape[0]
    starts = list(range(0, N, n))
    if not starts:
        return []
    pad = torch.zeros(len(starts) * n, dtype=torch.bool, device=has_unit.device)
    pad[:N] = has_unit
    keep = pad.view(len(starts), n).any(dim=1).tolist()
    return [(r0, min(r0 + n, N)) for r0, k in zip(starts, keep) if k]


def _zero_outside(grad: torch.Tensor, slices) -> None:
    """Zero the gradient rows no slice will write."""
    r = 0
    for r0, r1 in slices:
        if r0 > r:
            grad[r:r0].zero_()
        r = r1
    if r < grad.shape[0]:
        grad[r:].zero_()


class PKLLoss(LossModule):
    """`pkl_loss` with fixed options. `projection`: a `Projection`, an artifact directory, or
    `(indices, weights)`, loaded once and kept as non-persistent buffers (moved by `.to()`)."""

    function = staticmethod(pkl_loss)
    options_type = PKLOptions

    def __init__(self, projection, *, teacher_index: int = 0, temperature: float = 1.0, direction: str = "forward",
                 top_k_columns: int | None = DEFAULT_TOP_K_COLUMNS, columns: torch.Tensor | None = None,
                 public: bool = False, correct_only: bool | None = None, process_group=None,
                 position_chunk_size: int | None = None, public_eps: float = 1e-10, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, direction=direction,
                         top_k_columns=top_k_columns, columns=columns, public=public, correct_only=correct_only,
                         process_group=process_group, position_chunk_size=position_chunk_size,
                         public_eps=public_eps, check_inputs=check_inputs)
        self.register_artifact("projection", as_projection(projection, "cpu"))

    @property
    def projection(self):
        return self.artifact("projection")
