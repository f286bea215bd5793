"""Hybrid cross-tokenizer losses (kinds `"hkl"` and `"gold"`): a KL on a *common set* of token pairs
plus ULD's sorted-probability L1 on everything else.

Common set C: pairs (student id s_j, teacher id t_j), each student id and each teacher id at most once.
- H-KL (`hkl_loss`): from the projection W, a student row s is common when its largest weight is
  >= `threshold` (default 0.6); its partner is that weight's teacher column.
- GOLD (`gold_loss`): student and teacher tokens with identical canonical bytes (exact matches), read
  from a projection's `row_kind` (a loaded `Projection` or an artifact directory), or given as a
  `[V_s]` map.
Collision rule (one partner per teacher token): when several student rows choose the same teacher
column, the pair with the largest weight wins; ties go to the lowest student id. The losers become
uncommon. The rule depends on W only, never on the batch.

Per valid chunk, with q the student's and p the teacher's chunk distribution (`uld.py` chunk forms,
run by `xtoken_loss/chunk_runner.py`):
- principled (default, `public=False`): chunk form `"start"`;
  `loss_c = T^2 * common_weight * KL(p_C / p(C) || q_C / q(C)) + uncommon_weight * L1(sort q_U, sort p_U)`,
  a true KL between the renormalised common-set distributions (>= 0), and the full sorted L1 over the
  uncommon entries U (the complement of C on each side). Whatever mass the two sides put on C
  differently shows up in the uncommon L1 (it is at least |q(U) - p(U)|), so the loss is 0 exactly
  when the conditional common-set distributions agree and the sorted uncommon masses agree.
  Computed in log space (docs/losses.md): `log qn_C = z_C / T - logsumexp(z_C / T)`, the masses by
  log-sum-exp, the KL's gradient as `qn_C - pn_C`; never the log of a probability that may have
  underflowed, so confident (a +100 spike) or widely spread (std 12) logits stay finite in float32.
- public (`public=True`): NeMo-RL's published hybrid, its defaults and common-set rules included,
  computed by `losses/public.py` (`public_hybrid`, `public_common_set`): chunk form `"mean_log"`; the
  common-set term `sum_j p_j (log p_j - log q_j)` is not renormalised (it can be negative); the
  sorted uncommon vectors are cut to their `min(|U_s|, |U_t|, tail_cut)` largest entries (8192);
  `loss_c = T^2 (KL + L1)`; every valid chunk counts, correct or not; `direction="reverse"` too.
Sum over valid chunks / `normalizer` (default: the number of valid chunks). Top-k teacher outputs
(with `rest_logprob`, CONTRACTS §3): the KL on the listed common pairs, the sorted L1 on the listed
uncommon ranks plus one rest outcome, chunk form `"start"`, T = 1 (`losses/sorted_topk.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from xtoken_core.artifact_format import ROW_EXACT
from xtoken_core.config import config, option
from xtoken_core.errors import ArtifactError, LossInputError, LossOptionError
from xtoken_loss.batch_tokenizers import TokenizerPair, check_batch_tokenizers
from xtoken_loss.checks import check_chunk_inputs
from xtoken_loss.chunk_runner import prepare, run_units
from xtoken_loss.chunked import check_options
from xtoken_loss.losses.sorted_topk import hybrid_topk_loss
from xtoken_loss.losses.uld import ChunkLossOptions
from xtoken_loss.modules import LossModule
from xtoken_loss.projection import Projection, as_projection, load_projection
from xtoken_loss.sorted_l1 import Workspace, sorted_l1, sorted_l1_signs
from xtoken_loss.teacher_outputs import TOPK_REST_KEYS, as_teacher_outputs
from xtoken_loss.topk import refuse_topk_options

DEFAULT_THRESHOLD = 0.6
PUBLIC_TAIL_CUT = 8192
TEACHER_FORMS = ("logits", "topk")  # top-k: the pair + rest_logprob (losses/sorted_topk.py)


@config
class HybridOptions(ChunkLossOptions):
    """Options of `hybrid_loss` and `gold_loss` / `GOLDLoss` (module doc; public form: chunk form
    `"mean_log"`, tail cut 8192, every valid chunk)."""

    public_form: ClassVar[str] = "mean_log"

    correct_only: bool | None = option(None, help="count only chunks whose pair is correct (pair_is_correct); None: "
                                       "yes, except with public=True (NeMo-RL counts every valid chunk)")
    direction: Literal["forward", "reverse"] = option("forward", help="common-set KL: 'forward' KL(teacher || "
                                                      "student) or 'reverse' (public form only)")
    common_weight: float = option(1.0, help="weight of the common-set KL")
    uncommon_weight: float = option(1.0, help="weight of the sorted L1 on the uncommon entries")

    def check(self) -> None:
        if self.public and self.form != "mean_log":
            raise self.fail(f"public=True is NeMo-RL's hybrid, whose chunk form is 'mean_log'; chunk_form="
                            f"{self.chunk_form!r} needs public=False")
        if not self.public and self.direction != "forward":
            raise self.fail("direction='reverse' exists in the public form only (public=True)")

    @property
    def only_correct(self) -> bool:
        """`correct_only` resolved: its value, else True (principled) / False (public)."""
        return (not self.public) if self.correct_only is None else self.correct_only

    @property
    def cut(self) -> int | None:
        """The tail cut in use (`tail_cut`, else the public form's)."""
        return self.tail_cut if self.tail_cut is not None else (PUBLIC_TAIL_CUT if self.public else None)


@config
class GOLDOptions(HybridOptions):
    """Options of `gold_loss` / `GOLDLoss`: the hybrid's (the common set comes from the artifact)."""


@config
class HKLOptions(HybridOptions):
    """Options of `hkl_loss` / `HKLLoss`: the hybrid's plus the common-set `threshold`."""

    threshold: float = option(DEFAULT_THRESHOLD, help="a student row is common when its top W weight is >= this",
                              gt=0, max=1)


@dataclass(frozen=True, eq=False)
class CommonSet:
    """Common pairs `(student_ids[j], teacher_ids[j])`, distinct on each side, sorted by student id;
    `tokenizers`: the pair of the projection it came from (checked against the batch), if recorded."""

    student_ids: torch.Tensor  # [m] int64
    teacher_ids: torch.Tensor  # [m] int64
    method: str = ""
    tokenizers: TokenizerPair | None = None

    @property
    def size(self) -> int:
        return int(self.student_ids.shape[0])

    def to(self, device) -> CommonSet:
        return CommonSet(self.student_ids.to(device), self.teacher_ids.to(device), self.method, self.tokenizers)

    @classmethod
    def from_pairs(cls, student_ids, teacher_ids, scores=None, *, method: str = "",
                   tokenizers: TokenizerPair | None = None) -> CommonSet:
        """Resolve candidate pairs with the collision rule: per teacher id keep the highest `score`
        (all equal when None), ties to the lowest student id; student ids must already be distinct."""
        s = torch.as_tensor(student_ids, dtype=torch.int64).flatten()
        t = torch.as_tensor(teacher_ids, dtype=torch.int64).flatten()
        if s.shape != t.shape:
            raise LossOptionError(f"common set: {s.numel()} student ids but {t.numel()} teacher ids")
        if s.numel() != torch.unique(s).numel():
            raise LossOptionError("common set: a student id appears in two pairs (one partner per student token)")
        sc = torch.ones(s.shape, dtype=torch.float64) if scores is None else torch.as_tensor(scores).to(torch.float64)
        # order: teacher id, then score descending, then student id; keep the first of each teacher id
        order = torch.argsort(s, stable=True)
        order = order[torch.argsort(-sc[order], stable=True)]
        order = order[torch.argsort(t[order], stable=True)]
        ts = t[order]
        first = torch.ones_like(ts, dtype=torch.bool)
        first[1:] = ts[1:] != ts[:-1]
        keep = order[first]
        keep = keep[torch.argsort(s[keep])]
        return cls(s[keep].contiguous(), t[keep].contiguous(), method, tokenizers)

    @classmethod
    def from_map(cls, student_to_teacher, *, method: str = "map") -> CommonSet:
        """From a `[V_s]` map of teacher ids (-1: no partner); collisions resolved to the lowest student id."""
        m = torch.as_tensor(student_to_teacher, dtype=torch.int64).flatten()
        s = (m >= 0).nonzero().squeeze(1)
        return cls.from_pairs(s, m[s], method=method)


def common_by_threshold(projection, threshold: float = DEFAULT_THRESHOLD) -> CommonSet:
    """H-KL's common set: rows whose largest W weight is >= `threshold`, paired with that column
    (the first such slot on equal weights), collisions by the rule in the module doc."""
    th = float(threshold)
    if not 0.0 < th <= 1.0:
        raise LossOptionError(f"threshold must be in (0, 1], got {threshold!r}")  # also HKLOptions.threshold
    proj = projection if isinstance(projection, Projection) else as_projection(projection, "cpu")
    idx, w = proj.indices.cpu(), proj.weights.cpu().to(torch.float64)
    w = torch.where(idx >= 0, w, torch.full_like(w, -1.0))
    top_w, slot = w.max(dim=1)
    rows = (top_w >= th - 1e-6).nonzero().squeeze(1)  # float32 artifacts: 0.6 stored as 0.6000000238
    cols = idx[rows, slot[rows]]
    return CommonSet.from_pairs(rows, cols, top_w[rows], method=f"max_weight>={th:g}", tokenizers=proj.tokenizers)


def common_exact(source) -> CommonSet:
    """GOLD's common set: exact byte matches.

    `source`: a `Projection` with `row_kind` (as `load_projection` returns it; exact rows are one-hot
    on the matching teacher token), a projection artifact directory (`str` or `os.PathLike`, loaded
    with `load_projection`), a `CommonSet`, or a `[V_s]` map (tensor / list; teacher id or -1).
    """
    if isinstance(source, CommonSet):
        return source
    if isinstance(source, (str, os.PathLike)):
        source = load_projection(source)
    if isinstance(source, Projection):
        if source.row_kind is None:
            where = "the artifact" if source.metadata else "this Projection"
            error = ArtifactError if source.metadata else LossOptionError
            raise error(
                f"gold: {where} has no `row_kind`, so its exact rows are unknown; rebuild the artifact with "
                "`xtoken-align build-projection`, build the Projection with from_tensors(..., row_kind=...), or "
                "pass gold_loss(common=...) a [V_s] exact map"
            )
        rows = (source.row_kind.cpu().to(torch.int64) == ROW_EXACT).nonzero().squeeze(1)
        return CommonSet.from_pairs(rows, source.indices.cpu()[rows, 0], method="exact", tokenizers=source.tokenizers)
    return CommonSet.from_map(source, method="exact")


def _as_common(common, device) -> CommonSet:
    if isinstance(common, CommonSet):
        return common.to(device)
    return CommonSet.from_map(common).to(device)


def hybrid_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    common,
    teacher_index: int = 0,
    normalizer=None,
    temperature: float = 1.0,
    public: bool = False,
    direction: str = "forward",
    common_weight: float = 1.0,
    uncommon_weight: float = 1.0,
    chunk_form: str | None = None,
    tail_cut: int | None = None,
    correct_only: bool | None = None,
    position_chunk_size: int | None = None,
    check_inputs: bool = False,
    loss_name: str = "hybrid",
):
    """KL on the common set `common` (a `CommonSet` or a `[V_s]` map) + sorted L1 on the rest
    (module doc). Returns `(loss, metrics)`; metrics (means per valid chunk): `common_kl` (without
    T^2), `uncommon_l1`, `teacher_common_mass`, `student_common_mass`."""
    o = check_options(HybridOptions, teacher_index=teacher_index, temperature=temperature, public=public,
                      direction=direction, common_weight=common_weight, uncommon_weight=uncommon_weight,
                      chunk_form=chunk_form, tail_cut=tail_cut, correct_only=correct_only,
                      position_chunk_size=position_chunk_size, check_inputs=check_inputs)
    correct_only = o.only_correct
    T, form, tail_cut = float(temperature), o.form, o.cut
    teacher_outputs = as_teacher_outputs(teacher_outputs, loss=loss_name, accepts=TEACHER_FORMS, needs=TOPK_REST_KEYS)
    if teacher_outputs.form == "topk":
        refuse_topk_options(loss_name, temperature=temperature, public=public, chunk_form=chunk_form,
                            tail_cut=tail_cut)
        cs = _as_common(common, student_logits.device)
        check_batch_tokenizers(cs, batch, teacher_index, loss=loss_name, what="the common set's projection")
        Vs = student_logits.shape[-1]
        if cs.size and int(cs.student_ids.max()) >= Vs:
            raise LossInputError(f"{loss_name}: the common set pairs student ids up to {int(cs.student_ids.max())}, "
                                 f"but the student logits are {Vs} wide; build it for this vocabulary")
        return hybrid_topk_loss(student_logits, teacher_outputs, batch, common=cs, teacher_index=teacher_index,
                                normalizer=normalizer, common_weight=common_weight, uncommon_weight=uncommon_weight,
                                correct_only=correct_only, check_inputs=check_inputs, loss_name=loss_name)
    normalizer = check_chunk_inputs(loss_name, student_logits, teacher_outputs.logits, batch, teacher_index, normalizer,
                                    correct_only=correct_only, student_ids=form == "chain", teacher_ids=form == "chain")
    if public:
        from xtoken_loss.losses.public import public_hybrid  # public.py imports this module

        return public_hybrid(student_logits, teacher_outputs, batch, common=_as_common(common, student_logits.device),
                             teacher_index=teacher_index, normalizer=normalizer, temperature=temperature,
                             direction=direction, common_weight=common_weight, uncommon_weight=uncommon_weight,
                             tail_cut=o.cut, correct_only=o.only_correct, position_chunk_size=position_chunk_size,
                             check_inputs=check_inputs, loss_name=loss_name)
    zt, units = prepare(student_logits, teacher_outputs, batch, loss_name=loss_name, teacher_index=teacher_index,
                        correct_only=correct_only, check_inputs=check_inputs, form=form)
    Vs, Vt = student_logits.shape[2], zt.shape[2]
    cs = _as_common(common, student_logits.device)
    check_batch_tokenizers(cs, batch, teacher_index, loss=loss_name, what="the common set's projection")
    if cs.size and (int(cs.student_ids.max()) >= Vs or int(cs.teacher_ids.max()) >= Vt):
        raise LossInputError(
            f"{loss_name}: the common set pairs student ids up to {int(cs.student_ids.max())} with teacher ids up to "
            f"{int(cs.teacher_ids.max())}, but the logits are {Vs} and {Vt} wide; build it for these vocabularies"
        )
    s_ids, t_ids = cs.student_ids, cs.teacher_ids
    u_s, u_t = _uncommon(s_ids, Vs), _uncommon(t_ids, Vt)
    cut = None if tail_cut is None else min(Vs - cs.size, Vt - cs.size, tail_cut)
    wc, wu = float(common_weight), float(uncommon_weight)

    def unit_fn(log_q, log_p):
        lq_c, lp_c = log_q[:, s_ids], log_p[:, t_ids]  # [n, m]
        with torch.no_grad():
            lse_p = torch.logsumexp(lp_c, dim=1, keepdim=True)  # log teacher common mass
        lse_q = torch.logsumexp(lq_c, dim=1, keepdim=True)
        if cs.size:
            # KL(p_C / p(C) || q_C / q(C)) from log-probabilities; 0 where the teacher has no common mass
            has = torch.isfinite(lse_p)
            lp_n = torch.where(has, lp_c - lse_p, torch.full_like(lp_c, float("-inf")))
            lq_n = lq_c - lse_q
            pc = torch.exp(lp_n)
            kl = torch.where(pc > 0, pc * (lp_n - lq_n), torch.zeros_like(pc)).sum(dim=1)
        else:
            kl = torch.zeros(log_q.shape[0], dtype=log_q.dtype, device=log_q.device)
        qu, pu = torch.exp(log_q[:, u_s]), torch.exp(log_p[:, u_t])  # the uncommon entries only
        l1 = sorted_l1(qu, pu, cut)
        loss = (T * T * wc) * kl + wu * l1
        with torch.no_grad():
            extra = {
                "common_kl": kl.detach(),
                "uncommon_l1": l1.detach(),
                "teacher_common_mass": torch.exp(lse_p).squeeze(1),
                "student_common_mass": torch.exp(lse_q.detach()).squeeze(1),
            }
        return loss, extra

    perm_s, inv_s = _layout(s_ids, u_s)
    perm_t, _ = _layout(t_ids, u_t)
    m = cs.size
    work = Workspace()

    def row_fn(zs, zt, want_grad, mx_s, mx_t):
        # the principled "start" form on logit rows, in log space; columns in the order [C | U]
        if T != 1.0:
            zs, zt = zs.div_(T), zt.div_(T)
        lqn, qn, lse_qc, lse_q, qu = _split_softmax(zs, perm_s, m, work, "s")
        lpn, pn, lse_pc, lse_p, pu = _split_softmax(zt, perm_t, m, work, "t")
        if m:  # KL(pn || qn) = sum pn (log pn - log qn); 0 log 0 = 0 (the NaN of 0 * -inf)
            kl = lpn.sub_(lqn).mul_(pn).nan_to_num_(nan=0.0, posinf=float("inf")).sum(dim=1)
        else:
            kl = torch.zeros(zs.shape[0], dtype=zs.dtype, device=zs.device)
        l1, sig = sorted_l1_signs(qu, pu, want_grad, cut, work=work, overwrite_t=True)
        g = None
        if want_grad:
            # d loss / d z (z already divided by T, hence the 1/T): on C, T^2 wc (qn - pn) / T from the
            # renormalised KL (0 where the teacher has no common mass) and, on every entry, the L1's
            # softmax backward wu q (sigma - <q_U, sigma>) / T with sigma = 0 on C
            c = torch.linalg.vecdot(qu, sig)
            q_mass = torch.exp(lse_qc - lse_q)
            kl_w = torch.isfinite(lse_pc).to(zs.dtype).mul_(T * wc)
            gp = work.get("grad_perm", zs.shape, zs.dtype, zs.device)  # [C | U]
            torch.mul(qn, (kl_w - q_mass * c * (wu / T))[:, None], out=gp[:, :m]).addcmul_(pn, kl_w[:, None], value=-1)
            torch.sub(sig, c[:, None], out=gp[:, m:]).mul_(qu).mul_(wu / T)
            g = torch.index_select(gp, 1, inv_s, out=zs)  # back to the vocabulary order, in zs's buffer
        extra = {"common_kl": kl, "uncommon_l1": l1, "teacher_common_mass": torch.exp(lse_pc - lse_p),
                 "student_common_mass": torch.exp(lse_qc - lse_q)}
        return (T * T * wc) * kl + wu * l1, g, extra

    return run_units(student_logits, zt, units, batch, teacher_index, unit_fn, form=form, temperature=T,
                     normalizer=normalizer, position_chunk_size=position_chunk_size,
                     metric_names=("common_kl", "uncommon_l1", "teacher_common_mass", "student_common_mass"),
                     row_fn=row_fn)


