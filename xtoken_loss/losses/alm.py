"""ALM (loss kind `"alm"`): Approximate Likelihood Matching (Minixhofer et al.). No vocabulary relation is
needed: each model is scored on the text itself.

For each valid aligned chunk c (`units.chunk_units`, mode "mean": the next-token positions whose next
token lies in c), the chain rule gives each side's log-likelihood of the chunk's own tokens:
`l_s(c) = sum_p log softmax(z_s[p])[y_s(p + 1)]`, `l_t(c)` likewise (from the teacher's logits, or
from `target_logprob` with top-k teacher outputs). With a temperature tau (default 100) and
`a = l / tau - eps` (eps = 1e-6 keeps a < 0), `p = exp(a)`, the chunk loss is a divergence between
the two-outcome distributions (p_t, 1 - p_t) and (p_s, 1 - p_s):
- `"bce"` (tokenkit's default): `-[p_t log p_s + (1 - p_t) log(1 - p_s)]`;
- `"kl"`: `p_t (a_t - a_s) + (1 - p_t) (log(1 - p_t) - log(1 - p_s))`, 0 at l_s = l_t.
Both are minimised over l_s exactly at l_s = l_t (BCE = KL + the teacher's binary entropy).

Debiasing (`debias_gamma`, paper 0.1; off by default). `l(c)` is the probability of the chunk's
*tokens*; it equals the probability of the chunk's *bytes* only when no token of that model would
run across the chunk's end. A chunk is kept only when its end is likely a token boundary: the
probability, at the chunk's last token, that the next token starts a new piece (the mass on the
caller's `teacher_boundary_tokens` / `student_boundary_tokens`, e.g. tokens whose bytes start with
whitespace, and end-of-text tokens) is at least gamma on each side given. A chunk that ends its
sample is always kept (the text ends there). With top-k teacher outputs the teacher's boundary mass
is summed over the listed tokens (a lower bound). Dropped chunks do not count as units.

Sum over kept chunks / `normalizer` (default: the number of kept chunks). Teacher is a constant.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from xtoken_core.config import Config, config, option
from xtoken_core.errors import LossInputError, LossOptionError
from xtoken_loss.checks import (
    check_chunk_inputs,
    check_finite_rows,
    check_key,
    check_logits,
    nonfinite,
    poison,
)
from xtoken_loss.chunked import (
    attach_grad,
    check_options,
    compute_dtype,
    needs_grad,
    resolve_normalizer,
    rows_per_chunk,
    softmax_rows,
)
from xtoken_loss.modules import LossModule
from xtoken_loss.teacher_outputs import TOPK_KEYS, as_teacher_outputs
from xtoken_loss.units import check_chunk_ids, chunk_units, next_token_mask

DEFAULT_TAU = 100.0
TEACHER_FORMS = ("logits", "topk")  # top-k: `target_logprob` (+ the top-k pair when debiasing the teacher)


@config
class ALMOptions(Config):
    """Options of `alm_loss` / `ALMLoss` (module doc)."""

    error_type = LossOptionError

    teacher_index: int = option(0, help="which teacher's batch keys (teacher_{i}_*, alignment_{i}_*) to read", min=0)
    tau: float = option(DEFAULT_TAU, help="temperature of the chunk likelihoods (p = exp(l / tau - eps))", gt=0)
    divergence: Literal["bce", "kl"] = option("bce", help="binary divergence: 'bce' (tokenkit) or 'kl'")
    debias_gamma: float | None = option(None, help="keep a chunk only when its end is a likely token boundary "
                                        "(paper: 0.1; None: off)", min=0, max=1)
    teacher_boundary_tokens: Any | None = option(None, help="teacher ids (or a bool mask) that start a new piece",
                                                 cli=False)
    student_boundary_tokens: Any | None = option(None, help="student ids (or a bool mask) that start a new piece",
                                                 cli=False)
    correct_only: bool = option(True, help="count only chunks whose pair is correct (pair_is_correct)")
    eps: float = option(1e-6, help="keeps l / tau - eps < 0")
    position_chunk_size: int | None = option(None, help="rows per step (None: automatic from the width)", min=1)
    check_inputs: bool = option(False, help="check the inputs for NaN/inf and bad chunk ids (syncs)")

    def check(self) -> None:
        if self.debias_gamma is not None and self.teacher_boundary_tokens is None and (
            self.student_boundary_tokens is None
        ):
            raise self.fail(
                "alm: debias_gamma needs teacher_boundary_tokens and/or student_boundary_tokens (ids or a bool mask "
                "of the tokens that start a new piece, e.g. those whose bytes begin with whitespace, and EOS)"
            )

    @property
    def unit_mode(self) -> str:
        """`units.chunk_units` mode: every position of the chunk (the chain rule over its tokens)."""
        return "mean"


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(a))` for a < 0, stable at both ends (and with finite gradients in both branches)."""
    small = a < -math.log(2.0)
    a1 = torch.where(small, a, torch.full_like(a, -1.0))
    a2 = torch.where(small, torch.full_like(a, -0.1), a)
    return torch.where(small, torch.log1p(-torch.exp(a1)), torch.log(-torch.expm1(a2)))


