"""`public=True` is NeMo-RL's X-Token loss, its defaults included: P-KL (forward, reverse), GOLD (forward,
reverse) and H-KL against the float64 transcription of the published semantics (`tests/reference_nemo.py`)
on a restricted real llama3 -> qwen3 problem loaded from a projection artifact whose teacher logits are
wider than its teacher vocabulary; the published common-set rules; finite losses and gradients on
confident full-width float32 / bf16 logits; padding; NaN at a position the loss reads."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from tests.reference_losses import (
    dense_projection,
    heldout_texts,
    is_close,
    random_logits,
    real_tokenizers,
    restrict_problem,
)
from tests.reference_nemo import nemo_exact_map, nemo_gold, nemo_pkl
from xtoken_core.artifact_format import write_projection_files
from xtoken_core.errors import LossOptionError
from xtoken_loss import GOLDLoss, HKLLoss, PKLLoss, Projection, count_units, load_projection
from xtoken_loss.losses.hybrid import common_exact, gold_loss, hkl_loss
from xtoken_loss.losses.pkl import pkl_loss
from xtoken_loss.losses.public import public_common_set, public_teacher_vocab_size

PAD_COLUMNS = 16  # the teacher's output layer is wider than its tokenizer (Qwen3: 151,936 for 151,669)
TEXT_TAIL = " 12345 <|start_header_id|>user<|end_of_text|>"  # digits, and two special-token pairs


def _side(vocab_size, model_vocab_size):
    return {"name": None, "fingerprint": None, "vocab_size": vocab_size, "model_vocab_size": model_vocab_size}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real batch and W restricted to a small vocabulary, written as a projection artifact whose
    teacher model vocab size is `PAD_COLUMNS` wider than its teacher vocab size, and logits for it."""
    from xtoken_align.batch.collate import collate

    s_tok, t_tok, proj = real_tokenizers()
    batch = dict(collate([t + TEXT_TAIL for t in heldout_texts(3, 160)], s_tok, [t_tok]))
    batch, idx, w, s_sel, t_map = restrict_problem(batch, proj, t_tok.vocab_size, 120, 0)
    vs, vt = int(s_sel.numel()), int((t_map >= 0).sum())
    rk = torch.as_tensor(proj.row_kind)[s_sel]
    d = tmp_path_factory.mktemp("projection")
    meta = {"schema_version": 1, "kind": "projection", "direction": "student_to_teacher", "top_k": idx.shape[1],
            "student": _side(vs, vs), "teacher": _side(vt, vt + PAD_COLUMNS)}
    write_projection_files(d, idx.numpy(), w.numpy(), rk.numpy(), meta)
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    zs = random_logits(21, (B, Ls, vs))
    zt = random_logits(22, (B, Lt, vt + PAD_COLUMNS))
    nxt = batch["teacher_0_input_ids"][:, 1:]  # the teacher leans towards the tokens that follow
    zt[:, :-1].scatter_add_(2, nxt[..., None], torch.full(nxt.shape + (1,), 6.0, dtype=zt.dtype))
    zt[..., vt:] += 8.0  # padded columns a model never trained: large, so reading them would show
    return SimpleNamespace(batch=batch, idx=idx, w=w, vs=vs, vt=vt, path=d, proj=load_projection(d), zs=zs, zt=zt,
                           W=dense_projection(idx, w, vs, vt))


def _grad(fn, zs):
    x = zs.detach().clone().requires_grad_()
    loss, metrics = fn(x)
    (loss * 1.3).backward()
    return loss.detach(), x.grad, metrics


def _assert_matches(lib, ref):
    (l1, g1, _), (l2, g2, _) = lib, ref
    assert torch.isfinite(l1) and is_close(l1, l2), (float(l1), float(l2))
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)


# --- against the published semantics -------------------------------------------------------------


def test_the_fixture_has_what_the_published_rules_are_about(real):
    P = real.proj
    assert public_teacher_vocab_size(P) == real.vt and P.teacher_width == real.vt + PAD_COLUMNS
    pv, pc = real.batch["alignment_0_pair_valid"], real.batch["alignment_0_pair_is_correct"]
    assert int((pv & ~pc).sum()) >= 3  # not-correct chunks, which the public forms count
    gold, exact = public_common_set(P, "gold"), common_exact(P)
    extra = set(zip(gold.student_ids.tolist(), gold.teacher_ids.tolist())) - set(
        zip(exact.student_ids.tolist(), exact.teacher_ids.tolist()))
    assert len(extra) == 2 and exact.size > 100  # the two special-token pairs row_kind calls "special"


