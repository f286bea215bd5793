"""Student and teacher models: build or load, restrict output rows, freeze, shard.

    model = build_causal_lm(spec, vocab_size=V, seed=0)        # spec: path/name or config mapping
    restrict_rows(model, used_ids)                             # [V_used] sorted real ids -> compact
    freeze(model)                                              # teachers only
    shard_model(model, mixed_precision=..., activation_checkpointing=..., cpu_offload=...)
    full = expanded_state_dict(state_dict, used_ids, V, vocab_row_keys(model))   # for export

`spec` is a Hugging Face name or local directory (`AutoModelForCausalLM.from_pretrained`, offline),
or a mapping for tiny runs: `{architecture: llama|qwen3, hidden_size, num_layers, num_heads,
num_kv_heads (default num_heads), intermediate_size, max_position_embeddings (default 2048),
tie_word_embeddings (default false)}`, initialised after `torch.manual_seed(seed)` so every rank
builds the same weights. Attention runs through SDPA (on the CPU ~50x faster than "eager" for tiny
models, and the fused kernels on GPU).

Restricted rows: compact id c stands for real id `used_ids[c]`; the input embedding and the LM head
keep those rows only, `model.config.vocab_size` becomes `len(used_ids)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from xtoken_core.errors import ConfigError

ARCHITECTURES = ("llama", "qwen3")
_REQUIRED = ("architecture", "hidden_size", "num_layers", "num_heads", "intermediate_size")
_OPTIONAL = {"num_kv_heads": None, "max_position_embeddings": 2048, "tie_word_embeddings": False}
_ATTN = "sdpa"


def _config_from_mapping(spec: Mapping[str, Any], vocab_size: int):
    from transformers import LlamaConfig, Qwen3Config

    unknown = sorted(set(spec) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        valid = ", ".join((*_REQUIRED, *_OPTIONAL))
        raise ConfigError(f"model: unknown key {unknown[0]!r} (valid keys: {valid})")
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ConfigError(f"model: missing key {missing[0]!r} (a config model needs {', '.join(_REQUIRED)})")
    arch = spec["architecture"]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"model.architecture: expected one of {', '.join(ARCHITECTURES)}, found {arch!r}")
    opts = {**_OPTIONAL, **{k: spec[k] for k in _OPTIONAL if k in spec}}
    for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
        value = spec.get(key, opts.get(key))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key}: expected a positive integer, found {value!r}")
    num_heads = spec["num_heads"]
    num_kv_heads = num_heads if opts["num_kv_heads"] is None else opts["num_kv_heads"]
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise ConfigError(f"model.num_kv_heads: expected a positive integer, found {num_kv_heads!r}")
    if spec["hidden_size"] % num_heads or num_heads % num_kv_heads:
        raise ConfigError(
            f"model: hidden_size ({spec['hidden_size']}) must divide by num_heads ({num_heads}) and num_heads "
            f"by num_kv_heads ({num_kv_heads})"
        )
    if not isinstance(opts["tie_word_embeddings"], bool):
        raise ConfigError(f"model.tie_word_embeddings: expected true or false, found {opts['tie_word_embeddings']!r}")
    cls = LlamaConfig if arch == "llama" else Qwen3Config
    return cls(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=spec["hidden_size"] // num_heads,  # Qwen3Config defaults to 128 whatever the width
        intermediate_size=spec["intermediate_size"],
        max_position_embeddings=opts["max_position_embeddings"],
        tie_word_embeddings=opts["tie_word_embeddings"],
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_causal_lm(
    spec: str | Path | Mapping[str, Any], *, vocab_size: int | None, seed: int, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Load (`spec` a name or path) or build (`spec` a mapping) a causal LM on the CPU, in `dtype`.

    `vocab_size` is the output width of a built model; for a loaded one it is the tokenizer's vocab
    size, checked to fit in the model's embedding rows (None skips the check).
    """
    from transformers import AutoModelForCausalLM

    if isinstance(spec, Mapping):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ConfigError(f"model: vocab_size must be a positive integer for a config model, found {vocab_size!r}")
        config = _config_from_mapping(spec, vocab_size)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=_ATTN)
    if not isinstance(spec, (str, Path)):
        raise ConfigError(f"model: expected a name, a path or a mapping, found {type(spec).__name__}")
    torch.manual_seed(seed)  # for any weights the checkpoint does not hold
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(spec), dtype=dtype, attn_implementation=_ATTN, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model: cannot load {str(spec)!r} as a causal LM (a local directory with config.json and weights, "
            f"or a name in the local Hugging Face cache; no downloads): {exc}"
        ) from None
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size is not None and rows < vocab_size:
        raise ConfigError(
            f"model: {str(spec)!r} has {rows} embedding rows but the tokenizer has {vocab_size} ids; "
            "use the tokenizer the model was trained with"
        )
    return model