def binary_divergence(l_t: torch.Tensor, l_s: torch.Tensor, tau: float, divergence: str = "bce",
                      eps: float = 1e-6) -> torch.Tensor:
    """Per chunk: the divergence between (p_t, 1 - p_t) and (p_s, 1 - p_s), p = exp(l / tau - eps)."""
    a_t = l_t.clamp(max=0.0) / tau - eps
    a_s = l_s.clamp(max=0.0) / tau - eps
    p_t = torch.exp(a_t)
    if divergence == "bce":
        return -(p_t * a_s + (1.0 - p_t) * log1mexp(a_s))
    return p_t * (a_t - a_s) + (1.0 - p_t) * (log1mexp(a_t) - log1mexp(a_s))


def _boundary_mask(tokens, width: int, device, name: str) -> torch.Tensor:
    """A `[width]` bool mask from a bool mask or a list of ids."""
    t = torch.as_tensor(tokens, device=device)
    if t.dtype == torch.bool:
        if t.shape[0] > width:
            raise LossInputError(f"alm: {name} is a mask of {t.shape[0]} entries, wider than the logits ({width})")
        return torch.nn.functional.pad(t, (0, width - t.shape[0]))
    t = t.to(torch.int64).flatten()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= width):
        raise LossInputError(f"alm: {name} holds ids outside [0, {width - 1}]")
    out = torch.zeros(width, dtype=torch.bool, device=device)
    out[t] = True
    return out