def _uncommon(ids: torch.Tensor, width: int) -> torch.Tensor:
    """The ids in `0 .. width - 1` not in `ids`, ascending."""
    keep = torch.ones(width, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(1)


def _layout(common: torch.Tensor, uncommon: torch.Tensor):
    """`(perm, inverse)`: the column order [common | uncommon] and the map back."""
    perm = torch.cat([common, uncommon])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=perm.device)
    return perm, inv


def _split_softmax(z: torch.Tensor, perm: torch.Tensor, m: int, work: Workspace, side: str):
    """One side's rows `z [n, V]` (already divided by T) with the columns in the order `perm`, the m
    common ones first, all in log space. Returns `(log pn_C, pn_C, lse_C, lse, p_U)`: `pn_C` the
    renormalised common distribution `softmax(z_C)` (0 where the row has no common mass), `lse_C` /
    `lse` the log-sum-exp over C / over all columns, `p_U = exp(z_U - lse)` the uncommon probabilities.
    Nothing takes the log of a probability that may have underflowed. The tensors are `work` buffers."""
    n, V = z.shape
    zp = torch.index_select(z, 1, perm, out=work.get(f"z_{side}", (n, V), z.dtype, z.device))
    e = work.get(f"e_{side}", (n, V), z.dtype, z.device)
    parts = []
    for lo, hi in ((0, m), (m, V)):
        if hi == lo:
            zero = torch.zeros(n, dtype=z.dtype, device=z.device)
            parts.append((zero, zero))
            continue
        mx = zp[:, lo:hi].amax(dim=1)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        torch.sub(zp[:, lo:hi], mx[:, None], out=e[:, lo:hi])
        parts.append((mx, None))
    e.exp_()
    (mc, _), (mu, _) = parts
    sc, su = e[:, :m].sum(dim=1), e[:, m:].sum(dim=1)
    lse_c, lse_u = mc + torch.log(sc), mu + torch.log(su)
    lse = torch.logaddexp(lse_c, lse_u)
    has = sc > 0
    log_n = zp[:, :m].sub_(torch.where(has, lse_c, torch.zeros_like(lse_c))[:, None])  # -inf entries stay -inf
    pn = e[:, :m].mul_(torch.where(has, 1.0 / sc, torch.zeros_like(sc))[:, None])
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    pu = e[:, m:].mul_(torch.exp(mu - lse_safe)[:, None])  # exp(z_U - lse)
    return log_n, pn, lse_c, lse, pu