@pytest.mark.parametrize(("direction", "temperature", "top_k"),
                         [("forward", 1.0, None), ("reverse", 1.0, None), ("forward", 2.0, None),
                          ("reverse", 2.0, 64), ("forward", 1.0, 64)])
def test_pkl_is_nemo_rl_p_kl(real, direction, temperature, top_k):
    opts = {"direction": direction, "temperature": temperature, "top_k_columns": top_k}
    opts = {k: v for k, v in opts.items() if v not in (None, "forward", 1.0)}  # the defaults: public=True alone
    lib = _grad(lambda x: pkl_loss(x, real.zt, real.batch, projection=real.proj, public=True, **opts), real.zs)
    ref = _grad(lambda x: nemo_pkl(x, real.zt, real.batch, real.W, temperature=temperature,
                                   vocab_topk=top_k or 8192, reverse_kl=direction == "reverse")[:2], real.zs)
    _assert_matches(lib, ref)
    n = nemo_pkl(real.zs, real.zt, real.batch, real.W)[1]
    assert n == int(count_units(real.batch, "pkl", public=True)) > 50
    assert n > nemo_pkl(real.zs, real.zt, real.batch, real.W, exact_token_match_only=True)[1]


def test_pkl_drops_teacher_columns_past_the_projection(real):
    """Reading the padded columns would change the number (the test can fail)."""
    lib = pkl_loss(real.zs, real.zt, real.batch, projection=real.proj, public=True)[0]
    W_wide = torch.cat([real.W, torch.zeros(real.vs, PAD_COLUMNS, dtype=real.W.dtype)], dim=1)
    uncut = nemo_pkl(real.zs, real.zt, real.batch, W_wide)[0]
    assert not is_close(lib, uncut, 1e-3)


@pytest.mark.parametrize(("kind", "direction", "temperature"),
                         [("gold", "forward", 1.0), ("gold", "reverse", 1.0), ("gold", "forward", 2.0),
                          ("gold", "reverse", 2.0), ("hkl", "forward", 1.0), ("hkl", "forward", 2.0),
                          ("hkl", "reverse", 1.0)])
def test_gold_and_hkl_are_nemo_rl_gold_loss(real, kind, direction, temperature):
    fn = gold_loss if kind == "gold" else hkl_loss
    opts = {k: v for k, v in {"direction": direction, "temperature": temperature}.items() if v not in ("forward", 1.0)}
    lib = _grad(lambda x: fn(x, real.zt, real.batch, projection=real.proj, public=True, **opts), real.zs)
    common = nemo_exact_map(real.idx, real.w, real.vt, xtoken_loss=kind == "hkl")[:2]
    ref = _grad(lambda x: nemo_gold(x, real.zt, real.batch, common, student_vocab_size=real.vs,
                                    teacher_vocab_size=real.vt, temperature=temperature,
                                    reverse_kl=direction == "reverse"), real.zs)
    _assert_matches(lib, ref)
    if kind == "gold" and direction == "forward" and temperature == 1.0:
        # the padded teacher columns and the common-set rule both matter
        uncut = nemo_gold(real.zs, real.zt, real.batch, common, student_vocab_size=real.vs)[0]
        ex = common_exact(real.proj)
        by_row_kind = nemo_gold(real.zs, real.zt, real.batch, (ex.student_ids, ex.teacher_ids),
                                student_vocab_size=real.vs, teacher_vocab_size=real.vt)[0]
        assert not is_close(lib[0], uncut, 1e-3) and not is_close(lib[0], by_row_kind, 1e-9)
    n = nemo_gold(real.zs, real.zt, real.batch, common)[1]
    assert int(count_units(real.batch, kind, public=True)) == n


