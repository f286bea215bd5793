"""Training checkpoints with `torch.distributed.checkpoint` (DCP): `run_dir/checkpoints/step-N/`.

    save_checkpoint(run_dir, step, model=modules, optimizer=opt, extra=state, keep=3, dist=dist)
    path = latest_checkpoint(run_dir)           # newest complete step-N folder, or None
    extra = load_checkpoint(path, model=modules, optimizer=opt, dist=dist)

`model` is one module or a mapping of named modules, e.g. `{"student": fsdp_student,
"projection": learned_projection}` (the names prefix the keys, so keep them stable across runs); the
optimizer (one, or a list) holds parameters of those modules only. Model and optimizer state are
saved sharded by every rank (DCP), so a checkpoint written by N ranks loads on M ranks.

`extra` is the trainer's own state (step counters, sampler position, scheduler, RNG states,
dynamic-weight state): a dict of str/int/float/bool/None, lists, tuples, dicts and tensors (numpy
arrays: convert them to tensors or lists). Rank 0 writes it as `trainer_state.pt` (torch.save, read
back with `weights_only=True`) plus `trainer_state.json` with its JSON-able entries, for humans.

A folder counts only once complete: everything is written to `checkpoints/.step-N.tmp/` and renamed
to `step-N/` last, by rank 0 after a barrier. Then older `step-*` folders beyond the newest `keep`
are deleted; only folders named `step-<int>` that hold DCP's `.metadata` and our
`trainer_state.pt` are ever deleted, nothing else in `checkpoints/`.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from xtoken_core.errors import ConfigError, XTokenError

from .distributed import Dist

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
TRAINER_STATE_JSON = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(XTokenError, ValueError):
    """A checkpoint folder is missing, incomplete, or does not fit the model/optimizer."""


def _as_module(model: nn.Module | Mapping[str, nn.Module]) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, Mapping) and model and all(isinstance(m, nn.Module) for m in model.values()):
        return nn.ModuleDict(dict(model))  # only groups them: the FQNs become "<name>.<param>"
    raise ConfigError("checkpoint: model must be a module or a non-empty mapping of names to modules")


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file()


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and _is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete `run_dir/checkpoints/step-N/` folder, or None (temporary `.step-N.tmp`
    folders and incomplete ones are ignored)."""
    found = _step_dirs(Path(run_dir))
    return found[-1][1] if found else None


_SKIP = object()


def _json_part(value: Any) -> Any:
    """The JSON-able part of `value` (tensors and other objects left out), or `_SKIP`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        out = {str(k): _json_part(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if isinstance(value, (list, tuple)):
        out = [_json_part(v) for v in value]
        return _SKIP if any(v is _SKIP for v in out) else out
    return _SKIP



def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module | Mapping[str, nn.Module],
    optimizer,
    extra: Mapping[str, Any],
    keep: int,
    dist: Dist,
) -> Path:
    """Write `run_dir/checkpoints/step-{step}/` (collective: every rank calls it) and return its path.

    Re-saving an existing step replaces that folder (it is ours by name and content)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"checkpoint.keep: expected an integer >= 1, found {keep!r}")
    root = Path(run_dir) / CHECKPOINTS
    tmp, final = root / f".step-{step}.tmp", root / f"step-{step}"
    # Checked by every rank (a shared file system) before any writes, so that no rank waits alone.
    if final.exists() and not _is_complete(final):
        raise CheckpointError(f"checkpoint: {final} exists but is not a checkpoint written by us; move it away")
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a run that died while writing this step
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    module = _as_module(model)
    model_sd, optim_sd = get_state_dict(module, _optimizers(optimizer))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if dist.is_main:
        torch.save(dict(extra), tmp / TRAINER_STATE)
        (tmp / TRAINER_STATE_JSON).write_text(json.dumps(_json_part(dict(extra)), indent=2, sort_keys=True) + "\n")
    dist.barrier()
    if dist.is_main:
        if final.exists():
            old = root / f".step-{step}.old"
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        for _, path in _step_dirs(Path(run_dir))[:-keep]:
            shutil.rmtree(path)
    dist.barrier()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | Mapping[str, nn.Module],
    optimizer,
    dist: Dist,
) -> dict[str, Any]:
    """Load model and optimizer state from a `step-N/` folder in place (collective) and return the
    saved `extra` dict. The modules must be built (and sharded) as for the writing run; any world size."""
    path = Path(path)
    if not _is_complete(path):
        raise CheckpointError(
            f"checkpoint: {path} is not a complete checkpoint folder (needs .metadata and {TRAINER_STATE})"
        )
    module = _as_module(model)
    optimizers = _optimizers(optimizer)
    model_sd, optim_sd = get_state_dict(module, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises CheckpointException carrying each rank's failure
        raise CheckpointError(
            f"checkpoint: {path} does not fit this model/optimizer (was it written by another config?): {exc}"
        ) from exc
    set_state_dict(module, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    dist.barrier()
    return torch.load(path / TRAINER_STATE, weights_only=True)
