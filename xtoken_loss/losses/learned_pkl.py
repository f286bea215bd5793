"""A learned projection W: the artifact's sparsity pattern (which teacher ids each student row points at)
stays fixed; the row weights become trainable.

Parametrisation: one logit per non-empty slot, `W[v] = softmax(theta[v, slots of v])`, initialised
with `theta = log(artifact weight)`, so the module starts exactly at the artifact's W, and every
mapped row stays stochastic (non-negative, summing to 1) after any optimiser step. Empty slots and
unmapped rows stay empty; a row with a single slot (exact and special rows) stays one-hot.

`learned_pkl_loss` is the principled P-KL (docs/losses.md, `pkl.py`) with gradients for both the
student logits and theta: per chunk start, KL between the teacher's distribution over the reachable
columns and the student's projected distribution, on the chosen teacher columns S plus one rest
outcome, times T^2. It runs in groups of units with autograd on each group's slice (memory bounded)
and hands the gradients to autograd through one custom function. Everything is in log space
(log-softmax, log W from `log_weights()`, logsumexp over W's entries and the rest, the KL from the
logs), so confident or wide logits stay finite; only chunk-start rows are read (padding gets gradient
0 whatever it holds), and a non-finite row that is read makes the loss NaN. Top-k teacher outputs
(with `rest_logprob`) take the top-k P-KL (`losses/pkl_topk.py`) with W's log-weights as a leaf.

`LearnedProjection.save(path)` writes a CONTRACTS §4 artifact through the artifact format's writer
(`xtoken_core.artifact_format`: safetensors + JSON, atomically, a temporary directory renamed into
place) with provenance: method name `"learned"`, the parent
artifact's metadata under `parent`, and the training parameters the caller passes.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from xtoken_core import artifact_format as fmt
from xtoken_core.config import config
from xtoken_core.errors import LossInputError, LossOptionError, ProjectionArtifactError
from xtoken_loss.batch_tokenizers import check_batch_tokenizers
from xtoken_loss.checks import check_chunk_inputs, check_finite_rows, nonfinite, poison
from xtoken_loss.chunked import (
    check_options,
    compute_dtype,
    log_divergence,
    resolve_normalizer,
    rows_per_chunk,
    safe_logsumexp,
)
from xtoken_loss.losses.pkl import PrincipledPKLOptions
from xtoken_loss.losses.pkl_topk import pkl_topk_sums, projection_entries
from xtoken_loss.modules import LossModule
from xtoken_loss.projection import (
    Projection,
    as_projection,
    load_projection,
    log_slot_masses,
    reduce_column_scores,
    top_columns,
)
from xtoken_loss.teacher_outputs import TOPK_REST_KEYS, TeacherOutputs, as_teacher_outputs
from xtoken_loss.topk import check_topk_batch, refuse_topk_options
from xtoken_loss.units import check_chunk_ids, chunk_units

LEARNED_METHOD = "learned"
TEACHER_FORMS = ("logits", "topk")  # top-k: the pair + rest_logprob (losses/pkl_topk.py)


@config
class LearnedPKLOptions(PrincipledPKLOptions):
    """Options of `learned_pkl_loss` / `LearnedPKLLoss`: the principled P-KL's."""