def hkl_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    projection=None,
    common: CommonSet | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    normalizer=None,
    **options,
):
    """H-KL: `hybrid_loss` with the common set of W rows whose top weight is >= `threshold`.

    Pass `projection` (a `Projection`, an artifact directory or `(indices, weights)`), or a
    precomputed `common` (`common_by_threshold(projection, threshold)`, or with `public=True`
    `public_common_set(projection, "hkl", threshold)`; the module wrapper caches it). Other options
    as `hybrid_loss`."""
    if common is None:
        if projection is None:
            raise LossOptionError("hkl: pass projection=... (or a precomputed common=common_by_threshold(...))")
        proj = as_projection(projection, "cpu") if not isinstance(projection, Projection) else projection
        teacher_outputs = as_teacher_outputs(teacher_outputs, loss="hkl", accepts=TEACHER_FORMS, needs=TOPK_REST_KEYS)
        proj.check_widths(student_logits.shape[-1], teacher_outputs.width or proj.teacher_width)
        public = options.get("public")
        common = _public_common(proj, "hkl", threshold) if public else common_by_threshold(proj, threshold)
    return hybrid_loss(student_logits, teacher_outputs, batch, common=common, normalizer=normalizer,
                       loss_name="hkl", **options)


def gold_loss(
    student_logits: torch.Tensor,
    teacher_outputs,
    batch: dict,
    *,
    common=None,
    projection=None,
    normalizer=None,
    **options,
):
    """GOLD hybrid: `hybrid_loss` with the exact-match common set.

    Pass `common` (a `CommonSet` or a `[V_s]` map of teacher ids, -1 = none) or `projection` (a
    loaded `Projection` or an artifact directory; its `row_kind` marks the exact rows; with
    `public=True` the published rule instead, `public_common_set(projection, "gold")`, and then
    `(indices, weights)` too). Other options as `hybrid_loss`."""
    if common is None and options.get("public") and projection is not None:
        common = _public_common(projection, "gold")
    if common is None:
        if projection is None or not isinstance(projection, (str, os.PathLike, Projection)):
            raise LossOptionError(
                "gold: pass common=... (a [V_s] map of exactly matching teacher ids) or projection=... (a loaded "
                "Projection or an artifact directory; its row_kind marks exact rows)"
            )
        common = common_exact(projection)
    return hybrid_loss(student_logits, teacher_outputs, batch, common=common, normalizer=normalizer,
                       loss_name="gold", **options)