def test_common_sets_follow_the_published_rules(real):
    for kind in ("gold", "hkl"):
        cs = public_common_set(real.path, kind)  # an artifact directory works too
        ref = nemo_exact_map(real.idx, real.w, real.vt, xtoken_loss=kind == "hkl")
        assert (cs.student_ids.tolist(), cs.teacher_ids.tolist()) == (ref[0], ref[1])
        assert (cs.student_vocab_size, cs.teacher_vocab_size) == (real.vs, real.vt)
    # hand-built: collisions, the float32 comparisons, slot 1 not empty
    idx = torch.tensor([[3, -1], [3, -1], [4, 2], [1, 0], [1, 0], [2, 0], [0, 5], [5, -1]])
    w = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0.0], [0.7, 0.3], [0.7, 0.3], [0.6, 0.4], [0.59999, 0.40001],
                      [1.0, 0]], dtype=torch.float64)
    proj = Projection.from_tensors(idx, w, teacher_width=6)
    gold = public_common_set(proj, "gold")
    # rows 0 and 1 share teacher 3: the lower id wins; row 2's slot 1 is not empty
    assert gold.student_ids.tolist() == [0, 7] and gold.teacher_ids.tolist() == [3, 5]
    hkl = public_common_set(proj, "hkl")
    # teacher 3: rows 0, 1 (1.0) -> 0; teacher 4: row 2; teacher 1: rows 3, 4 (0.7) -> 3; row 5's 0.6 (float32)
    # counts, row 6's 0.59999 does not; teacher 5: row 7
    assert hkl.student_ids.tolist() == [0, 2, 3, 5, 7] and hkl.teacher_ids.tolist() == [3, 4, 1, 2, 5]
    for kind, cs in (("gold", gold), ("hkl", hkl)):
        ref = nemo_exact_map(idx, w, 6, xtoken_loss=kind == "hkl")
        assert (cs.student_ids.tolist(), cs.teacher_ids.tolist()) == (ref[0], ref[1])
    with pytest.raises(LossOptionError, match="valid kinds are 'gold', 'hkl'"):
        public_common_set(proj, "uld")


def test_modules_take_the_same_options(real):
    b, zs, zt, P = real.batch, real.zs, real.zt, real.proj
    pairs = [
        (PKLLoss(P, public=True, direction="reverse", temperature=2.0),
         pkl_loss(zs, zt, b, projection=P, public=True, direction="reverse", temperature=2.0)),
        (GOLDLoss(projection=real.path, public=True, direction="reverse"),
         gold_loss(zs, zt, b, projection=P, public=True, direction="reverse")),
        (HKLLoss(P, public=True, temperature=2.0), hkl_loss(zs, zt, b, projection=P, public=True, temperature=2.0)),
    ]
    for module, (loss, metrics) in pairs:
        got, got_m = module(zs, zt, b)
        assert is_close(got, loss, 1e-12) and got_m.keys() == metrics.keys()
    n = int(count_units(b, "gold", public=True))
    for fn in (pkl_loss, gold_loss, hkl_loss):
        a = fn(zs, zt, b, projection=P, public=True)[0]
        assert is_close(a, fn(zs, zt, b, projection=P, public=True, normalizer=float(n))[0], 1e-12)


def test_public_column_choice_under_a_process_group(real, monkeypatch):
    import torch.distributed as dist

    calls = []

    def fake_all_reduce(t, op=None, group=None):
        calls.append((op, group))
        t[3] = 1e9  # another rank saw column 3 with a huge logit: it must be chosen

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    group = object()
    got = pkl_loss(real.zs, real.zt, real.batch, projection=real.proj, public=True, top_k_columns=8,
                   process_group=group)[0]
    assert calls == [(dist.ReduceOp.MAX, group)]
    top7 = nemo_pkl(real.zs, real.zt, real.batch, real.W, vocab_topk=7)[2]
    assert 3 not in top7
    assert is_close(got, nemo_pkl(real.zs, real.zt, real.batch, real.W, columns=top7 + [3])[0])


# --- padding and NaN -----------------------------------------------------------------------------

_FORMS = {
    "pkl": lambda x, zt, b, P, **kw: pkl_loss(x, zt, b, projection=P, public=True, top_k_columns=64, **kw),
    "gold": lambda x, zt, b, P, **kw: gold_loss(x, zt, b, projection=P, public=True, **kw),
    "hkl": lambda x, zt, b, P, **kw: hkl_loss(x, zt, b, projection=P, public=True, direction="reverse", **kw),
}


@pytest.mark.parametrize("form", list(_FORMS))
@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_padding_never_matters(real, form, junk):
    fn = _FORMS[form]
    b = dict(real.batch, sample_mask=real.batch["token_mask"].new_ones(real.zs.shape[0]))
    b["sample_mask"][-1] = False  # a dropped sample's rows are padding too
    pad_s = ~b["token_mask"]
    pad_s[-1] = True
    pad_t = ~b["teacher_0_token_mask"]
    assert pad_s.any() and pad_t.any()
    zt0 = real.zt.clone()
    if form == "pkl":  # its column choice reads padded rows by definition: start from rows that claim nothing
        zt0[pad_t] = -float("inf")
    base = _grad(lambda x: fn(x, zt0, b, real.proj), real.zs)
    zs, zt = real.zs.clone(), zt0.clone()
    zs[pad_s] = junk
    zt[pad_t] = -junk if form == "pkl" and junk == 1e30 else junk  # rows holding NaN / +inf claim no column
    loss, grad, metrics = _grad(lambda x: fn(x, zt, b, real.proj), zs)
    assert is_close(loss, base[0], 1e-12)
    assert all(is_close(metrics[k], base[2][k], 1e-12) for k in metrics)
    assert torch.count_nonzero(grad[pad_s]) == 0
    torch.testing.assert_close(grad, base[1], rtol=1e-10, atol=1e-12)


