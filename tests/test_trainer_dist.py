"""The trainer's model side on two gloo processes (CPU), started the way torchrun starts them
(RANK/WORLD_SIZE/MASTER_* in the environment, `env://`): FSDP2 with gradient division off sums the
ranks' local gradients; a checkpoint the two ranks write loads on one rank (DCP reshards) with the
same parameters and optimizer state.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from xtoken_loss.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from xtoken_loss.trainer.distributed import destroy_distributed, init_distributed
from xtoken_loss.trainer.models import build_causal_lm, shard_model

from .test_trainer_models import dist, ids, loss_and_grads, spec  # noqa: F401  (dist: the world-1 fixture)

WORLD = 2
V = 300


def full_state(model, opt):
    """(model, optimizer) full state dicts on the CPU (collective; complete on rank 0)."""
    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _worker(rank, tmpdir, port):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    d = init_distributed("cpu")
    try:
        assert (d.rank, d.world_size, d.backend) == (rank, WORLD, "gloo")
        reference = build_causal_lm(spec(), vocab_size=V, seed=0)  # unsharded: each rank's local gradient
        local = {}
        for r in range(WORLD):
            reference.zero_grad()
            _, local[r] = loss_and_grads(reference, ids(high=V, seed=10 + r))
        model = shard_model(build_causal_lm(spec(), vocab_size=V, seed=0), mixed_precision=False,
                            activation_checkpointing=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _, grads = loss_and_grads(model, ids(high=V, seed=10 + rank))
        opt.step()
        save_checkpoint(f"{tmpdir}/run", 1, model={"student": model}, optimizer=opt, extra={"step": 1}, keep=2,
                        dist=d)
        model_sd, optim_sd = full_state(torch.nn.ModuleDict({"student": model}), opt)
        if d.is_main:
            torch.save({"local": local, "grads": grads, "model": model_sd, "optim": optim_sd}, f"{tmpdir}/out.pt")
        d.barrier()
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_sum_gradients_and_their_checkpoint_loads_on_one(dist, tmp_path):  # noqa: F811
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True)
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, grad in out["grads"].items():
        want = out["local"][0][name] + out["local"][1][name]  # the SUM over ranks, not the mean
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.allclose(grad, want / WORLD), name

    path = latest_checkpoint(tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / "step-1"
    model = shard_model(build_causal_lm(spec(), vocab_size=V, seed=7), mixed_precision=False,
                        activation_checkpointing=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert load_checkpoint(path, model={"student": model}, optimizer=opt, dist=dist) == {"step": 1}
    # the mapping's name prefixes the keys: compare through the same wrapper
    model_sd, optim_sd = full_state(torch.nn.ModuleDict({"student": model}), opt)
    assert model_sd.keys() == out["model"].keys()
    for key, value in out["model"].items():
        assert torch.equal(model_sd[key], value), key
    assert optim_sd["state"].keys() == out["optim"]["state"].keys()
    for key, state in out["optim"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(optim_sd["state"][key][name]), torch.as_tensor(value)), (key, name)