def _public_common(projection, kind: str, threshold: float = DEFAULT_THRESHOLD) -> CommonSet:
    from xtoken_loss.losses.public import public_common_set  # public.py imports this module

    return public_common_set(projection, kind, threshold)


# --------------------------------------------------------------------------------------------------
# The multi-teacher loss's per-teacher preparation (registry hook `prepare_teacher`): the common set,
# computed once per teacher instead of on every call.


def prepare_hkl_teacher(spec, projection) -> dict:
    """`common` for an H-KL teacher from its loaded projection (unless its options give one)."""
    if "common" in spec.loss_options:
        return {}
    threshold = spec.loss_options.get("threshold", DEFAULT_THRESHOLD)
    if spec.loss_options.get("public"):
        return {"common": _public_common(projection, "hkl", threshold)}
    return {"common": common_by_threshold(projection, threshold)}


def prepare_gold_teacher(spec, projection) -> dict:
    """`common` for a GOLD teacher: the exact rows of its loaded projection (unless its options give one)."""
    if "common" in spec.loss_options:
        return {}
    return {"common": _public_common(projection, "gold") if spec.loss_options.get("public") else
            common_exact(projection)}


# --------------------------------------------------------------------------------------------------
# Modules


class _HybridModule(LossModule):
    @property
    def common(self) -> CommonSet:
        return self.artifact("common")


