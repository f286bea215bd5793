"""Build a sparse cross-tokenizer projection W (student -> teacher, and back on request).

W has one row per source id and at most `top_k` (column id, weight) entries per row, each mapped
row summing to 1. It is assembled from sparse triplets with scipy.sparse, never as a dense
V_s x V_t matrix. The passes (see docs/projection.md for the formulas):

1. exact: a token whose canonical bytes equal a target token's maps there with weight 1 (pinned);
2. forward decomposition: any other token's bytes split into target tokens the way the target
   tokenizer splits them; piece i gets `first_weight * decay**(i-1)` (i <= max_pieces), normalised;
3. reverse pass (on by default): each non-exact target token split into source tokens adds
   `reverse_weight` times the same decaying weights to those source rows, at the target token's
   column;
4. special tokens by role (then identical content, then a fallback role), pinned;
5. optional corpus evidence (`projection_refine`), blended with the prior as
   `(prior_strength * prior + counts) / (prior_strength + n)` on rows with n > 0 observations;
6. top-k per row, renormalised; exact and special rows stay one-hot.

Rows of padded ids (a model output wider than the tokenizer) and unused ids are empty; columns
never point past the target tokenizer's vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import scipy.sparse as sp

from xtoken_align.projection import artifacts as art
from xtoken_align.projection.rules import ByteSplitter, Pieces, decay_weights, decompose, exact_map, special_map
from xtoken_align.tokenizer.loader import TokenizerInfo
from xtoken_core.artifact_format import STUDENT_TO_TEACHER, TEACHER_TO_STUDENT
from xtoken_core.config import MAX_VOCAB_SIZE, Config, config, option
from xtoken_core.errors import ConfigError

METHOD_NAME = "xtoken_rule_based"

# Upper bounds of the options (with `xtoken_core.config.MAX_VOCAB_SIZE` for the model widths): a
# projection holds rows x top_k entries (12 bytes each while built), so top_k 256 over 262k rows
# is already ~800 MB; a decomposition has at most a token's byte length of pieces.
MAX_TOP_K = 256
MAX_PIECES = 256

Progress = Callable[..., None]  # progress(step, completed=None, total=None)


@config
class ProjectionConfig(Config):
    """Options of the projection builder, validated when built (`xtoken_core.config`).

    `to_dict()` is what an artifact records as `method.params` (plus the corpus summary under
    `corpus` when refined); `from_params` rebuilds the config from those recorded params.
    """

    top_k: int = option(4, min=1, max=MAX_TOP_K, help="Entries kept per row.")
    first_weight: float = option(0.9, gt=0, max=1e6, help="Weight of a decomposition's first piece (before "
                                                          "normalising).")
    decay: float = option(0.1, gt=0, max=1, help="Factor per further piece: piece i gets "
                                                 "first_weight * decay**(i-1).")
    max_pieces: int = option(4, min=1, max=MAX_PIECES, help="Pieces of a decomposition that get weight.")
    reverse: bool = option(True, help="Reverse pass: teacher tokens split by the student tokenizer add weight.")
    reverse_weight: float = option(1.0, min=0, max=1e6, help="Scale of the reverse pass relative to a forward "
                                                             "decomposition.")
    prior_strength: float = option(4.0, min=0, max=1e9, help="Corpus blend: pseudo-count of the rule-based prior "
                                                             "per row.")
    student_model_vocab_size: int | None = option(None, min=1, max=MAX_VOCAB_SIZE,
                                                  help="Student model output width (rows), if wider than the "
                                                       "tokenizer; padded rows are empty.")
    teacher_model_vocab_size: int | None = option(None, min=1, max=MAX_VOCAB_SIZE,
                                                  help="Teacher model output width, if wider than the tokenizer "
                                                       "(e.g. 151936 for Qwen3); padded teacher ids get no weight.")
    both_directions: bool = option(False, help="Also build the teacher-to-student projection.")

    @classmethod
    def from_params(cls, params: Mapping) -> "ProjectionConfig":
        """The config an artifact's recorded `method.params` describe (the corpus summary dropped)."""
        return cls.from_dict({k: v for k, v in params.items() if k != "corpus"})