class LearnedProjection(nn.Module):
    """Trainable row weights over a fixed sparse pattern (module doc).

    Parameters: `theta [R, K]` (only non-empty slots are used). Buffers: `indices [R, K]` int64,
    `slot_mask [R, K]` bool. `teacher_width` and the parent `metadata` are plain attributes.
    """

    def __init__(self, projection, *, row_kind: torch.Tensor | None = None):
        super().__init__()
        proj = projection if isinstance(projection, Projection) else as_projection(projection, "cpu")
        idx = proj.indices.detach().to(torch.int64)
        w = proj.weights.detach().to(torch.float32)
        mask = (idx >= 0) & (w > 0)
        self.register_buffer("indices", torch.where(mask, idx, torch.full_like(idx, -1)))
        self.register_buffer("slot_mask", mask)
        self.theta = nn.Parameter(torch.where(mask, torch.log(torch.where(mask, w, torch.ones_like(w))),
                                              torch.zeros_like(w)))
        self.teacher_width = int(proj.teacher_width)
        self.metadata = copy.deepcopy(dict(proj.metadata))
        if row_kind is None:
            row_kind = proj.row_kind
        self.row_kind = None if row_kind is None else torch.as_tensor(row_kind).to(torch.uint8).cpu()

    @classmethod
    def from_artifact(cls, path, *, student_fingerprint: str | None = None,
                      teacher_fingerprint: str | None = None) -> LearnedProjection:
        """Load an artifact directory with `load_projection` (same checks), keeping its `row_kind`."""
        return cls(load_projection(path, student_fingerprint=student_fingerprint,
                                   teacher_fingerprint=teacher_fingerprint))

    @property
    def num_rows(self) -> int:
        return self.indices.shape[0]

    def weights(self) -> torch.Tensor:
        """`[R, K]` current weights (differentiable): softmax over each row's slots, 0 elsewhere."""
        neg = torch.finfo(self.theta.dtype).min
        t = torch.where(self.slot_mask, self.theta, torch.full_like(self.theta, neg))
        w = torch.softmax(t, dim=1)
        return torch.where(self.slot_mask, w, torch.zeros_like(w))

    def log_weights(self) -> torch.Tensor:
        """`[R, K]` log of `weights()` (differentiable), computed as a log-softmax so a tiny weight keeps
        its precision; -inf in empty slots."""
        neg = torch.finfo(self.theta.dtype).min
        lw = torch.log_softmax(torch.where(self.slot_mask, self.theta, torch.full_like(self.theta, neg)), dim=1)
        return torch.where(self.slot_mask, lw, torch.full_like(lw, float("-inf")))

    def to_projection(self) -> Projection:
        """The current W as a frozen `Projection` (for `pkl_loss`, `hkl_loss`, ...)."""
        with torch.no_grad():
            return Projection.from_tensors(self.indices, self.weights().float(), teacher_width=self.teacher_width,
                                           metadata=self.metadata, row_kind=self.row_kind)

    def save(self, path, *, params: dict | None = None, overwrite: bool = False) -> Path:
        """Write the current W as a projection artifact directory at `path` (module doc), through the
        artifact format's atomic writer (`xtoken_core.artifact_format`).

        Slots are re-ordered by descending weight in each row. `params` (JSON-serialisable: steps,
        learning rate, data, ...) is recorded under `method.params`. Refuses to replace an existing
        directory unless `overwrite`."""
        out = Path(path)
        if out.exists() and not overwrite:
            raise ProjectionArtifactError(f"{out} exists; pass overwrite=True to replace it")
        with torch.no_grad():
            w = self.weights().float().cpu()
            idx = self.indices.cpu()
            order = torch.argsort(-w, dim=1, stable=True)
            w = w.gather(1, order)
            idx = idx.gather(1, order)
            idx = torch.where(w > 0, idx, torch.full_like(idx, -1))
            w = torch.where(idx >= 0, w, torch.zeros_like(w))
        meta = self._metadata(w, idx, params)
        with fmt.atomic_dir(out, marker=fmt.PROJECTION_JSON) as tmp:
            fmt.write_projection_files(tmp, idx.numpy(), w.numpy(),
                                       None if self.row_kind is None else self.row_kind.numpy(), meta)
        return out

    def _metadata(self, w, idx, params) -> dict:
        parent = copy.deepcopy(self.metadata)
        meta = {k: v for k, v in parent.items() if k not in ("method", "stats", "created_with", "parent")}
        meta.update(schema_version=fmt.SCHEMA_VERSION, kind=fmt.PROJECTION_KIND, direction=fmt.STUDENT_TO_TEACHER,
                    top_k=int(idx.shape[1]))
        meta.setdefault("student", {"name": None, "fingerprint": None, "vocab_size": self.num_rows,
                                    "model_vocab_size": self.num_rows})
        meta.setdefault("teacher", {"name": None, "fingerprint": None, "vocab_size": self.teacher_width,
                                    "model_vocab_size": self.teacher_width})
        mapped = (idx >= 0).any(dim=1)
        top = w.max(dim=1).values
        ent = -(torch.where(w > 0, w * torch.log(w), torch.zeros_like(w))).sum(dim=1)
        meta["method"] = {"name": LEARNED_METHOD,
                          "params": dict(params or {}, parametrisation="softmax over each row's fixed slots, "
                                         "initialised from the parent's log-weights")}
        meta["parent"] = {k: parent.get(k) for k in ("method", "stats", "created_with") if k in parent}
        meta["stats"] = {
            "rows": int(idx.shape[0]),
            "mapped_rows": int(mapped.sum()),
            "unmapped_rows": int((~mapped).sum()),
            "top_weight_below_0.6_rows": int((mapped & (top < 0.6)).sum()),
            "mean_row_entropy": float(ent[mapped].mean()) if bool(mapped.any()) else 0.0,
        }
        meta["created_with"] = fmt.created_with()
        return meta