class HKLLoss(_HybridModule):
    """`hkl_loss` with fixed options; the common set is computed once from `projection` (a
    `Projection`, an artifact directory or `(indices, weights)`) at `threshold`, or given as `common`."""

    function = staticmethod(hkl_loss)
    options_type = HKLOptions

    def __init__(self, projection=None, *, common: CommonSet | None = None, threshold: float = DEFAULT_THRESHOLD,
                 teacher_index: int = 0, temperature: float = 1.0, public: bool = False, direction: str = "forward",
                 common_weight: float = 1.0, uncommon_weight: float = 1.0, chunk_form: str | None = None,
                 tail_cut: int | None = None, correct_only: bool | None = None, position_chunk_size: int | None = None,
                 check_inputs: bool = False):
        super().__init__(threshold=threshold, teacher_index=teacher_index, temperature=temperature, public=public,
                         direction=direction, common_weight=common_weight, uncommon_weight=uncommon_weight,
                         chunk_form=chunk_form, tail_cut=tail_cut, correct_only=correct_only,
                         position_chunk_size=position_chunk_size, check_inputs=check_inputs)
        del self.options["threshold"]  # used here, once; the function gets the common set
        if common is None:
            if projection is None:
                raise LossOptionError("HKLLoss: pass a projection (or a precomputed common=common_by_threshold(...))")
            common = (_public_common(projection, "hkl", threshold) if public
                      else common_by_threshold(projection, threshold))
        self.register_artifact("common", _as_common(common, "cpu"))