@dataclass
class ProjectionBuild:
    """What `build_projection` returns: the student -> teacher projection and, with
    `both_directions`, the teacher -> student one."""

    forward: art.ProjectionArtifact
    reverse: art.ProjectionArtifact | None = None

    def save(self, out) -> None:
        art.write_projection(out, self.forward, self.reverse)


def _model_vocab_size(tok: TokenizerInfo, size: int | None, option: str) -> int:
    if size is None:
        return tok.vocab_size
    if not isinstance(size, int) or size < tok.vocab_size:
        raise ConfigError(f"{option} is {size}, smaller than the {tok.name} tokenizer's vocab size "
                          f"{tok.vocab_size}; give the model's output width (>= {tok.vocab_size}) or leave it out")
    return size


def model_vocab_sizes(student: TokenizerInfo, teacher: TokenizerInfo, cfg: ProjectionConfig) -> tuple[int, int]:
    """(student rows, teacher rows): the model output widths, checked against the tokenizers."""
    return (_model_vocab_size(student, cfg.student_model_vocab_size, "student_model_vocab_size (--student-vocab-size)"),
            _model_vocab_size(teacher, cfg.teacher_model_vocab_size, "teacher_model_vocab_size (--teacher-vocab-size)"))


def _text_ids(tok: TokenizerInfo) -> np.ndarray:
    return ~(tok.is_special | tok.is_unused)


def build_projection(student: TokenizerInfo, teacher: TokenizerInfo, config: ProjectionConfig | None = None, *,
                     corpus: list[str] | None = None, corpus_name: str | None = None,
                     progress: Progress | None = None) -> ProjectionBuild:
    """Build the projection(s) between two tokenizers (see the module docstring)."""
    cfg = config or ProjectionConfig()
    rows_s, rows_t = model_vocab_sizes(student, teacher, cfg)
    say = progress or (lambda *a, **k: None)

    say("exact matches")
    exact_st = exact_map(student, teacher)
    exact_ts = exact_map(teacher, student)
    need_ts = cfg.reverse or cfg.both_directions
    say("decomposing student tokens with the teacher tokenizer")
    dec_st = decompose(student, np.flatnonzero(_text_ids(student) & (exact_st < 0)), ByteSplitter(teacher))
    dec_ts = None
    if need_ts:
        say("decomposing teacher tokens with the student tokenizer")
        dec_ts = decompose(teacher, np.flatnonzero(_text_ids(teacher) & (exact_ts < 0)), ByteSplitter(student))

    counts, corpus_info = None, None
    if corpus is not None:
        from xtoken_align.projection.refine import cooccurrence_counts

        say("corpus co-occurrence", 0, len(corpus))
        counts, corpus_info = cooccurrence_counts(student, teacher, corpus, progress=progress)
        if corpus_name is not None:
            corpus_info = {"path": corpus_name, **corpus_info}

    say("assembling student -> teacher")
    forward = _one_direction(student, teacher, rows_s, rows_t, exact_st, dec_st, dec_ts if cfg.reverse else None,
                             counts, corpus_info, cfg, STUDENT_TO_TEACHER)
    reverse = None
    if cfg.both_directions:
        say("assembling teacher -> student")
        reverse = _one_direction(teacher, student, rows_t, rows_s, exact_ts, dec_ts, dec_st if cfg.reverse else None,
                                 counts.T.tocsr() if counts is not None else None, corpus_info, cfg,
                                 TEACHER_TO_STUDENT)
    return ProjectionBuild(forward=forward, reverse=reverse)


