"""The on-disk form of a teacher cache (docs/teacher_cache.md): safetensors shards + `cache.json`.

    DIR/.xtoken-teacher-cache.json   the settings (written first: marks the folder as ours)
    DIR/train-00000.safetensors      shard 0 of split "train" (documents [0, shard_docs))
    DIR/eval-00000.safetensors       ...
    DIR/cache.json                   written last: the cache is complete when it exists

A shard holds, for its documents in order (n documents, N tokens, P positions):
`doc_sha256 [n, 32] uint8`, `doc_token_offsets [n + 1] int64`, `token_ids [N] int32` (the full
teacher tokenization, real ids), `doc_position_offsets [n + 1] int64`, `topk_logprobs [P, k] bf16|fp16`,
`topk_ids [P, 9 * ceil(k / 4)] uint8` (18 bits per id, `pack_ids`), `target_logprob [P] float32`,
`rest_logprob [P] float32`; its safetensors metadata records the settings digest.

API: `pack_ids` / `unpack_ids`, `check_vocab`, `document_sha256`, `shard_name`, `shard_ranges`,
`write_shard`, `read_json`, `open_cache(dir) -> TeacherCache` (random access per document).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xtoken_core.errors import DataFileError

FORMAT = "xtoken-teacher-cache"
SCHEMA_VERSION = 1
CACHE_JSON = "cache.json"
MARKER = ".xtoken-teacher-cache.json"
ID_BITS = 18
ID_LIMIT = 1 << ID_BITS  # 262,144: every bundled vocabulary is smaller
_MASK = np.uint64(ID_LIMIT - 1)
SHARD_TENSORS = ("doc_sha256", "doc_token_offsets", "token_ids", "doc_position_offsets", "topk_logprobs",
                 "topk_ids", "target_logprob", "rest_logprob")


# -------------------------------------------------------------------------------------------------
# 18-bit id packing: 4 ids -> 9 bytes


def check_vocab(vocab_size: int, what: str) -> None:
    """Refuse a vocabulary whose ids do not fit in 18 bits (one line)."""
    if int(vocab_size) > ID_LIMIT:
        raise DataFileError(f"{what}: vocabulary of {vocab_size} ids does not fit the cache's {ID_BITS}-bit ids "
                            f"(at most {ID_LIMIT})")


def packed_width(k: int) -> int:
    """Bytes per position of `k` packed ids: 9 per group of 4 (the last group padded)."""
    return 9 * -(-int(k) // 4)


def pack_ids(ids: np.ndarray) -> np.ndarray:
    """`[N, k]` ints in `[0, 2**18)` -> `[N, packed_width(k)]` uint8 (little-endian bit order:
    id 4g + m occupies bits 18m .. 18m + 17 of group g's 72 bits)."""
    ids = np.asarray(ids)
    n, k = ids.shape
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= ID_LIMIT):
        raise DataFileError(f"pack_ids: ids must lie in [0, {ID_LIMIT}), found {int(ids.min())}..{int(ids.max())}")
    groups = -(-k // 4)
    full = np.zeros((n, groups * 4), np.uint64)
    full[:, :k] = ids
    g = full.reshape(n, groups, 4)
    x = g[..., 0] | (g[..., 1] << np.uint64(18))  # 36 bits
    y = g[..., 2] | (g[..., 3] << np.uint64(18))
    lo = (x & np.uint64(0xFFFFFFFF)).astype("<u4").view(np.uint8).reshape(n, groups, 4)
    mid = (((x >> np.uint64(32)) & np.uint64(0xF)) | ((y & np.uint64(0xF)) << np.uint64(4))).astype(np.uint8)
    hi = (y >> np.uint64(4)).astype("<u4").view(np.uint8).reshape(n, groups, 4)
    return np.concatenate([lo, mid[..., None], hi], axis=2).reshape(n, groups * 9)


def unpack_ids(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of `pack_ids`: `[N, packed_width(k)]` uint8 -> `[N, k]` int64."""
    packed = np.ascontiguousarray(packed, np.uint8)
    n = packed.shape[0]
    groups = packed.shape[1] // 9
    b = packed.reshape(n, groups, 9)
    lo = np.ascontiguousarray(b[..., 0:4]).view("<u4")[..., 0].astype(np.uint64)
    mid = b[..., 4].astype(np.uint64)
    hi = np.ascontiguousarray(b[..., 5:9]).view("<u4")[..., 0].astype(np.uint64)
    x = lo | ((mid & np.uint64(0xF)) << np.uint64(32))
    y = (mid >> np.uint64(4)) | (hi << np.uint64(4))
    out = np.stack([x & _MASK, x >> np.uint64(18), y & _MASK, y >> np.uint64(18)], axis=2)
    return out.reshape(n, groups * 4)[:, :k].astype(np.int64)


# -------------------------------------------------------------------------------------------------
# documents, shards, files


def document_sha256(sample) -> str:
    """Hex sha256 of a sample as the trainer reads it (a text or a message list), over its canonical
    JSON (sorted keys, no spaces, UTF-8), so a text and a conversation never collide."""
    return hashlib.sha256(json.dumps(sample, ensure_ascii=False, sort_keys=True,
                                     separators=(",", ":")).encode("utf-8")).hexdigest()


def json_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:05d}.safetensors"


def shard_ranges(num_docs: int, shard_docs: int) -> list[tuple[int, int]]:
    """Shard s holds documents `[s * shard_docs, min((s + 1) * shard_docs, num_docs))`."""
    return [(a, min(a + shard_docs, num_docs)) for a in range(0, num_docs, shard_docs)]


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write one shard under a temporary name in the same folder, then rename it (a shard file that
    exists is complete). `metadata` is stored as one canonical JSON string under the key "xtoken"
    (safetensors writes several metadata keys in an arbitrary order: the bytes would vary)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"xtoken": json.dumps(metadata, sort_keys=True, separators=(",", ":"))})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shard_metadata(path: Path) -> dict:
    """The metadata `write_shard` stored (DataFileError naming the file if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})["xtoken"])
    except Exception as exc:  # safetensors raises its own error types
        raise DataFileError(f"{path}: not a teacher cache shard ({type(exc).__name__}: {exc})") from None