class GOLDLoss(_HybridModule):
    """`gold_loss` with fixed options; `common`: a `CommonSet`, a `[V_s]` exact map, or an artifact
    directory whose `row_kind` marks the exact rows (or pass that directory as `projection`)."""

    function = staticmethod(gold_loss)
    options_type = GOLDOptions

    def __init__(self, common=None, *, projection=None, teacher_index: int = 0, temperature: float = 1.0,
                 public: bool = False, direction: str = "forward", common_weight: float = 1.0,
                 uncommon_weight: float = 1.0, chunk_form: str | None = None, tail_cut: int | None = None,
                 correct_only: bool | None = None, position_chunk_size: int | None = None, check_inputs: bool = False):
        super().__init__(teacher_index=teacher_index, temperature=temperature, public=public, direction=direction,
                         common_weight=common_weight, uncommon_weight=uncommon_weight, chunk_form=chunk_form,
                         tail_cut=tail_cut, correct_only=correct_only, position_chunk_size=position_chunk_size,
                         check_inputs=check_inputs)
        if common is None:
            if projection is None:
                raise LossOptionError(
                    "GOLDLoss: pass common=... (a [V_s] map of exactly matching teacher ids) or projection=<artifact "
                    "directory> (its row_kind marks exact rows)"
                )
            common = projection
        if public and isinstance(common, (str, os.PathLike, Projection, tuple)):
            common = _public_common(common, "gold")  # the published rule on the projection
        self.register_artifact("common", common_exact(common))
