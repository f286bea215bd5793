"""The build of a teacher cache: `xtoken-train cache-teacher` (docs/teacher_cache.md).

    info = write_cache(cfg, teacher=0, out="cache/qwen3", top_k=64)     # collective under torchrun

Teacher I is built exactly as the trainer builds it (`run.teacher_source`: its cached pre-training
first, if configured; `run.build_side` with the run's vocabulary remap and seed), but unsharded: every
rank holds a full replica (frozen, on its device, bf16 parameters where the trainer would use them)
and writes its own shards, `r, r + W, ...` of the job list, so ranks never wait for each other
until the end. Documents are the trainer's samples (`data.read_samples(path, max_chars=...)`) of
`data.train` (split "train") and `data.eval` (split "eval", when configured). Shard s of a split is
the fixed document range `[s * shard_docs, (s + 1) * shard_docs)`; inside it the documents are
ordered by length (stable) and cut into fixed batches of `batch_size`, so a shard's bytes do not
depend on the number of ranks or on a restart. A shard is written under a temporary name and
renamed last; a rerun keeps complete shards whose recorded settings match and redoes the rest;
`cache.json` is written last, by rank 0, once every shard exists.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from xtoken_core.errors import ConfigError, DataFileError
from xtoken_loss.trainer.config import TrainConfig, TrainConfigError
from xtoken_loss.trainer.teacher_cache import format as fmt
from xtoken_loss.trainer.teacher_cache.outputs import STORAGE_DTYPES, topk_outputs

DEFAULT_TOP_K = 64
DEFAULT_SHARD_DOCS = 256


def resolve_teacher(cfg: TrainConfig, spec) -> int:
    """`--teacher I`: a 0-based index or a teacher's name -> the index (ConfigError otherwise)."""
    names = [t.name for t in cfg.teachers]
    listing = ", ".join(f"{k}: {n}" for k, n in enumerate(names)) or "none configured"
    text = str(spec)
    if text.lstrip("-").isdigit():
        i = int(text)
        if not 0 <= i < len(names):
            raise ConfigError(f"--teacher {text}: out of range; the config has {len(names)} teacher(s) ({listing})")
        return i
    if text in names:
        return names.index(text)
    raise ConfigError(f"--teacher {text!r}: no teacher of that name or index ({listing})")


def teacher_identity(cfg: TrainConfig, i: int) -> dict:
    """What determines teacher i's weights, from the config alone (no model is built): its model
    source, tokenizer, the remap switch, and its pre-training's cache key (data, settings) or, for a
    randomly initialised mapping model, the run's seed. The trainer compares it with a cache's."""
    from xtoken_loss.trainer.run import pretrain_config

    t = cfg.teachers[i]
    ident = {"model": t.model, "tokenizer": t.tokenizer, "same_vocab": t.same_vocab,
             "restrict_vocab": cfg.student.restrict_vocab}
    if t.pretrain is not None:
        ident["pretrain"] = Path(pretrain_config(cfg, i).output_dir).name
    elif not isinstance(t.model, str):
        ident["seed"] = cfg.seed
    return ident


def teacher_budget(cfg: TrainConfig, i: int) -> int:
    """Positions cached per document: the student's budget for a same-vocab teacher (it reads the
    student's positions), else `data.teacher_max_length` (default `data.max_length`)."""
    t = cfg.teachers[i]
    if t.same_vocab:
        return cfg.data.max_length
    return cfg.data.teacher_max_length or cfg.data.max_length


def weights_sha256(model: torch.nn.Module) -> str:
    """Hex sha256 over the state dict: for each key in sorted order, the key, dtype, shape and the
    tensor's bytes (CPU, contiguous)."""
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_texts(tok, samples: list, add_special_tokens: bool = True) -> tuple[list[str], np.ndarray]:
    """The texts the collator tokenizes for `samples` on this tokenizer's side (a conversation
    rendered with its chat template, which brings its own special tokens) and the per-text
    add-special-tokens flags (as `AlignmentCollator` and `vocab_remap.collect_ids` do)."""
    from xtoken_align.alignment.chat import render_conversation

    texts, add = [], []
    for s in samples:
        if isinstance(s, list):
            texts.append(render_conversation(tok, s)[0])
            add.append(False)
        else:
            texts.append(s)
            add.append(bool(add_special_tokens))
    return texts, np.array(add, bool)