def check_used_ids(used_ids: np.ndarray | torch.Tensor, rows: int) -> torch.Tensor:
    """`used_ids` as a CPU int64 tensor [V_used], checked: 1-D, non-empty, strictly increasing, in
    [0, rows)."""
    if torch.is_tensor(used_ids):
        ids = used_ids.detach().to("cpu", torch.long)
    else:
        ids = torch.from_numpy(np.array(used_ids, dtype=np.int64))  # a copy: the remap's array is read-only
    if ids.ndim != 1 or ids.numel() == 0:
        raise ConfigError(f"used_ids: expected a non-empty 1-D array of token ids, found shape {tuple(ids.shape)}")
    if bool((ids[1:] <= ids[:-1]).any()):
        raise ConfigError("used_ids: ids must be strictly increasing (sorted, no repeats)")
    if int(ids[0]) < 0 or int(ids[-1]) >= rows:
        raise ConfigError(f"used_ids: ids must lie in [0, {rows}), found [{int(ids[0])}, {int(ids[-1])}]")
    return ids


def vocab_row_keys(model: nn.Module) -> tuple[str, ...]:
    """State-dict keys of the tensors indexed by token id on dim 0: the input embedding's weight and
    the LM head's weight (and bias). A tied head's key is included too: state dicts hold both."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    keys: list[str] = []
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for module in (emb, head):
        if module is None:
            continue
        for p in (module.weight, getattr(module, "bias", None)):
            if p is not None:
                keys.extend(n for n in names[id(p)] if n not in keys)
    return tuple(keys)


@torch.no_grad()
def restrict_rows(model: nn.Module, used_ids: np.ndarray | torch.Tensor) -> nn.Module:
    """Keep only rows `used_ids` (sorted real ids, [V_used]) of the input embedding and the LM head,
    in place (before `shard_model`); a tied head stays tied. Sets `model.config.vocab_size`."""
    if isinstance(model, FSDPModule):
        raise ConfigError("restrict_rows: call it before shard_model")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    ids = check_used_ids(used_ids, emb.weight.shape[0])
    tied = head is not None and head.weight is emb.weight
    emb.weight = nn.Parameter(emb.weight[ids].clone(), requires_grad=emb.weight.requires_grad)  # [V_used, H]
    emb.num_embeddings = ids.numel()
    if emb.padding_idx is not None:
        hit = (ids == emb.padding_idx).nonzero()
        emb.padding_idx = int(hit[0, 0]) if hit.numel() else None
    if head is not None:
        if tied:
            head.weight = emb.weight
        else:
            check_used_ids(ids, head.weight.shape[0])
            head.weight = nn.Parameter(head.weight[ids].clone(), requires_grad=head.weight.requires_grad)
        if getattr(head, "bias", None) is not None:
            head.bias = nn.Parameter(head.bias[ids].clone(), requires_grad=head.bias.requires_grad)
        head.out_features = ids.numel()
    model.config.vocab_size = ids.numel()
    return model


def expanded_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    used_ids: np.ndarray | torch.Tensor,
    full_vocab_size: int,
    row_keys: tuple[str, ...],
) -> dict[str, torch.Tensor]:
    """A copy of a full (unsharded) `state_dict` of a restricted model whose `row_keys` tensors
    ([V_used, ...]) are scattered back to [full_vocab_size, ...] at rows `used_ids`; other rows 0."""
    ids = check_used_ids(used_ids, full_vocab_size)
    out = dict(state_dict)
    for key in row_keys:
        if key not in out:
            raise ConfigError(f"expanded_state_dict: key {key!r} is not in the state dict")
        small = out[key]
        if small.shape[0] != ids.numel():
            raise ConfigError(
                f"expanded_state_dict: {key!r} has {small.shape[0]} rows but used_ids has {ids.numel()} ids"
            )
        full = small.new_zeros((full_vocab_size, *small.shape[1:]))
        full[ids.to(small.device)] = small
        out[key] = full
    return out


def freeze(model: nn.Module) -> nn.Module:
    """Teacher mode: `eval()` (no dropout) and no parameter takes a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(
            f"model: {type(model).__name__} has no model.layers list of decoder blocks; "
            "only decoder-only Hugging Face causal LMs (Llama, Qwen, Mistral, ...) can be sharded"
        )
    return layers


def shard_model(
    model: nn.Module,
    *,
    mesh: DeviceMesh | None = None,
    mixed_precision: bool,
    activation_checkpointing: bool,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard `model` with FSDP2 in place and return it (the same object, now also an `FSDPModule`).

    `fully_shard` moves the parameters to the mesh's device (default: a 1-D mesh over every rank on the current
    device: `cuda:{local_rank}` when the group is NCCL, else the CPU). `fully_shard` wraps each decoder
    block, then the root. `mixed_precision`: bf16 parameters in forward/backward, fp32 gradient
    reduction. `activation_checkpointing`: each block's activations are recomputed in backward
    (transformers' non-reentrant gradient checkpointing; active in `train()` mode only, and the
    forward must pass `use_cache=False`). `cpu_offload`: FSDP2's `CPUOffloadPolicy` (parameters and
    gradients live on the CPU, copied to the GPU per block); with a CPU mesh it is a no-op.

    FSDP's own gradient division is turned off on every FSDP module (the loop normalises by the
    global unit count): divide factor 1 plus sum-only reductions, which works on NCCL and on gloo
    (gloo has no PREMUL_SUM, so the divide factor alone fails there).
    """
    import torch.distributed as torch_dist

    if mesh is None:
        backend = str(torch_dist.get_backend())
        device_type = "cuda" if "nccl" in backend else "cpu"
        mesh = init_device_mesh(device_type, (torch_dist.get_world_size(),))
    device_type = mesh.device_type
    layers = decoder_layers(model)
    if activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload and device_type != "cpu":
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model
