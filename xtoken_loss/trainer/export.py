"""Export the (sharded) student as a Hugging Face directory: config.json, safetensors, tokenizer.

    export_hf(model, out_dir, tokenizer_source=info.source, used_ids=ids, full_vocab_size=V, dist=dist)

Collective (every rank calls it; rank 0 writes). The full state dict is gathered to rank 0's CPU;
with restricted rows (`used_ids`, [V_used] sorted real ids) the embedding and LM-head rows are
scattered back to the tokenizer's `full_vocab_size` ids, rows of unused ids zero. The tokenizer
files next to `tokenizer_source` (a `TokenizerInfo.source`: a tokenizer.json file or its directory)
are copied in. The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` and
`AutoTokenizer.from_pretrained(out_dir)`, and can be the `model:` of a new run.

Written to a temporary sibling `.NAME.tmp` and renamed last; an existing `out_dir` is replaced only
when it holds our marker file (`.xtoken-export`), i.e. an earlier export: never a folder we did not
create.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from xtoken_core.errors import ConfigError

from .distributed import Dist
from .models import check_used_ids, expanded_state_dict, vocab_row_keys

MARKER = ".xtoken-export"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def _tokenizer_files(tokenizer_source: str | Path) -> list[Path]:
    source = Path(tokenizer_source)
    folder = source if source.is_dir() else source.parent
    if not (folder / "tokenizer.json").is_file():
        raise ConfigError(
            f"export: no tokenizer.json at {str(tokenizer_source)!r}; the export needs a Hugging Face "
            "tokenizer.json (with its tokenizer_config.json) to be loadable with AutoTokenizer"
        )
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def _check_ours(path: Path) -> None:
    if path.exists() and not (path / MARKER).is_file():
        raise ConfigError(
            f"export: {path} exists and was not written by an xtoken export (no {MARKER} file); "
            "move it away or choose another output directory"
        )


def export_hf(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer_source: str | Path,
    used_ids: np.ndarray | torch.Tensor | None = None,
    full_vocab_size: int | None = None,
    dist: Dist,
) -> Path:
    """Write `model` (sharded or not) to `out_dir` as a Hugging Face model + tokenizer; returns
    `out_dir`. `used_ids` and `full_vocab_size` go together (a model trained with restricted rows)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    if (used_ids is None) != (full_vocab_size is None):
        raise ConfigError("export: give used_ids and full_vocab_size together (or neither)")
    if used_ids is not None:
        used_ids = check_used_ids(used_ids, full_vocab_size)
        if used_ids.numel() != model.config.vocab_size:
            raise ConfigError(
                f"export: used_ids has {used_ids.numel()} ids but the model has {model.config.vocab_size} output rows"
            )
    files = _tokenizer_files(tokenizer_source)
    tmp, old = out_dir.parent / f".{out_dir.name}.tmp", out_dir.parent / f".{out_dir.name}.old"
    for path in (out_dir, tmp, old):  # every rank checks before the collective gather: no rank waits alone
        _check_ours(path)
    row_keys = vocab_row_keys(model)
    # Collective: every rank takes part in the all-gathers; with cpu_offload only rank 0 keeps the result.
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        if used_ids is not None:
            state = expanded_state_dict(state, used_ids, full_vocab_size, row_keys)
        config = copy.deepcopy(model.config)
        config.vocab_size = state[row_keys[0]].shape[0]
        dtype = next(t.dtype for t in state.values() if t.is_floating_point())
        full = AutoModelForCausalLM.from_config(config, dtype=dtype)
        full.load_state_dict(state, strict=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for leftover in (tmp, old):  # ours (checked above): a previous export that died
            if leftover.exists():
                shutil.rmtree(leftover)
        tmp.mkdir()
        (tmp / MARKER).write_text("written by xtoken-train's export; a later export may replace this folder\n")
        full.save_pretrained(tmp, safe_serialization=True)
        for path in files:
            shutil.copy2(path, tmp / path.name)
        if out_dir.exists():
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    dist.barrier()
    return out_dir
