"""The loss registry (`xtoken_loss.registry`): for every kind, `count_units` equals the number of units
the float64 reference sums over (counted by the reference, never by `count_units`); every module
mirrors its function's options; artifacts are non-persistent buffers that `.to()` moves; the public
surface is derived from the registry. The multi-teacher side (`normalizer="global"`, per-sequence
selection per kind) is in tests/test_multi_teacher.py."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from tests.reference_losses import (
    dense_projection,
    random_logits,
    random_projection,
    reference_alm,
    reference_ce,
    reference_hybrid,
    reference_kl,
    reference_pkl,
    reference_uld,
    synthetic_batch,
)
from xtoken_core.errors import LossOptionError
from xtoken_loss import count_units
from xtoken_loss.losses.hybrid import CommonSet, common_by_threshold, hybrid_loss
from xtoken_loss.projection import Projection
from xtoken_loss.registry import REGISTRY, VARIANT_MODULES

VS, VT = 40, 50


def _problem(seed):
    batch = synthetic_batch(seed)
    Ls, Lt = batch["input_ids"].shape[1], batch["teacher_0_input_ids"].shape[1]
    zs = random_logits(seed + 1, (3, Ls, VS))
    zt = random_logits(seed + 2, (3, Lt, VT))
    idx, w = random_projection(seed + 3, VS, VT)
    return batch, zs, zt, idx, w


def _reference_count(kind, batch, zs, zt, idx, w, options):
    """The number of units the float64 reference of `kind` sums over with `options`."""
    correct_only = options.get("correct_only")  # None: the form's default (public P-KL / hybrids: every chunk)
    kept = True if correct_only is None else correct_only  # ULD and ALM: correct chunks unless told
    if kind == "ce":
        return reference_ce(zs, batch)[1]
    if kind == "kl":
        return reference_kl(zs, random_logits(9, zs.shape), batch)[1]
    if kind == "pkl":
        W = dense_projection(idx, w, VS, VT)
        return reference_pkl(zs, zt, batch, W, top_k_columns=None, public=options.get("public", False),
                             correct_only=correct_only)[1]
    if kind == "uld":
        form = options.get("chunk_form") or ("chain" if options.get("public") else "start")
        return reference_uld(zs, zt, batch, form=form, correct_only=kept)[1]
    if kind in ("hkl", "gold"):
        cs = common_by_threshold(Projection.from_tensors(idx, w), 0.3)
        common = (cs.student_ids.tolist(), cs.teacher_ids.tolist())
        return reference_hybrid(zs, zt, batch, common, public=options.get("public", False),
                                chunk_form=options.get("chunk_form"), correct_only=correct_only)[1]
    if kind == "alm":
        return reference_alm(zs, zt, batch, correct_only=kept)[1]
    raise AssertionError(f"no reference for kind {kind!r}: add one to this test")


CASES = [
    ("ce", {}),
    ("kl", {}),
    ("pkl", {}),
    ("pkl", {"public": True}),
    ("pkl", {"correct_only": False}),
    ("uld", {}),
    ("uld", {"public": True}),
    ("uld", {"chunk_form": "mean_log", "correct_only": False}),
    ("hkl", {}),
    ("hkl", {"public": True}),
    ("hkl", {"public": True, "correct_only": True}),
    ("gold", {}),
    ("gold", {"public": True, "correct_only": False}),
    ("alm", {}),
    ("alm", {"correct_only": False}),
]


def test_every_kind_has_a_count_case():
    assert {k for k, _ in CASES} == set(REGISTRY)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind,options", CASES, ids=[f"{k}-{'-'.join(map(str, o.values())) or 'default'}"
                                                      for k, o in CASES])
def test_count_units_equals_the_reference_count(kind, options, seed):
    batch, zs, zt, idx, w = _problem(seed)
    expected = _reference_count(kind, batch, zs, zt, idx, w, options)
    got = count_units(batch, kind, **options)
    assert got.dtype == torch.int64 and got.dim() == 0
    assert int(got) == expected


@pytest.mark.parametrize("kind,options", CASES[2:], ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES[2:])])
def test_count_units_is_what_the_loss_divides_by(kind, options):
    """normalizer=None divides by the count: passing the reference count explicitly changes nothing."""
    batch, zs, zt, idx, w = _problem(2)
    n = max(_reference_count(kind, batch, zs, zt, idx, w, options), 1)
    spec = REGISTRY[kind]
    extra = {"projection": (idx, w)} if kind == "pkl" else {}
    if kind in ("hkl", "gold"):
        extra = {"common": common_by_threshold(Projection.from_tensors(idx, w), 0.3)}
    t_out = zt
    a, _ = spec.function(zs, t_out, batch, **extra, **options)
    b, _ = spec.function(zs, t_out, batch, normalizer=float(n), **extra, **options)
    assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_count_units_refusals():
    batch = synthetic_batch(0)
    with pytest.raises(LossOptionError, match="valid kinds are 'pkl', 'hkl', 'gold', 'uld', 'alm', 'kl', 'ce'"):
        count_units(batch, "xkl")
    with pytest.raises(LossOptionError, match="no option.*'chunk_forms'"):
        count_units(batch, "uld", chunk_forms="chain")
    with pytest.raises(LossOptionError, match="chunk_form"):
        count_units(batch, "uld", chunk_form="avg")
    with pytest.raises(LossOptionError, match="depends on the logits"):
        count_units(batch, "alm", debias_gamma=0.1, student_boundary_tokens=[1, 2])
    # the documented keywords of the old signature keep working for every kind
    for kind in REGISTRY:
        count_units(batch, kind, teacher_index=0, public=False, correct_only=True, device="cpu")


# -------------------------------------------------------------------------------------------------
# modules


def _options(fn) -> dict:
    """Keyword options of a loss function, `**options` expanded to the function it forwards to."""
    params = inspect.signature(fn).parameters
    out = {n: p.default for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY}
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        inner = _options(hybrid_loss)  # hkl_loss / gold_loss forward their options to hybrid_loss
        out.update({k: v for k, v in inner.items() if k not in ("common", "loss_name")})
    out.pop("normalizer", None)
    return out


def _module_options(cls) -> dict:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p.default for p in params}


PAIRS = [(s.function, s.module) for s in REGISTRY.values()] + [
    (m.function, m) for m in VARIANT_MODULES.values()
]


@pytest.mark.parametrize("fn,module", PAIRS, ids=[m.__name__ for _, m in PAIRS])
def test_every_module_mirrors_its_function(fn, module):
    f_opts, m_opts = _options(fn), _module_options(module)
    assert set(m_opts) == set(f_opts), (sorted(set(f_opts) ^ set(m_opts)))
    for name, default in f_opts.items():
        if default is not inspect.Parameter.empty and m_opts[name] is not inspect.Parameter.empty:
            assert m_opts[name] == default, name
    # the options config covers only names the function takes
    cfg_fields = {f.name for f in dataclasses.fields(module.options_type)}
    assert cfg_fields <= set(f_opts), cfg_fields - set(f_opts)


def test_kdce_module_mirrors_its_function():
    from xtoken_loss import KDCELoss, kd_ce_loss

    assert set(_module_options(KDCELoss)) == set(_options(kd_ce_loss))


def _problem_modules():
    _batch, _zs, _zt, idx, w = _problem(0)
    proj = Projection.from_tensors(idx, w)
    ex = torch.arange(VS) % 45
    from xtoken_loss import GOLDLoss, HKLLoss, KDCELoss, PKLLoss

    return proj, [
        (PKLLoss(proj), "projection"),
        (HKLLoss(proj, threshold=0.3), "common"),
        (HKLLoss(common=CommonSet.from_map(ex)), "common"),
        (GOLDLoss(ex), "common"),
        (KDCELoss(kd_options={"projection": proj}), "projection"),
    ]


def test_artifacts_are_non_persistent_buffers_moved_by_to():
    _proj, modules = _problem_modules()
    for module, name in modules:
        assert module.state_dict() == {}, type(module).__name__  # not model state
        art = module.artifact(name)
        tensors = [getattr(art, f) for f in art.__dataclass_fields__ if isinstance(getattr(art, f), torch.Tensor)]
        dtypes = [t.dtype for t in tensors]
        module.to(torch.float16)  # a dtype change leaves the artifact exact
        art2 = module.artifact(name)
        assert [getattr(art2, f).dtype for f in art.__dataclass_fields__
                if isinstance(getattr(art2, f), torch.Tensor)] == dtypes
        module.to("meta")
        moved = module.artifact(name)
        for f in moved.__dataclass_fields__:
            t = getattr(moved, f)
            if isinstance(t, torch.Tensor):
                assert t.device.type == "meta", (type(module).__name__, f)
        assert {b.device.type for b in module.buffers()} == {"meta"}


def test_pkl_module_projection_follows_to():
    from xtoken_loss import PKLLoss

    proj, _ = _problem_modules()
    m = PKLLoss(proj)
    assert m.projection.indices.device.type == "cpu"
    m = m.to("meta")
    assert m.projection.indices.device.type == "meta" and m.projection.weights.device.type == "meta"
    assert m.projection.teacher_width == proj.teacher_width  # the non-tensor fields survive


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_module_forward_equals_function(kind):
    batch, zs, zt, idx, w = _problem(4)
    spec = REGISTRY[kind]
    proj = Projection.from_tensors(idx, w)
    args, extra = (), {}
    if kind == "pkl":
        args, extra = (proj,), {"projection": proj}
    elif kind == "hkl":
        args, extra = (proj,), {"projection": proj}
    elif kind == "gold":
        ex = torch.arange(VS) % 45
        args, extra = (ex,), {"common": ex}
    teacher = zs.flip(0) if kind == "kl" else zt
    got, gm = spec.module(*args, temperature=1.5)(zs, teacher, batch) if "temperature" in _options(spec.function) \
        else spec.module(*args)(zs, teacher, batch)
    opts = {"temperature": 1.5} if "temperature" in _options(spec.function) else {}
    want, wm = spec.function(zs, teacher, batch, **extra, **opts)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert gm.keys() == wm.keys()


def test_option_errors_come_from_the_configs():
    from xtoken_loss import ALMLoss, GOLDLoss, HKLLoss, KLLoss, PKLLoss, ULDLoss

    proj, _ = _problem_modules()
    with pytest.raises(LossOptionError, match="temperature"):
        PKLLoss(proj, temperature=0.0)
    with pytest.raises(LossOptionError, match="'forward', 'reverse'"):
        KLLoss(direction="sideways")
    with pytest.raises(LossOptionError, match="tail_cut"):
        ULDLoss(tail_cut=0)
    with pytest.raises(LossOptionError, match="tau"):
        ALMLoss(tau=float("inf"))
    PKLLoss(proj, public=True, direction="reverse")  # NeMo-RL's reverse P-KL
    with pytest.raises(LossOptionError, match="public form only"):
        HKLLoss(proj, direction="reverse")
    with pytest.raises(LossOptionError, match="mean_log"):
        GOLDLoss(torch.arange(VS) % VT, public=True, chunk_form="start")


def test_option_configs_round_trip():
    for spec in REGISTRY.values():
        cfg = spec.options()
        assert spec.options.from_dict(cfg.to_dict()) == cfg


# -------------------------------------------------------------------------------------------------
# the public surface

OLD_ALL = [
    "ALMLoss", "CELoss", "GOLDLoss", "HKLLoss", "LearnedPKLLoss", "LearnedProjection", "MultiTeacherConfig",
    "MultiTeacherLoss", "TeacherSpec", "ULDLoss", "alm_loss", "build_teachers", "gold_loss", "hkl_loss",
    "learned_pkl_loss", "multi_teacher_loss", "uld_loss", "KDCELoss", "KLLoss", "LOSSES", "LossInputError",
    "LossOptionError", "PKLLoss", "Projection", "ProjectionArtifactError", "XTokenLossError", "__version__",
    "ce_loss", "combine_losses", "count_units", "kd_ce_loss", "kl_loss", "load_projection", "pkl_loss",
]


def test_public_surface_is_derived_and_keeps_every_old_name():
    import xtoken_loss

    assert set(OLD_ALL) <= set(xtoken_loss.__all__)
    assert xtoken_loss.__all__ == sorted(xtoken_loss.__all__)
    for name in xtoken_loss.__all__:
        assert hasattr(xtoken_loss, name), name
    for spec in REGISTRY.values():
        for obj in (spec.function, spec.module, spec.options):
            assert obj.__name__ in xtoken_loss.__all__
            assert getattr(xtoken_loss, obj.__name__) is obj
    assert xtoken_loss.LOSSES == {k: s.function for k, s in REGISTRY.items()}


def test_registry_specs_are_consistent():
    for kind, spec in REGISTRY.items():
        assert spec.name == kind
        assert spec.module.function is spec.function
        assert spec.module.options_type is spec.options
        mod = inspect.getmodule(spec.function)
        assert spec.teacher_forms == tuple(mod.TEACHER_FORMS)
        assert spec.unit in ("position", "chunk")
        assert spec.projection in ("none", "required", "projection_or_common")