# --------------------------------------------------------------------------------------------------
# P-KL with a trainable W


class _TwoGrads(torch.autograd.Function):
    """Attach precomputed gradients for the logits and for W's log-weights to a loss value."""

    @staticmethod
    def forward(ctx, logits, weights, loss, g_logits, g_weights):
        ctx.save_for_backward(g_logits, g_weights)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, go):
        g_logits, g_weights = ctx.saved_tensors
        gl = None if g_logits is None else g_logits * go.to(g_logits.dtype)
        gw = None if g_weights is None else g_weights * go.to(g_weights.dtype)
        return gl, gw, None, None, None


def learned_pkl_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    projection: LearnedProjection,
    teacher_index: int = 0,
    normalizer=None,
    temperature: float = 1.0,
    direction: str = "forward",
    top_k_columns: int | None = 8192,
    correct_only: bool = True,
    process_group=None,
    position_chunk_size: int | None = None,
    check_inputs: bool = False,
):
    """Principled P-KL (as `pkl_loss(public=False)`) with gradients for the logits *and* the learned W.
    Returns `(loss, metrics)`; metrics: `kl` (mean per valid chunk, without T^2; NaN, as the loss, when a
    row it reads is not finite)."""
    if not isinstance(projection, LearnedProjection):
        raise LossOptionError("learned_pkl_loss: projection must be a LearnedProjection (use pkl_loss for a fixed W)")
    check_options(LearnedPKLOptions, teacher_index=teacher_index, temperature=temperature, direction=direction,
                  top_k_columns=top_k_columns, correct_only=correct_only, position_chunk_size=position_chunk_size,
                  check_inputs=check_inputs)
    T = float(temperature)
    check_batch_tokenizers(projection, batch, teacher_index, loss="learned_pkl")
    teacher = as_teacher_outputs(teacher_outputs, loss="learned_pkl", accepts=TEACHER_FORMS, needs=TOPK_REST_KEYS)
    if teacher.form == "topk":
        return _learned_topk(student_logits, teacher, batch, projection=projection, teacher_index=teacher_index,
                             normalizer=normalizer, temperature=temperature, direction=direction,
                             top_k_columns=top_k_columns, correct_only=correct_only, process_group=process_group,
                             check_inputs=check_inputs)
    zt = teacher.logits
    normalizer = check_chunk_inputs("learned_pkl", student_logits, zt, batch, teacher_index, normalizer,
                                    correct_only=correct_only)
    B, Ls, Vs = student_logits.shape
    Lt, Vt = zt.shape[1], zt.shape[2]
    dev = student_logits.device
    if projection.indices.device != dev:
        raise LossInputError(f"learned_pkl_loss: move the LearnedProjection to {dev} (module.to(device))")
    R, K = projection.indices.shape
    if Vs < R and bool(projection.slot_mask[Vs:].any()):
        raise LossInputError(f"student logits have {Vs} columns but the projection maps rows up to {R - 1}")
    if int(projection.indices.max()) >= Vt:
        raise LossInputError(f"teacher logits have {Vt} columns but the projection points at teacher id "
                             f"{int(projection.indices.max())}")
    if check_inputs:
        check_chunk_ids(batch, teacher_index)
    cdt = compute_dtype(student_logits.dtype)
    units = chunk_units(batch, teacher_index, B, Ls, Lt, mode="start", correct_only=correct_only, device=dev)
    if check_inputs:  # the rows the loss reads only: padding never raises
        check_finite_rows("learned_pkl", "student_logits", student_logits, units.student_rows)
        check_finite_rows("learned_pkl", "teacher logits", zt, units.teacher_rows)
    norm = resolve_normalizer(normalizer, units.num_units, cdt)
    srows, trows = units.student_rows, units.teacher_rows
    U = srows.shape[0]
    n = rows_per_chunk(position_chunk_size, max(Vs, Vt))
    zs_flat, zt_flat = student_logits.reshape(B * Ls, Vs), zt.reshape(B * Lt, Vt)

    rows = min(R, Vs)
    idx = projection.indices[:rows]
    smask = projection.slot_mask[:rows]
    reach = torch.zeros(Vt, dtype=torch.bool, device=dev)
    reach[idx[smask]] = True

    # Teacher pass (chunk-start rows only: padding is never read): log of the reachable normaliser and
    # column scores (max log-probability over the units), all by logsumexp.
    log_norm = torch.empty(U, dtype=cdt, device=dev)
    scores = torch.full((Vt,), float("-inf"), dtype=cdt, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    with torch.no_grad():
        for u0 in range(0, U, n):
            zz = zt_flat[trows[u0 : u0 + n]].to(cdt) / T
            bad = bad | nonfinite(zz.amax(dim=1))
            lse = torch.logsumexp(zz, dim=1)
            log_norm[u0 : u0 + n] = torch.logsumexp(torch.where(reach, zz, float("-inf")), dim=1)
            torch.maximum(scores, (zz - lse[:, None]).amax(dim=0), out=scores)
    scores = torch.where(reach, scores, torch.full_like(scores, float("-inf")))
    cols = top_columns(reduce_column_scores(scores, process_group), top_k_columns)
    k = cols.shape[0]
    rest_empty = k == int(reach.sum())
    col_slot = torch.full((Vt,), -1, dtype=torch.int64, device=dev)
    col_slot[cols] = torch.arange(k, device=dev)
    rest_cols = reach & (col_slot < 0)
    slot = torch.where(smask, col_slot[idx.clamp(min=0)], torch.full_like(idx, -1))  # [rows, K]
    entry = (slot >= 0).nonzero()  # [E, 2]
    e_rows, e_slots = entry[:, 0], slot[slot >= 0]
    e_flat = entry[:, 0] * K + entry[:, 1]
    rest_mask = smask & (slot < 0)

    want_logits = torch.is_grad_enabled() and student_logits.requires_grad
    lw_full = projection.log_weights()  # [R, K], in the graph of theta; -inf in empty slots
    want_w = torch.is_grad_enabled() and lw_full.requires_grad
    lw_leaf = lw_full.detach()[:rows].to(cdt).requires_grad_(want_w)
    g_logits = torch.zeros_like(zs_flat) if want_logits else None
    g_w = torch.zeros(rows, K, dtype=cdt, device=dev)
    total = torch.zeros((), dtype=cdt, device=dev)
    for u0 in range(0, U, n):
        u1 = min(u0 + n, U)
        z = zs_flat.detach()[srows[u0:u1]].to(cdt).requires_grad_(want_logits)
        bad = bad | nonfinite(z.detach().amax(dim=1))
        with torch.no_grad():  # the teacher on S and the rest, renormalised over the reachable columns
            zz = zt_flat[trows[u0:u1]].to(cdt) / T
            ln = log_norm[u0:u1, None]
            log_p_rest = (torch.full((u1 - u0, 1), float("-inf"), dtype=cdt, device=dev) if rest_empty else
                          torch.logsumexp(torch.where(rest_cols, zz, float("-inf")), dim=1, keepdim=True) - ln)
            log_p = torch.cat([zz[:, cols] - ln, log_p_rest], dim=1)
        with torch.enable_grad() if (want_logits or want_w) else torch.no_grad():
            # the student's log-masses on S and the rest: logsumexp of log p_v + log w over W's entries
            log_ps = torch.log_softmax(z / T, dim=1)[:, :rows]  # [n, rows]
            log_a, _, _ = log_slot_masses(log_ps[:, e_rows] + lw_leaf.reshape(-1)[e_flat], e_slots, k,
                                          differentiable=True)
            if rest_empty:
                log_rest = torch.full((u1 - u0, 1), float("-inf"), dtype=cdt, device=dev)
            else:
                log_r = safe_logsumexp(torch.where(rest_mask, lw_leaf, float("-inf")), dim=1)  # [rows]
                log_rest = safe_logsumexp(log_ps + log_r, dim=1)[:, None]
            log_mass = torch.cat([log_a, log_rest], dim=1)
        with torch.no_grad():  # exact value and d kl / d log-mass (zeros handled exactly, see log_divergence)
            kl, _, g = log_divergence(log_mass.detach(), log_p, direction)
        if want_logits or want_w:
            inputs = [t for t, f in ((z, want_logits), (lw_leaf, want_w)) if f]
            live = torch.isfinite(log_mass.detach())
            chain = torch.where(live, log_mass, torch.zeros_like(log_mass)) * torch.where(live, g, torch.zeros_like(g))
            grads = torch.autograd.grad(chain.sum(), inputs)  # chain rule through log-mass = log(p W)
            gi = iter(grads)
            if want_logits:
                g_logits.index_add_(0, srows[u0:u1], (next(gi) * (T * T) / norm).to(g_logits.dtype))
            if want_w:
                g_w += next(gi) * (T * T) / norm
        total += kl.sum()
    total = poison(total, bad)
    loss = total * (T * T) / norm
    metrics = {"kl": (total / units.num_units.to(cdt).clamp_min(1)).detach()}
    if not (want_logits or want_w):
        return loss, metrics
    gw_full = None
    if want_w:
        gw_full = torch.zeros_like(lw_full)
        gw_full[:rows] = g_w.to(gw_full.dtype)
    out = _TwoGrads.apply(student_logits, lw_full, loss,
                          g_logits.view(B, Ls, Vs) if want_logits else None, gw_full)
    return out, metrics


def _learned_topk(student_logits, teacher: TeacherOutputs, batch, *, projection: LearnedProjection, teacher_index,
                  normalizer, temperature, direction, top_k_columns, correct_only, process_group, check_inputs):
    """`learned_pkl_loss` with a top-k teacher: the top-k P-KL (`losses/pkl_topk.py`) with W's
    log-weights as a leaf, so theta gets its gradient too."""
    refuse_topk_options("learned_pkl", temperature=temperature)
    normalizer = check_chunk_inputs("learned_pkl", student_logits, None, batch, teacher_index, normalizer,
                                    correct_only=correct_only)
    B, Ls, Vs = student_logits.shape
    check_topk_batch("learned_pkl", teacher, batch, teacher_index, B)
    dev = student_logits.device
    if projection.indices.device != dev:
        raise LossInputError(f"learned_pkl_loss: move the LearnedProjection to {dev} (module.to(device))")
    R = projection.indices.shape[0]
    if Vs < R and bool(projection.slot_mask[Vs:].any()):
        raise LossInputError(f"student logits have {Vs} columns but the projection maps rows up to {R - 1}")
    cdt = compute_dtype(student_logits.dtype)
    e_rows, e_cols, flat = projection_entries(projection.indices, projection.slot_mask, Vs)
    lw_full = projection.log_weights()  # [R, K], in the graph of theta
    want_w = torch.is_grad_enabled() and lw_full.requires_grad
    log_w = lw_full.detach().reshape(-1)[flat].to(cdt).requires_grad_(want_w)
    reach = torch.zeros(projection.teacher_width, dtype=torch.bool, device=dev)
    reach[e_cols] = True
    total, norm, units, g_logits, g_e, sums, bad = pkl_topk_sums(
        student_logits, teacher, batch, loss="learned_pkl", e_rows=e_rows, e_cols=e_cols, log_w=log_w, reach=reach,
        teacher_index=teacher_index, normalizer=normalizer, direction=direction, top_k_columns=top_k_columns,
        columns=None, correct_only=correct_only, process_group=process_group, check_inputs=check_inputs)
    total = poison(total, bad)
    loss = total / norm
    metrics = {"kl": (total / units.num_units.to(cdt).clamp_min(1)).detach()}
    want_logits = g_logits is not None
    if not (want_logits or want_w):
        return loss, metrics
    gw_full = None
    if want_w:
        gw_full = torch.zeros_like(lw_full)
        gw_full.view(-1)[flat] = g_e.to(gw_full.dtype)
    out = _TwoGrads.apply(student_logits, lw_full, loss, g_logits.view(B, Ls, Vs) if want_logits else None, gw_full)
    return out, metrics


class LearnedPKLLoss(LossModule):
    """`learned_pkl_loss` as a module that owns the `LearnedProjection` (its `theta` is a parameter of
    this module, so `optimizer = Adam(list(student.parameters()) + list(loss.parameters()))` trains W)."""

    function = staticmethod(learned_pkl_loss)
    options_type = LearnedPKLOptions

    def __init__(self, projection, *, teacher_index: int = 0, temperature: float = 1.0, direction: str = "forward",
                 top_k_columns: int | None = 8192, correct_only: bool = True, process_group=None,
                 position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, direction=direction,
                         top_k_columns=top_k_columns, correct_only=correct_only, process_group=process_group,
                         position_chunk_size=position_chunk_size, check_inputs=check_inputs)
        self.projection = projection if isinstance(projection, LearnedProjection) else (
            LearnedProjection.from_artifact(projection) if isinstance(projection, (str, os.PathLike))
            else LearnedProjection(projection))  # a submodule: its theta is trained

    def forward(self, student_logits, teacher_outputs, batch, *, normalizer=None):
        return learned_pkl_loss(student_logits, teacher_outputs, batch, projection=self.projection,
                                normalizer=normalizer, **self.options)