def alm_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    teacher_index: int = 0,
    normalizer=None,
    tau: float = DEFAULT_TAU,
    divergence: str = "bce",
    debias_gamma: float | None = None,
    teacher_boundary_tokens=None,
    student_boundary_tokens=None,
    correct_only: bool = True,
    eps: float = 1e-6,
    position_chunk_size: int | None = None,
    check_inputs: bool = False,
):
    """ALM of teacher `teacher_index` (module doc). Returns `(loss, metrics)`; metrics (means per kept
    chunk): `alm`, `student_chunk_logprob`, `teacher_chunk_logprob`, and `kept_fraction` (kept / valid
    chunks, debiasing)."""
    check_options(ALMOptions, teacher_index=teacher_index, tau=tau, divergence=divergence, debias_gamma=debias_gamma,
                  teacher_boundary_tokens=teacher_boundary_tokens, student_boundary_tokens=student_boundary_tokens,
                  correct_only=correct_only, eps=eps, position_chunk_size=position_chunk_size,
                  check_inputs=check_inputs)
    tau = float(tau)
    debias_teacher = debias_gamma is not None and teacher_boundary_tokens is not None
    teacher = as_teacher_outputs(teacher_outputs, loss="alm", accepts=TEACHER_FORMS,
                                 needs=("target_logprob",) + (TOPK_KEYS if debias_teacher else ()))
    form = teacher.form
    t_main = teacher.logits if form == "logits" else teacher.target_logprob
    check_logits("alm", "student_logits", student_logits)
    B, Ls, Vs = student_logits.shape
    if t_main.shape[0] != B or t_main.dim() != (3 if form == "logits" else 2):
        raise LossInputError(
            f"alm: teacher {'logits' if form == 'logits' else 'target_logprob'} shape {tuple(t_main.shape)} does not "
            f"fit batch size {B} ([B, T_t, V_t] logits or [B, T_t] target_logprob)"
        )
    Lt = t_main.shape[1]
    i = teacher_index
    normalizer = check_chunk_inputs("alm", student_logits, t_main if form == "logits" else None, batch, i, normalizer,
                                    correct_only=correct_only, student_ids=True, teacher_ids=form == "logits")
    check_key("alm", batch, f"alignment_{i}_teacher_chunk_id", (B, Lt))
    dev = student_logits.device
    cdt = compute_dtype(student_logits.dtype)
    ids_s = batch["input_ids"].to(dev).reshape(-1)
    if dev.type != "cpu":
        ids_s = ids_s.clamp(0, Vs - 1)  # out-of-range ids poison the loss (the normaliser carries the flag)
    if check_inputs:
        check_chunk_ids(batch, i)
    units = chunk_units(batch, i, B, Ls, Lt, mode="mean", correct_only=correct_only, device=dev)
    U = units.student_count.shape[0]
    n = rows_per_chunk(position_chunk_size, Vs)
    if check_inputs:  # the rows the loss reads
        check_finite_rows("alm", "student_logits", student_logits, units.student_rows)
        if form == "logits":
            check_finite_rows("alm", "teacher logits", t_main, units.teacher_rows)
        else:
            check_finite_rows("alm", "target_logprob", t_main[..., None], units.teacher_rows)
    bad = torch.zeros((), dtype=torch.bool, device=dev)  # a read row is not finite (no sync)

    # Teacher: l_t per unit (and the boundary mass at each unit's last token).
    tr, tu = units.teacher_rows, units.teacher_unit
    if form == "logits":
        Vt = t_main.shape[2]
        zt = t_main.reshape(B * Lt, Vt)
        ids_t = batch[f"teacher_{i}_input_ids"].to(dev).reshape(-1)
        if dev.type != "cpu":
            ids_t = ids_t.clamp(0, Vt - 1)
        t_lp = torch.empty(tr.shape[0], dtype=cdt, device=dev)
        with torch.no_grad():
            for r0 in range(0, tr.shape[0], n):
                rows = tr[r0 : r0 + n]
                z = zt[rows].to(cdt)
                lse = torch.logsumexp(z, dim=1)
                bad |= nonfinite(lse)  # NaN, +inf or all -inf in a read row
                t_lp[r0 : r0 + n] = z.gather(1, ids_t[rows + 1][:, None]).squeeze(1) - lse
    else:
        t_lp = t_main.reshape(-1).to(cdt)[tr]
        bad |= torch.isnan(t_lp).any() | (t_lp == float("inf")).any()
    l_t = torch.zeros(U, dtype=cdt, device=dev).index_add_(0, tu, t_lp)

    # Debiasing: which units to keep.
    keep = torch.ones(U, dtype=torch.bool, device=dev)
    if debias_gamma is not None:
        gamma = float(debias_gamma)
        if teacher_boundary_tokens is not None:
            ok, t_bad = _teacher_boundary_ok(teacher, form, t_main, batch, units, teacher_boundary_tokens,
                                             gamma, i, B, Lt, n, cdt)
            keep &= ok
            bad |= t_bad
        if student_boundary_tokens is not None:
            mask = _boundary_mask(student_boundary_tokens, Vs, dev, "student_boundary_tokens")
            q, has_next = _last_rows(units.student_rows, units.student_unit, U, next_token_mask(batch, B, Ls, "", dev))
            mass = _mass_at(student_logits.reshape(B * Ls, Vs), q, mask, n, cdt)
            keep &= ~has_next | (mass >= gamma)
            bad |= (has_next & torch.isnan(mass)).any()  # a broken boundary row must not just drop its chunk
    num_units = keep.sum()
    norm = resolve_normalizer(normalizer, num_units, cdt)

    # Student pass 1: per-row softmax (kept in the gradient buffer) and target log-probability.
    sr, su = units.student_rows, units.student_unit
    zs = student_logits.reshape(B * Ls, Vs)
    want_grad = needs_grad(student_logits)
    grad = torch.zeros_like(zs) if want_grad else None
    tgt = ids_s[sr + 1]
    s_lp = torch.empty(sr.shape[0], dtype=cdt, device=dev)
    with torch.no_grad():
        for r0 in range(0, sr.shape[0], n):
            rows = sr[r0 : r0 + n]
            z = zs[rows]
            p, lse = softmax_rows(z, 1.0)
            bad |= nonfinite(lse)
            s_lp[r0 : r0 + n] = z.gather(1, tgt[r0 : r0 + n, None]).squeeze(1).to(cdt) - lse
            if want_grad:
                grad.index_copy_(0, rows, p.to(grad.dtype))
    l_s = torch.zeros(U, dtype=cdt, device=dev).index_add_(0, su, s_lp)

    # The chunk divergences and d loss / d l_s.
    with torch.enable_grad():
        ls_var = l_s.detach().requires_grad_(True)
        div = binary_divergence(l_t, ls_var, tau, divergence, eps)
        div = torch.where(keep, div, torch.zeros_like(div))
        total_var = div.sum()
        (d_ls,) = torch.autograd.grad(total_var, ls_var) if want_grad else (None,)
    total = poison(total_var.detach(), bad)

    if want_grad:  # grad row r = c_r * (onehot(y_r) - p_r), c_r = d loss / d l_s(unit of r) / norm
        c_all = (d_ls / norm)[su]  # [N_s]
        with torch.no_grad():
            for r0 in range(0, sr.shape[0], n):
                rows = sr[r0 : r0 + n]
                c = c_all[r0 : r0 + n]
                h = grad[rows].to(cdt).mul_(-c[:, None])
                h.scatter_add_(1, tgt[r0 : r0 + n, None], c[:, None])
                grad.index_copy_(0, rows, h.to(grad.dtype))
    cnt = num_units.to(cdt).clamp_min(1)
    metrics = {
        "alm": (total / cnt).detach(),
        "student_chunk_logprob": (poison(torch.where(keep, l_s, 0.0).sum(), bad) / cnt).detach(),
        "teacher_chunk_logprob": (poison(torch.where(keep, l_t, 0.0).sum(), bad) / cnt).detach(),
        "kept_fraction": (num_units.to(cdt) / max(U, 1)).detach(),
    }
    loss = total / norm
    return attach_grad(student_logits, loss, grad.view(B, Ls, Vs) if want_grad else None), metrics


