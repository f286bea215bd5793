"""The trainer's model side in one process (a world-1 gloo group): building, restricted output rows,
FSDP2 sharding, activation checkpointing, DCP checkpoints and the Hugging Face export.

Tiny models (hidden 32, 2 layers); the export test uses the real llama3 tokenizer's full id space.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
from torch.distributed.fsdp import FSDPModule

from xtoken_core.errors import ConfigError
from xtoken_loss.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from xtoken_loss.trainer.distributed import Dist, init_distributed
from xtoken_loss.trainer.export import MARKER, export_hf
from xtoken_loss.trainer.models import (
    build_causal_lm,
    expanded_state_dict,
    freeze,
    restrict_rows,
    shard_model,
    vocab_row_keys,
)

from .conftest import get_tokenizer

V = 300
USED = np.array([0, 3, 4, 17, 64, 100, 101, 250, 299])


def spec(arch="llama", **kw):
    return dict(architecture=arch, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                intermediate_size=64, max_position_embeddings=128, **kw)


@pytest.fixture(scope="module")
def dist() -> Dist:
    created = not torch_dist.is_initialized()
    d = init_distributed("cpu")
    yield d
    if created:
        torch_dist.destroy_process_group()


def full_params(model) -> dict[str, torch.Tensor]:
    """name -> full (unsharded) tensor copy."""
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out


def ids(batch=2, length=12, high=len(USED), seed=0):
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'hidden_sise'"):
        build_causal_lm({**spec(), "hidden_sise": 3}, vocab_size=V, seed=0)
    bad = spec()
    del bad["num_layers"]
    with pytest.raises(ConfigError, match="'num_layers'"):
        build_causal_lm(bad, vocab_size=V, seed=0)
    with pytest.raises(ConfigError, match="gpt2"):
        build_causal_lm(spec("gpt2"), vocab_size=V, seed=0)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="no-such-model"):
        build_causal_lm(str(missing), vocab_size=V, seed=0)


def test_build_is_seeded_and_qwen3_has_the_asked_shapes():
    a = build_causal_lm(spec("qwen3"), vocab_size=V, seed=3)
    b = build_causal_lm(spec("qwen3"), vocab_size=V, seed=3)
    c = build_causal_lm(spec("qwen3"), vocab_size=V, seed=4)
    assert type(a).__name__ == "Qwen3ForCausalLM"
    assert a.config.head_dim == 8 and a.lm_head.weight.shape == (V, 32) and len(a.model.layers) == 2
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("tied", [False, True])
def test_restrict_rows_then_expand(tied):
    full = build_causal_lm(spec(tie_word_embeddings=tied), vocab_size=V, seed=0)
    small = build_causal_lm(spec(tie_word_embeddings=tied), vocab_size=V, seed=0)
    keys = vocab_row_keys(small)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    restrict_rows(small, USED)
    assert small.config.vocab_size == len(USED)
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == tied
    compact = ids()
    with torch.no_grad():
        got = small(input_ids=compact).logits  # [B, T, V_used]
        want = full(input_ids=torch.as_tensor(USED)[compact]).logits[..., USED]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    expanded = expanded_state_dict(small.state_dict(), USED, V, keys)
    unused = np.setdiff1d(np.arange(V), USED)
    for key in keys:
        assert expanded[key].shape == before[key].shape
        assert torch.equal(expanded[key][USED], before[key][USED])
        assert not expanded[key][unused].any()
    with pytest.raises(ConfigError, match="increasing"):
        restrict_rows(build_causal_lm(spec(), vocab_size=V, seed=0), USED[::-1])


def test_freeze():
    m = freeze(build_causal_lm(spec(), vocab_size=V, seed=0))
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_every_decoder_block_is_an_fsdp_module(dist):
    m = shard_model(build_causal_lm(spec("qwen3"), vocab_size=V, seed=0), mixed_precision=False,
                    activation_checkpointing=False, cpu_offload=True)  # offload: a no-op on the CPU
    assert isinstance(m, FSDPModule)
    assert all(isinstance(layer, FSDPModule) for layer in m.model.layers)
    logits = m(input_ids=ids(), use_cache=False).logits
    assert logits.shape == (2, 12, V) and torch.isfinite(logits).all()

    teacher = freeze(build_causal_lm(spec(), vocab_size=V, seed=1))
    teacher = shard_model(teacher, mixed_precision=False, activation_checkpointing=False)
    assert all(isinstance(layer, FSDPModule) for layer in [teacher, *teacher.model.layers])
    with torch.no_grad():
        assert torch.isfinite(teacher(input_ids=ids()).logits).all()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def loss_and_grads(model, x):
    model.train()
    loss = torch.nn.functional.cross_entropy(model(input_ids=x, use_cache=False).logits[:, :-1].flatten(0, 1),
                                             x[:, 1:].flatten(), reduction="sum")
    loss.backward()
    return loss.detach(), {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                           for n, p in model.named_parameters()}


def test_activation_checkpointing_leaves_loss_and_grads_unchanged(dist):
    plain = shard_model(build_causal_lm(spec(), vocab_size=V, seed=1), mixed_precision=False,
                        activation_checkpointing=False)
    ac = shard_model(build_causal_lm(spec(), vocab_size=V, seed=1), mixed_precision=False,
                     activation_checkpointing=True)
    assert any(getattr(layer, "gradient_checkpointing", False) for layer in ac.model.layers)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in plain.model.layers)
    x = ids(high=V, seed=5)
    loss_p, grads_p = loss_and_grads(plain, x)
    loss_a, grads_a = loss_and_grads(ac, x)
    torch.testing.assert_close(loss_a, loss_p, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_a[name], grads_p[name], rtol=0, atol=1e-6, msg=name)


def trained_pair(dist, seed=0):
    """A sharded student and a (plain) projection module with one AdamW step taken."""
    student = shard_model(build_causal_lm(spec(), vocab_size=V, seed=seed), mixed_precision=False,
                          activation_checkpointing=False)
    torch.manual_seed(seed)
    projection = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW([*student.parameters(), *projection.parameters()], lr=1e-2)
    return student, projection, opt


def step(student, projection, opt, seed):
    loss, _ = loss_and_grads(student, ids(high=V, seed=seed))
    projection(torch.ones(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    return loss


def optim_state(opt) -> list[torch.Tensor]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key in sorted(opt.state[p]):
                t = opt.state[p][key]
                out.append((t.full_tensor() if hasattr(t, "full_tensor") else t).clone())
    return out


def test_checkpoint_round_trip_and_retention(dist, tmp_path):
    student, projection, opt = trained_pair(dist)
    step(student, projection, opt, seed=1)
    extra = {"step": 1, "sampler_position": 16, "rng": torch.get_rng_state(), "scheduler": {"last_epoch": 1}}
    path = save_checkpoint(tmp_path, 1, model={"student": student, "projection": projection}, optimizer=opt,
                           extra=extra, keep=2, dist=dist)
    assert path == tmp_path / "checkpoints" / "step-1" and latest_checkpoint(tmp_path) == path
    saved_params = {**full_params(student), **{f"p.{k}": v for k, v in full_params(projection).items()}}
    saved_opt = optim_state(opt)

    step(student, projection, opt, seed=2)  # move away from the saved state
    assert not torch.equal(full_params(student)["lm_head.weight"], saved_params["lm_head.weight"])
    got = load_checkpoint(path, model={"student": student, "projection": projection}, optimizer=opt, dist=dist)
    assert got["step"] == 1 and got["sampler_position"] == 16 and got["scheduler"] == {"last_epoch": 1}
    assert torch.equal(got["rng"], extra["rng"])
    now = {**full_params(student), **{f"p.{k}": v for k, v in full_params(projection).items()}}
    for name, value in saved_params.items():
        assert torch.equal(now[name], value), name
    now_opt = optim_state(opt)
    assert len(now_opt) == len(saved_opt) > 0
    assert all(torch.equal(a, b) for a, b in zip(now_opt, saved_opt))
    assert (path / "trainer_state.json").read_text().count('"sampler_position": 16') == 1

    # retention: the newest `keep` step folders stay; foreign and incomplete folders are never touched
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step-notes").mkdir()
    (ckpts / "step-0").mkdir()  # a step name without checkpoint content: not ours, not complete
    (ckpts / ".step-9.tmp").mkdir()  # a write that died: ignored
    for s in (2, 3, 4):
        save_checkpoint(tmp_path, s, model={"student": student, "projection": projection}, optimizer=opt,
                        extra={"step": s}, keep=2, dist=dist)
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == [".step-9.tmp", "step-0", "step-3", "step-4", "step-notes"]
    assert latest_checkpoint(tmp_path) == ckpts / "step-4"
    save_checkpoint(tmp_path, 4, model={"student": student, "projection": projection}, optimizer=opt,
                    extra={"step": 44}, keep=2, dist=dist)  # re-saving a step replaces it
    assert load_checkpoint(ckpts / "step-4", model={"student": student, "projection": projection},
                           optimizer=opt, dist=dist)["step"] == 44
    assert latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("tied", [False, True])
def test_export_reloads_with_transformers(dist, tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = get_tokenizer("llama3")
    full_v = info.vocab_size
    text_ids = np.unique(np.array(info.encode("The cat sat on the mat. Hello world!")))
    used = np.unique(np.concatenate([text_ids, [0, full_v - 1]]))
    student = build_causal_lm(spec("qwen3" if tied else "llama", tie_word_embeddings=tied), vocab_size=full_v, seed=0)
    restrict_rows(student, used)
    student = shard_model(student, mixed_precision=False, activation_checkpointing=False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    loss_and_grads(student, ids(high=len(used)))
    opt.step()
    student.eval()
    compact = ids(high=len(used), seed=3)
    with torch.no_grad():
        want = student(input_ids=compact).logits  # [B, T, V_used]

    out = tmp_path / "final"
    export_hf(student, out, tokenizer_source=info.source, used_ids=used, full_vocab_size=full_v, dist=dist)
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()
    real = torch.as_tensor(used)[compact]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.vocab_size == full_v
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    with torch.no_grad():
        logits = reloaded(input_ids=real).logits  # [B, T, V_full]
    torch.testing.assert_close(logits[..., used], want, rtol=0, atol=1e-5)
    unused = np.setdiff1d(np.arange(full_v), used)
    assert not logits[..., unused].any()  # rows of unused ids are zero
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("The cat sat", add_special_tokens=False)["input_ids"] == info.encode("The cat sat")

    # the export is the student of a new run (restricted again), and an export may replace an export
    again = restrict_rows(build_causal_lm(str(out), vocab_size=full_v, seed=9), used)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=compact).logits, want, rtol=0, atol=1e-5)
    export_hf(student, out, tokenizer_source=info.source, used_ids=used, full_vocab_size=full_v, dist=dist)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not written by an xtoken export"):
        export_hf(student, foreign, tokenizer_source=info.source, used_ids=used, full_vocab_size=full_v, dist=dist)
    assert (foreign / "keep.txt").read_text() == "x"