def test_pkl_column_choice_reads_padding_with_a_finite_gradient(real):
    zt = real.zt.clone()
    pad_t = ~real.batch["teacher_0_token_mask"]
    zt[pad_t] = -50.0
    zt[pad_t.nonzero()[0, 0], pad_t.nonzero()[0, 1], :64] = 1e4  # a padded row claims 64 columns
    base = pkl_loss(real.zs, real.zt, real.batch, projection=real.proj, public=True, top_k_columns=64)[0]
    loss, grad, _ = _grad(lambda x: pkl_loss(x, zt, real.batch, projection=real.proj, public=True,
                                             top_k_columns=64), real.zs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and not is_close(loss, base)
    assert torch.count_nonzero(grad[~real.batch["token_mask"]]) == 0


@pytest.mark.parametrize("form", list(_FORMS))
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_nan_at_a_read_position_gives_nan(real, form, side):
    fn = _FORMS[form]
    b = real.batch
    mask = b["token_mask"] if side == "student" else b["teacher_0_token_mask"]
    row = mask[0].nonzero()[3, 0]  # a real position inside the first sample, which some chunk reads
    zs, zt = real.zs.clone(), real.zt.clone()
    target = zs if side == "student" else zt
    target[0, row, 0] = float("nan")  # one entry: column 0 is no top column of the P-KL here
    loss, metrics = fn(zs, zt, b, real.proj)
    assert torch.isnan(loss)


# --- confident logits at full width --------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _full_problem():
    from xtoken_align.batch.collate import collate

    s_tok, t_tok, proj = real_tokenizers()
    batch = dict(collate([t + TEXT_TAIL for t in heldout_texts(1, 80)], s_tok, [t_tok]))
    meta = {"student": _side(s_tok.vocab_size, s_tok.vocab_size), "teacher": _side(t_tok.vocab_size, 151936)}
    P = Projection.from_tensors(torch.as_tensor(proj.indices), torch.as_tensor(proj.weights), teacher_width=151936,
                                metadata=meta, row_kind=torch.as_tensor(proj.row_kind))
    commons = {k: public_common_set(P, k) for k in ("gold", "hkl")}
    return batch, P, commons


_FULL_FORMS = {
    "pkl": lambda x, zt, b, P, c: pkl_loss(x, zt, b, projection=P, public=True),
    "pkl_reverse": lambda x, zt, b, P, c: pkl_loss(x, zt, b, projection=P, public=True, direction="reverse"),
    "gold": lambda x, zt, b, P, c: gold_loss(x, zt, b, common=c["gold"], public=True),
    "gold_reverse": lambda x, zt, b, P, c: gold_loss(x, zt, b, common=c["gold"], public=True, direction="reverse"),
    "hkl": lambda x, zt, b, P, c: hkl_loss(x, zt, b, common=c["hkl"], public=True),
}


@functools.lru_cache(maxsize=None)
def _confident_logits(case, dtype):
    batch, P, _ = _full_problem()
    B, Ls = batch["input_ids"].shape
    Lt = batch["teacher_0_input_ids"].shape[1]
    g = torch.Generator().manual_seed(5)
    if case == "spike":  # N(0, 1) plus +100 on one id
        zs = torch.randn(B, Ls, P.num_rows, generator=g)
        zs[..., 1234] += 100.0
        zt = torch.randn(B, Lt, 151936, generator=g) * 2
    else:  # std 12 on both sides
        zs = torch.randn(B, Ls, P.num_rows, generator=g) * 12
        zt = torch.randn(B, Lt, 151936, generator=g) * 12
    return zs.to(dtype), zt.to(dtype)


@pytest.mark.parametrize("form", list(_FULL_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["spike", "std12"])
def test_confident_logits_give_finite_losses_and_gradients(case, dtype, form):
    """Full llama3 / qwen3 width (151,936 teacher logits for 151,669 tokens). The public forms are
    exempt from the float64 closeness (the published 1e-10 is part of them), not from finiteness."""
    batch, P, commons = _full_problem()
    zs, zt = _confident_logits(case, dtype)
    loss, grad, metrics = _grad(lambda x: _FULL_FORMS[form](x, zt, batch, P, commons), zs)
    assert torch.isfinite(loss)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())