def _last_rows(rows: torch.Tensor, unit: torch.Tensor, U: int, next_mask: torch.Tensor):
    """Per unit: the row of its last token (= the last listed row + 1), and whether a token follows."""
    last = torch.zeros(U, dtype=rows.dtype, device=rows.device).scatter_reduce_(0, unit, rows, "amax",
                                                                                 include_self=False)
    q = last + 1
    return q, next_mask.reshape(-1)[q]


def _mass_at(z_flat: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, n: int, cdt) -> torch.Tensor:
    out = torch.empty(rows.shape[0], dtype=cdt, device=rows.device)
    mf = mask.to(cdt)
    with torch.no_grad():
        for r0 in range(0, rows.shape[0], n):
            p, _ = softmax_rows(z_flat[rows[r0 : r0 + n]], 1.0)
            out[r0 : r0 + n] = p @ mf
    return out


def _teacher_boundary_ok(teacher, form, t_main, batch, units, tokens, gamma, i, B, Lt, n, cdt):
    dev = t_main.device
    U = units.student_count.shape[0]
    q, has_next = _last_rows(units.teacher_rows, units.teacher_unit, U,
                             next_token_mask(batch, B, Lt, f"teacher_{i}_", dev))
    if form == "logits":
        Vt = t_main.shape[2]
        mask = _boundary_mask(tokens, Vt, dev, "teacher_boundary_tokens")
        mass = _mass_at(t_main.reshape(B * Lt, Vt), q, mask, n, cdt)
    else:
        lp, idx = teacher.topk_logprobs, teacher.topk_indices  # the parser made sure both are there
        k = lp.shape[-1]
        idx = idx.reshape(B * Lt, k)[q].to(torch.int64)
        lpq = lp.reshape(B * Lt, k)[q].to(cdt)
        width = max(int(idx.max()) + 1 if idx.numel() else 1, 1)
        t = torch.as_tensor(tokens, device=dev)
        width = max(width, t.shape[0] if t.dtype == torch.bool else (int(t.max()) + 1 if t.numel() else 1))
        mask = _boundary_mask(tokens, width, dev, "teacher_boundary_tokens")
        listed = (idx >= 0) & mask[idx.clamp(min=0, max=width - 1)]
        mass = torch.where(listed, torch.exp(lpq), torch.zeros_like(lpq)).sum(dim=1)
    return ~has_next | (mass >= gamma), (has_next & torch.isnan(mass)).any()



class ALMLoss(LossModule):
    """`alm_loss` with fixed options (boundary token masks/ids are kept as given)."""

    function = staticmethod(alm_loss)
    options_type = ALMOptions

    def __init__(self, *, teacher_index: int = 0, tau: float = DEFAULT_TAU, divergence: str = "bce",
                 debias_gamma: float | None = None, teacher_boundary_tokens=None, student_boundary_tokens=None,
                 correct_only: bool = True, eps: float = 1e-6, position_chunk_size: int | None = None,
                 check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, tau=tau, divergence=divergence, debias_gamma=debias_gamma,
                         teacher_boundary_tokens=teacher_boundary_tokens,
                         student_boundary_tokens=student_boundary_tokens, correct_only=correct_only, eps=eps,
                         position_chunk_size=position_chunk_size, check_inputs=check_inputs)