def _triplets(dec: Pieces, cfg: ProjectionConfig, *, swap: bool, scale: float):
    """(rows, cols, vals) of decompositions: forward (row = decomposed id, cols = pieces) or, with
    `swap`, reverse (rows = pieces, col = the decomposed id)."""
    owner, piece_idx, w = decay_weights(dec.ptr, first_weight=cfg.first_weight, decay=cfg.decay,
                                        max_pieces=cfg.max_pieces)
    whole, pieces = dec.ids[owner], dec.pieces[piece_idx]
    if swap:
        return pieces, whole, w * scale
    return whole, pieces, w * scale


def _row_normalise(m: sp.csr_matrix) -> sp.csr_matrix:
    sums = np.asarray(m.sum(axis=1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    return sp.diags(inv) @ m


def top_k_rows(m: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep each row's `k` largest entries (ties: lower column id first) and renormalise.

    Returns `indices [R, k]` int64 (-1 = empty), `weights [R, k]` float64 and the number of
    candidates each row had before the cut.
    """
    m = m.tocsr()
    m.sum_duplicates()
    m.eliminate_zeros()
    n_rows = m.shape[0]
    nnz_per_row = np.diff(m.indptr)
    row_of = np.repeat(np.arange(n_rows), nnz_per_row)
    order = np.lexsort((m.indices, -m.data, row_of))
    rank = np.arange(len(order)) - m.indptr[row_of[order]]
    keep = rank < k
    sel = order[keep]
    indices = np.full((n_rows, k), -1, dtype=np.int64)
    weights = np.zeros((n_rows, k), dtype=np.float64)
    r, c = row_of[sel], rank[keep]
    indices[r, c] = m.indices[sel]
    weights[r, c] = m.data[sel]
    total = weights.sum(axis=1, keepdims=True)
    np.divide(weights, total, out=weights, where=total > 0)
    return indices, weights, nnz_per_row


def _one_direction(src: TokenizerInfo, dst: TokenizerInfo, n_rows: int, dst_model_vocab: int, exact: np.ndarray,
                   fwd: Pieces, rev: Pieces | None, counts: sp.csr_matrix | None, corpus_info: dict | None,
                   cfg: ProjectionConfig, direction: str) -> art.ProjectionArtifact:
    v_src, v_dst = src.vocab_size, dst.vocab_size
    specials, unmatched_named = special_map(src, dst)
    exact = np.where(_text_ids(src), exact, -1)
    pinned = np.full(v_src, -1, dtype=np.int64)  # id -> its one-hot target
    pinned[exact >= 0] = exact[exact >= 0]
    special_ids = np.fromiter(specials.keys(), dtype=np.int64, count=len(specials))
    pinned[special_ids] = np.fromiter(specials.values(), dtype=np.int64, count=len(specials))
    free = pinned < 0

    # Forward decomposition rows (each sums to 1), plus the reverse pass at reverse_weight.
    r, c, v = _triplets(fwd, cfg, swap=False, scale=1.0)
    parts = [(r, c, v)]
    if rev is not None and cfg.reverse_weight > 0:
        parts.append(_triplets(rev, cfg, swap=True, scale=cfg.reverse_weight))
    rows = np.concatenate([p[0] for p in parts])
    cols = np.concatenate([p[1] for p in parts])
    vals = np.concatenate([p[2] for p in parts])
    keep = free[rows]
    prior = sp.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(v_src, v_dst))
    prior.sum_duplicates()
    has_fwd = np.zeros(v_src, dtype=bool)
    has_fwd[fwd.ids[np.diff(fwd.ptr) > 0]] = True
    has_fwd &= free
    has_rev = np.zeros(v_src, dtype=bool)
    if len(parts) > 1:
        has_rev[parts[1][0]] = True
        has_rev &= free
    prior = _row_normalise(prior)

    refined = np.zeros(v_src, dtype=bool)
    if counts is not None:
        counts = sp.diags(free.astype(np.float64)) @ counts  # pinned rows ignore corpus evidence
        n = np.asarray(counts.sum(axis=1)).ravel()
        refined = n > 0
        a = cfg.prior_strength
        scale = np.where(refined, 1.0 / np.maximum(a + n, 1e-12), 1.0)
        prior_scale = np.where(refined, a * scale, 1.0)
        prior = sp.diags(prior_scale) @ prior + sp.diags(np.where(refined, scale, 0.0)) @ counts
        prior = prior.tocsr()

    indices, weights, n_candidates = top_k_rows(prior, cfg.top_k)
    pin_rows = np.flatnonzero(~free)
    indices[pin_rows] = -1
    weights[pin_rows] = 0.0
    indices[pin_rows, 0] = pinned[pin_rows]
    weights[pin_rows, 0] = 1.0

    mapped = indices[:, 0] >= 0
    kind = np.full(n_rows, art.ROW_UNMAPPED, dtype=np.uint8)
    kind[:v_src][src.is_unused] = art.ROW_UNUSED
    kind[:v_src][mapped & ~free] = art.ROW_EXACT
    kind[special_ids] = art.ROW_SPECIAL
    kind[:v_src][mapped & free & refined & ~has_fwd & ~has_rev] = art.ROW_CORPUS_ONLY
    kind[:v_src][mapped & free & has_rev & ~has_fwd] = art.ROW_REVERSE_ONLY
    kind[:v_src][mapped & free & has_fwd] = art.ROW_DECOMPOSED
    kind[v_src:] = art.ROW_PADDED

    pad = n_rows - v_src
    indices = np.concatenate([indices, np.full((pad, cfg.top_k), -1, dtype=np.int64)])
    weights = np.concatenate([weights, np.zeros((pad, cfg.top_k))]).astype(np.float32)

    w = weights[:v_src].astype(np.float64)
    ent = -np.sum(np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0), axis=1)
    top = w[:, 0]
    counts_by_kind = {name: int((kind == code).sum()) for code, name in enumerate(art.ROW_KIND_NAMES)}
    stats = {
        "rows": int(n_rows),
        "mapped_rows": int(mapped.sum()),
        **{f"{name}_rows": v for name, v in counts_by_kind.items()},
        "reverse_touched_rows": int(has_rev.sum()),
        "corpus_refined_rows": int((refined & mapped).sum()),
        "truncated_rows": int(((n_candidates > cfg.top_k) & free).sum()),
        "top_weight_below_0.6_rows": int(((top < 0.6) & mapped).sum()),
        "mean_row_entropy": float(ent[mapped].mean()) if mapped.any() else 0.0,
        "mean_row_entropy_free_rows": float(ent[mapped & free].mean()) if (mapped & free).any() else 0.0,
        "decomposition": fwd.counts(),
        "unmatched_specials": int(len(src.special_tokens) - len(specials)),
        "unmatched_special_roles": unmatched_named,
    }
    rows_side, cols_side = ("student", "teacher") if direction == STUDENT_TO_TEACHER else ("teacher", "student")
    side_meta = {rows_side: art.tokenizer_meta(src, n_rows), cols_side: art.tokenizer_meta(dst, dst_model_vocab)}
    params = cfg.to_dict()
    if corpus_info is not None:
        params["corpus"] = corpus_info
    meta = {
        "schema_version": art.SCHEMA_VERSION,
        "kind": art.PROJECTION_KIND,
        "direction": direction,
        "rows": rows_side,
        "columns": cols_side,
        "student": side_meta["student"],
        "teacher": side_meta["teacher"],
        "top_k": cfg.top_k,
        "method": {"name": METHOD_NAME + ("+corpus" if corpus_info is not None else ""), "params": params},
        "padded_ids": "rows of ids >= the row tokenizer's vocab_size are empty; columns never exceed the "
                      "column tokenizer's vocab_size (padded target logits get no mass)",
        "stats": stats,
        "created_with": art.created_with(),
    }
    return art.ProjectionArtifact(indices=indices, weights=weights, meta=meta, row_kind=kind)