def teacher_token_ids(tok, samples: list, add_special_tokens: bool = True) -> list[np.ndarray]:
    """Each sample's full teacher tokenization (int64 real ids), as the online collator makes it."""
    from xtoken_align.alignment.aligner import encode_side

    texts, add = teacher_texts(tok, samples, add_special_tokens)
    side, _ = encode_side(tok, texts, add_special_tokens=add)
    return [side.ids[side.sample(b)].astype(np.int64) for b in range(len(samples))]


@torch.no_grad()
def shard_tensors(model, tok, remap, samples: list, *, budget: int, k: int, dtype: torch.dtype, batch_size: int,
                  device: torch.device, add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of one shard (format module doc) for `samples`, in their order."""
    ids = teacher_token_ids(tok, samples, add_special_tokens)
    n = len(samples)
    lengths = np.array([len(x) for x in ids], np.int64)
    positions = np.minimum(lengths, budget)
    per_doc: list = [None] * n
    order = [d for d in np.argsort(positions, kind="stable").tolist() if positions[d] > 0]
    used = None if remap is None else torch.from_numpy(np.array(remap.used_ids))
    for start in range(0, len(order), batch_size):
        docs = order[start:start + batch_size]
        width = int(positions[docs].max())
        inp = torch.zeros(len(docs), width, dtype=torch.int64)
        mask = torch.zeros(len(docs), width, dtype=torch.bool)
        for r, d in enumerate(docs):
            row = torch.from_numpy(ids[d][:positions[d]])
            inp[r, :positions[d]] = row if remap is None else remap.to_compact(row)
            mask[r, :positions[d]] = True
        inp, mask = inp.to(device), mask.to(device)
        logits = model(input_ids=inp, attention_mask=mask.long(), use_cache=False).logits
        out = topk_outputs(logits, inp, mask, k, dtype)
        for r, d in enumerate(docs):
            p = int(positions[d])
            idx = out.topk_indices[r, :p].cpu()
            per_doc[d] = (out.topk_logprobs[r, :p].cpu(), idx if used is None else used[idx],
                          out.target_logprob[r, :p].cpu(), out.rest_logprob[r, :p].cpu())
    kk = min(k, _width(model))
    empty = (torch.zeros(0, kk, dtype=dtype), torch.zeros(0, kk, dtype=torch.int64),
             torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.float32))
    parts = [per_doc[d] if per_doc[d] is not None else empty for d in range(n)]
    idx_all = torch.cat([p[1] for p in parts]).numpy()
    return {
        "doc_sha256": torch.from_numpy(np.frombuffer(b"".join(bytes.fromhex(fmt.document_sha256(s)) for s in samples),
                                                     np.uint8).reshape(n, 32).copy()),
        "doc_token_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
        "token_ids": torch.from_numpy(np.concatenate(ids + [np.zeros(0, np.int64)]).astype(np.int32)),
        "doc_position_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(positions)]).astype(np.int64)),
        "topk_logprobs": torch.cat([p[0] for p in parts]),
        "topk_ids": torch.from_numpy(fmt.pack_ids(idx_all)),
        "target_logprob": torch.cat([p[2] for p in parts]),
        "rest_logprob": torch.cat([p[3] for p in parts]),
    }


def _width(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _first_difference(old, new, prefix: str = "") -> str | None:
    """The dotted key of the first difference between two JSON-like values (None: equal)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            d = _first_difference(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
            if d is not None:
                return d
        return None
    return None if old == new else (prefix or "(value)")


def _lookup(obj: dict, dotted: str):
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def check_out(out: Path, settings: dict) -> bool:
    """`--out` is new or empty (False) or a (partial) cache of exactly these settings (True);
    anything else raises one line (nothing there is deleted or overwritten)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    marker = out / fmt.MARKER
    if not marker.is_file():
        raise ConfigError(f"--out {out}: exists and is not a teacher cache (no {fmt.MARKER}); nothing there is "
                          "overwritten: choose another --out")
    old = fmt.read_json(marker, "teacher cache settings")
    diff = _first_difference(old, settings)
    if diff is not None:
        short = lambda v: (str(v)[:60] + "...") if len(str(v)) > 60 else str(v)  # noqa: E731
        raise ConfigError(f"--out {out}: a teacher cache of other settings ({diff}: {short(_lookup(old, diff))} "
                          f"there, {short(_lookup(settings, diff))} now); choose another --out")
    return True


def _read_splits(cfg: TrainConfig, max_chars: int) -> dict[str, list]:
    from xtoken_loss.trainer.data import read_samples

    out = {"train": read_samples(cfg.data.train, max_chars=max_chars)}
    if cfg.data.eval:
        out["eval"] = read_samples(cfg.data.eval, max_chars=max_chars)
    return out


def write_cache(cfg: TrainConfig, teacher, out, *, top_k: int = DEFAULT_TOP_K, dtype: str = "bf16",
                shard_docs: int = DEFAULT_SHARD_DOCS, batch_size: int | None = None, dist=None,
                on_shard: Callable[[str, int], None] | None = None) -> dict:
    """Build (or finish) the cache of teacher `teacher` (index or name) of `cfg` in `out`; returns
    the `cache.json` content. Collective under torchrun (every rank calls it). `on_shard(split,
    shard)` is called after each shard this rank writes (tests inject a failure there)."""
    from xtoken_loss.trainer.distributed import init_distributed
    from xtoken_loss.trainer.metrics import Progress
    from xtoken_loss.trainer.prepare import Sides, _load_tok
    from xtoken_loss.trainer.run import (
        _build_remaps,
        _source_text,
        build_side,
        sample_max_chars,
        teacher_source,
        uses_bf16,
    )
    from xtoken_loss.trainer.vocab_remap import file_sha256

    i = resolve_teacher(cfg, teacher)
    t = cfg.teachers[i]
    for name, value in (("--top-k", top_k), ("--shard-docs", shard_docs), ("--batch-size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} {value!r}: expected a positive integer")
    store = STORAGE_DTYPES.get(dtype)
    if store is None:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
    for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if path is not None and not Path(path).is_file():
            raise TrainConfigError(f"{key}: file {path} does not exist")
    tok = _load_tok(t.tokenizer, f"teachers.{i}.tokenizer")
    fmt.check_vocab(tok.vocab_size, f"teachers.{i}.tokenizer {t.tokenizer!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / fmt.MARKER).is_file():
        check_out(out, {})  # refuse a foreign folder before any model is built
    batch_size = batch_size or cfg.data.batch_size
    if dist is None:
        dist = init_distributed(cfg.parallel.device)
    max_chars = sample_max_chars(cfg)
    budget = teacher_budget(cfg, i)
    splits = _read_splits(cfg, max_chars)
    files = {"train": cfg.data.train, "eval": cfg.data.eval}

    remap = _build_remaps(cfg, Sides(tok, []), dist, max_chars).get(tok.fingerprint)
    source = teacher_source(cfg, i, dist)
    model = build_side(source, tok, remap, seed=cfg.seed, dist=dist, cfg=cfg, trainable=False, shard=False)
    width = _width(model)
    fmt.check_vocab(width if remap is None else tok.vocab_size, f"teacher {t.name!r}'s model")
    digest = weights_sha256(model)
    model.to(dist.device)
    bf16 = uses_bf16(cfg, dist)
    if bf16:  # as FSDP's MixedPrecisionPolicy computes: bf16 parameters, buffers (rotary) as they are
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)

    split_info = {}
    for split, samples in splits.items():
        hashes = [fmt.document_sha256(s) for s in samples]
        split_info[split] = {
            "file": str(files[split]), "file_sha256": file_sha256(files[split]), "num_docs": len(samples),
            "documents_sha256": hashlib.sha256("".join(hashes).encode()).hexdigest(),
            "shard_docs": shard_docs,
            "shards": [fmt.shard_name(split, s) for s in range(len(fmt.shard_ranges(len(samples), shard_docs)))],
        }
    settings = {
        "format": fmt.FORMAT, "schema_version": fmt.SCHEMA_VERSION,
        "teacher": {"index": i, "name": t.name, "identity": teacher_identity(cfg, i), "source": _source_text(source),
                    "weights_sha256": digest, "model_vocab_size": width,
                    "remap": None if remap is None else remap.fingerprint},
        "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size},
        "requested_top_k": top_k, "top_k": min(top_k, width),
        "dtypes": {"topk_logprobs": dtype, "topk_ids": f"uint{fmt.ID_BITS} packed (4 ids in 9 bytes)",
                   "target_logprob": "float32", "rest_logprob": "float32", "token_ids": "int32"},
        "temperature": 1.0, "positions_budget": budget, "max_chars": max_chars, "add_special_tokens": True,
        "batch_size": batch_size, "shard_docs": shard_docs, "device": dist.device.type, "bf16_parameters": bf16,
        "splits": split_info,
    }
    settings_sha = fmt.json_sha256(settings)
    resuming = check_out(out, settings)  # every rank reads the same folder: the same verdict
    dist.barrier()
    if dist.is_main and not resuming:
        out.mkdir(parents=True, exist_ok=True)
        fmt.write_json(out / fmt.MARKER, settings)
    dist.barrier()

    jobs = [(split, s, a, b) for split, samples in splits.items()
            for s, (a, b) in enumerate(fmt.shard_ranges(len(samples), shard_docs))]
    mine = jobs[dist.rank::dist.world_size]
    progress = Progress(total=sum(b - a for _, _, a, b in mine), start=0, enabled=dist.is_main and cfg.log.progress,
                        label=f"cache {t.name}")
    done = 0
    kk = min(top_k, width)
    try:
        for split, s, a, b in mine:
            path = out / fmt.shard_name(split, s)
            if path.is_file():
                meta = fmt.shard_metadata(path)
                if meta.get("settings_sha256") != settings_sha:
                    raise DataFileError(f"{path}: written with other settings than {out / fmt.MARKER} records "
                                        "(not by this build); move it away and rerun")
            else:
                tensors = shard_tensors(model, tok, remap, splits[split][a:b], budget=budget, k=kk, dtype=store,
                                        batch_size=batch_size, device=dist.device)
                meta = {"settings_sha256": settings_sha, "split": split, "shard": s, "first_doc": a,
                        "num_docs": b - a, "num_tokens": int(tensors["token_ids"].numel()),
                        "num_positions": int(tensors["target_logprob"].numel())}
                fmt.write_shard(path, tensors, meta)
                if on_shard is not None:
                    on_shard(split, s)
            done += b - a
            progress.update(done, f"{split} shard {s}")
    finally:
        progress.close()
    dist.barrier()
    if dist.is_main:
        info = _finish(out, settings, settings_sha)
    dist.barrier()
    return fmt.read_json(out / fmt.CACHE_JSON, "teacher cache description") if not dist.is_main else info


def _finish(out: Path, settings: dict, settings_sha: str) -> dict:
    """`cache.json`: the settings plus what was measured on the written shards."""
    info = dict(settings, settings_sha256=settings_sha)
    splits = {}
    total_pos = total_tok = total_bytes = 0
    for split, s in settings["splits"].items():
        pos = tok = nbytes = 0
        for name in s["shards"]:
            path = out / name
            if not path.is_file():
                raise DataFileError(f"{path}: missing after every rank finished (internal error; rerun)")
            meta = fmt.shard_metadata(path)
            pos += int(meta["num_positions"])
            tok += int(meta["num_tokens"])
            nbytes += path.stat().st_size
        splits[split] = dict(s, num_positions=pos, num_tokens=tok, bytes=nbytes)
        total_pos, total_tok, total_bytes = total_pos + pos, total_tok + tok, total_bytes + nbytes
    info.update(splits=splits, num_positions=total_pos, num_tokens=total_tok, bytes=total_bytes,
                bytes_per_token=total_bytes / max(total_pos, 1))
    fmt.write_json(out / fmt.CACHE_JSON, info)
    return info
