"""Process-group set-up for the trainer: one process, torchrun, or a group someone else created.

    dist = init_distributed("auto")      # -> Dist(rank, world_size, local_rank, device, backend)
    ...
    destroy_distributed()

A single process still gets a (world-1) process group, so `fully_shard`, device meshes and
`torch.distributed.checkpoint` run the same code path as under torchrun. `device="auto"` picks
`cuda:{local_rank}` with NCCL when CUDA is available, else the CPU with gloo; `"cpu"` and `"cuda"`
force one. Launch modes:

- the default group is already initialised (a test harness, Accelerate): use it as it is;
- `RANK` and `WORLD_SIZE` are set (torchrun, SLURM wrappers that export them): `env://`
  (`MASTER_ADDR`/`MASTER_PORT` from the launcher);
- neither: a world-1 group over an in-memory `HashStore` (no port, no file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from xtoken_core.errors import ConfigError

_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the group: `rank` of `world_size`, `local_rank` on its node,
    the `device` its tensors live on and the process group's `backend` ("gloo" or "nccl")."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes files shared by all)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if torch_dist.is_initialized():
            torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place, and return it (on `self.device`; a tensor on
        another device is copied there and the sum copied back)."""
        if not torch_dist.is_initialized() or self.world_size == 1:
            return tensor
        work = tensor if tensor.device == self.device else tensor.to(self.device)
        torch_dist.all_reduce(work, op=torch_dist.ReduceOp.SUM)
        if work is not tensor:
            tensor.copy_(work)
        return tensor


def _pick_device(device: str, local_rank: int) -> tuple[torch.device, str]:
    if device not in _DEVICES:
        raise ConfigError(f"parallel.device: expected one of {', '.join(_DEVICES)}, found {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("parallel.device: 'cuda' was asked for but torch.cuda.is_available() is False")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"parallel.device: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer, found {value!r}") from None


def use_cpu_huge_pages() -> None:
    """Let PyTorch's CPU allocator back large tensors with transparent huge pages
    (`THP_MEM_ALLOC_ENABLE=1`) unless the environment already sets the variable.

    Why: a fresh logits-sized CPU tensor (2 x 512 x 128,256 float32, 525 MB) costs ~0.15 s of page
    faults when first written; with huge pages ~0.03 s. Measured with benchmarks/bench_trainer.py on
    2 cores: a CE-only step 6.9 s -> 5.4 s, a KD step 11.5 s -> 9.0 s. PyTorch reads the variable at
    the process's first large allocation, so this runs before any model is built (the CLI calls it
    first thing; `train` again, which helps where nothing large was allocated yet). No effect on
    GPU memory."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def init_distributed(device: str = "auto") -> Dist:
    """Join (or create) the default process group and return this process's `Dist`."""
    if torch_dist.is_initialized():
        rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        backend = str(torch_dist.get_backend())
        want_cuda = "nccl" in backend
        if device == "cpu" and want_cuda:
            raise ConfigError("parallel.device: 'cpu' was asked for but the existing process group uses nccl")
        dev, _ = _pick_device("cuda" if want_cuda else "cpu", local_rank)
        return Dist(rank, world_size, local_rank, dev, backend)

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        dev, backend = _pick_device(device, local_rank)
        torch_dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
        return Dist(rank, world_size, local_rank, dev, backend)

    dev, backend = _pick_device(device, 0)
    torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    return Dist(0, 1, 0, dev, backend)


def destroy_distributed() -> None:
    """Tear the default process group down (no-op when there is none)."""
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