def read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except OSError as exc:
        raise DataFileError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}: the {what} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(obj, dict):
        raise DataFileError(f"{path}: the {what} must be a JSON object")
    return obj


def write_json(path: Path, obj: dict) -> None:
    """Atomically (temporary name in the same folder, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------
# the reader


@dataclass
class CachedDocument:
    """One document of a cache: `token_ids [L]` int64 (its full teacher tokenization, real ids) and,
    for its first `P = min(L, positions_budget)` positions, `topk_logprobs [P, k]` (storage dtype),
    `topk_ids [P, k]` int64 real ids, `target_logprob [P]` and `rest_logprob [P]` float32."""

    token_ids: np.ndarray
    topk_logprobs: torch.Tensor
    topk_ids: torch.Tensor
    target_logprob: torch.Tensor
    rest_logprob: torch.Tensor

    @property
    def positions(self) -> int:
        return int(self.target_logprob.shape[0])


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_REQUIRED = ("format", "schema_version", "teacher", "tokenizer", "top_k", "dtypes", "temperature",
             "positions_budget", "splits", "num_positions", "bytes_per_token", "settings_sha256")


class TeacherCache:
    """A complete cache, opened read-only (`open_cache`). Shards are opened on first use (memory
    mapped by safetensors; at most `MAX_OPEN` at a time); pickling drops the open handles, so it can
    travel to DataLoader workers. The hash lookup keeps 16 bytes per document (a sorted array of
    64-bit hash prefixes and their documents), confirmed against the full hash in the shard."""

    MAX_OPEN = 64

    def __init__(self, path: Path, info: dict):
        self.path = Path(path)
        self.info = info
        self._handles: dict = {}
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self):
        return {"path": self.path, "info": self.info, "_handles": {}, "_lookup": None}

    # ---- settings
    @property
    def k(self) -> int:
        """Slots per position (min(requested K, the model's width))."""
        return int(self.info["top_k"])

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.info["dtypes"]["topk_logprobs"]]

    @property
    def positions_budget(self) -> int:
        """Positions cached per document at most (the teacher budget of the build)."""
        return int(self.info["positions_budget"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.info["tokenizer"]["fingerprint"])

    @property
    def splits(self) -> list[str]:
        return list(self.info["splits"])

    def num_docs(self, split: str) -> int:
        return int(self._split(split)["num_docs"])

    def _split(self, split: str) -> dict:
        if split not in self.info["splits"]:
            raise DataFileError(f"{self.path / CACHE_JSON}: no split {split!r} (splits: {', '.join(self.splits)})")
        return self.info["splits"][split]

    # ---- shards
    def _shard(self, split: str, shard: int):
        """`(handle, (doc_token_offsets, doc_position_offsets))` of a shard, opened on first use (the
        least recently used one is closed beyond `MAX_OPEN`)."""
        key = (split, shard)
        if key in self._handles:
            self._handles[key] = self._handles.pop(key)  # most recently used last
            return self._handles[key]
        from safetensors import safe_open

        path = self.path / shard_name(split, shard)
        try:
            h = safe_open(str(path), framework="pt")
            entry = (h, (h.get_tensor("doc_token_offsets").numpy(), h.get_tensor("doc_position_offsets").numpy()))
        except Exception as exc:  # safetensors raises its own error types
            raise DataFileError(f"{path}: cannot read the cache shard ({type(exc).__name__}: {exc})") from None
        if len(self._handles) >= self.MAX_OPEN:
            self._handles.pop(next(iter(self._handles)))
        self._handles[key] = entry
        return entry

    def _locate(self, split: str, doc: int) -> tuple[int, int]:
        s = self._split(split)
        if not 0 <= doc < int(s["num_docs"]):
            raise DataFileError(f"{self.path / CACHE_JSON}: split {split!r} has {s['num_docs']} documents, "
                                f"no document {doc}")
        return divmod(int(doc), int(s["shard_docs"]))

    def _shard_hashes(self, split: str, shard: int) -> np.ndarray:
        """`[n, 32]` uint8: the hashes of a shard's documents (read without keeping the shard open)."""
        from safetensors import safe_open

        path = self.path / shard_name(split, shard)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("doc_sha256").numpy()
        except Exception as exc:
            raise DataFileError(f"{path}: cannot read the cache shard ({type(exc).__name__}: {exc})") from None

    def doc_hashes(self, split: str) -> list[str]:
        """Hex sha256 of every document of `split`, in order."""
        return [bytes(row).hex() for shard in range(len(self._split(split)["shards"]))
                for row in self._shard_hashes(split, shard)]

    def lookup(self, sha: str) -> tuple[str, int] | None:
        """`(split, document index)` of the document with this hex sha256 (the first one, in split
        order then file order: equal documents have equal outputs), or None."""
        if self._lookup is None:
            prefixes, refs = [], []
            for si, split in enumerate(self.splits):
                for shard in range(len(self._split(split)["shards"])):
                    h = self._shard_hashes(split, shard)
                    prefixes.append(np.ascontiguousarray(h[:, :8]).view(">u8").reshape(-1))
                    first = shard * int(self._split(split)["shard_docs"])
                    refs.append(np.stack([np.full(len(h), si), first + np.arange(len(h))], axis=1))
            keys = np.concatenate(prefixes) if prefixes else np.zeros(0, ">u8")
            refs_all = np.concatenate(refs) if refs else np.zeros((0, 2), np.int64)
            order = np.argsort(keys, kind="stable")
            self._lookup = (keys[order].astype(np.uint64), refs_all[order].astype(np.int64))
        keys, refs = self._lookup
        key = np.uint64(int(sha[:16], 16))
        for pos in range(int(np.searchsorted(keys, key)), len(keys)):
            if keys[pos] != key:
                break
            split, doc = self.splits[int(refs[pos, 0])], int(refs[pos, 1])
            shard, local = self._locate(split, doc)
            h, _ = self._shard(split, shard)
            if bytes(h.get_slice("doc_sha256")[local:local + 1].numpy()[0]).hex() == sha:
                return split, doc
        return None

    def document(self, split: str, doc: int) -> CachedDocument:
        """The cached tokens and outputs of document `doc` of `split` (random access)."""
        shard, local = self._locate(split, doc)
        h, (tok_off, pos_off) = self._shard(split, shard)
        t0, t1 = int(tok_off[local]), int(tok_off[local + 1])
        p0, p1 = int(pos_off[local]), int(pos_off[local + 1])
        ids = h.get_slice("token_ids")[t0:t1].numpy().astype(np.int64)
        packed = h.get_slice("topk_ids")[p0:p1].numpy()
        return CachedDocument(
            token_ids=ids,
            topk_logprobs=h.get_slice("topk_logprobs")[p0:p1],
            topk_ids=torch.from_numpy(unpack_ids(packed, self.k)),
            target_logprob=h.get_slice("target_logprob")[p0:p1],
            rest_logprob=h.get_slice("rest_logprob")[p0:p1],
        )

    def check_samples(self, samples: list, path, split: str, lines: list[int] | None = None) -> None:
        """Every sample equals the cache's document of the same index (the run reads the file the
        cache was built from); the first that differs raises one line naming `path` and its line."""
        hashes = self.doc_hashes(split)
        for d, sample in enumerate(samples):
            if d >= len(hashes) or document_sha256(sample) != hashes[d]:
                where = f"{path}: line {lines[d]}" if lines is not None else f"{path}: document {d}"
                what = (f"is not in the cache ({len(hashes)} documents)" if d >= len(hashes)
                        else "differs from the document the cache holds there")
                raise DataFileError(f"{where}: the sample {what}; the teacher cache {self.path} was built from "
                                    f"{self._split(split).get('file')}: rebuild it with xtoken-train cache-teacher")
        if len(samples) != len(hashes):
            raise DataFileError(f"{path}: {len(samples)} documents, but the teacher cache {self.path} holds "
                                f"{len(hashes)} for split {split!r}; rebuild it with xtoken-train cache-teacher")


def open_cache(path) -> TeacherCache:
    """Open a complete cache folder (DataFileError naming the file on anything missing or wrong)."""
    path = Path(path)
    cj = path / CACHE_JSON
    if not path.is_dir():
        raise DataFileError(f"teacher cache {path}: not a directory")
    if not cj.is_file():
        hint = ("its build did not finish: rerun xtoken-train cache-teacher" if (path / MARKER).exists()
                else "not a teacher cache (xtoken-train cache-teacher writes one)")
        raise DataFileError(f"{cj}: missing; {hint}")
    info = read_json(cj, "teacher cache description")
    if info.get("format") != FORMAT:
        raise DataFileError(f"{cj}: not a teacher cache description (format {info.get('format')!r}, expected "
                            f"{FORMAT!r})")
    if info.get("schema_version") != SCHEMA_VERSION:
        raise DataFileError(f"{cj}: schema version {info.get('schema_version')!r}, this xtoken reads "
                            f"{SCHEMA_VERSION}")
    missing = [k for k in _REQUIRED if k not in info]
    if missing:
        raise DataFileError(f"{cj}: missing key {missing[0]!r}")
    if info["dtypes"].get("topk_logprobs") not in _DTYPES:
        raise DataFileError(f"{cj}: dtypes.topk_logprobs {info['dtypes'].get('topk_logprobs')!r}, expected one of "
                            f"{', '.join(_DTYPES)}")
    for split, s in info["splits"].items():
        for name in s.get("shards", []):
            if not (path / name).is_file():
                raise DataFileError(f"{cj}: split {split!r} lists shard {name}, which is missing from {path}")
    return TeacherCache(path, info)
