"""Load any tokenizer into a `TokenizerInfo`: canonical bytes of every id plus the CONTRACTS §1 fields.

A tokenizer is named by a local path (a directory with `tokenizer.json`, or the file itself), by a
bundled fixture name (`llama3`, `qwen3`, ... under `data/tokenizers/`, see `fixtures.py`), or by a
Hugging Face Hub name (needs the network or a populated HF cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from xtoken_align.tokenizer import canonical_bytes as cb
from xtoken_align.tokenizer.fixtures import resolve_fixture
from xtoken_align.tokenizer.special_roles import special_roles
from xtoken_core.config import MAX_VOCAB_SIZE
from xtoken_core.errors import TokenizerLoadError, TokenizerNotFoundError
from xtoken_core.fingerprints import register_name

KINDS = ("byte_level", "tiktoken", "sentencepiece", "sentencepiece_byte_fallback", "wordpiece")
EXACTNESS = ("exact", "exact_nfc", "lossy")

# Normalizers that leave the text's bytes as they are (or only prepend/replace the Metaspace
# marker, which canonical bytes undo).
_TRANSPARENT_NORMALIZERS = {"Prepend", "Replace"}


@dataclass(frozen=True)
class TokenizerInfo:
    """Everything xtoken needs to know about one tokenizer.

    Ids index every array: `token_bytes[i]` is id i's canonical bytes, or None where i is special
    (`is_special[i]`) or unused (a hole in the id space, `is_unused[i]`).
    """

    name: str
    source: str  # the path the tokenizer was read from
    kind: str  # one of KINDS
    vocab_size: int  # size of the id space: largest tokenizer id + 1 (holes counted as unused)
    fingerprint: str  # "sha256:<hex>" over what determines tokenization
    exactness: str  # one of EXACTNESS
    prefix_space: bool  # adds a phantom leading space (SentencePiece dummy prefix)
    byte_fallback: bool
    special_roles: dict[str, int]
    token_bytes: list  # [vocab_size] bytes | None
    is_special: np.ndarray  # [vocab_size] bool
    is_unused: np.ndarray  # [vocab_size] bool
    special_tokens: dict[int, str] = field(repr=False)  # id -> content, for special ids
    _prefix_always: bool = field(default=False, repr=False)  # Prepend normalizer (see adds_phantom_space)
    config: dict = field(repr=False, compare=False, default_factory=dict)

    @cached_property
    def backend(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` that encodes (loaded on first use: overlap statistics need
        only the vocabulary, and parsing 200k merges costs about a second)."""
        try:
            backend = Tokenizer.from_file(self.source)
        except Exception as exc:
            raise TokenizerLoadError(f"{self.source}: the tokenizers library cannot load it: {exc}") from None
        # Some tokenizer.json files ship with padding/truncation switched on (BERT's pads every
        # encoding to 128 ids); xtoken pads and truncates batches itself, at byte boundaries.
        backend.no_padding()
        backend.no_truncation()
        return backend

    @cached_property
    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """(`data [N] uint8`, `offsets [vocab_size + 1] int64`): all canonical bytes, flat."""
        return cb.pack(self.token_bytes)

    @cached_property
    def token_lengths(self) -> np.ndarray:
        """`[vocab_size] int64`: canonical byte length of each id (0 for special/unused)."""
        return np.diff(self.packed[1])

    @cached_property
    def bytes_to_id(self) -> dict[bytes, int]:
        """Canonical bytes -> the lowest text id with those bytes (specials excluded)."""
        out: dict[bytes, int] = {}
        for i, b in enumerate(self.token_bytes):
            if b is not None and b not in out:
                out[b] = i
        return out

    def adds_phantom_space(self, text: str) -> bool:
        """Whether encoding `text` yields a leading space that is not in the text.

        SentencePiece-style Metaspace ("first"/"always") prepends `▁` only when the text does not
        already start with one (tokenizers' Metaspace), so " Hello" gets no phantom space while
        "Hello" does; a legacy `Prepend` normalizer prepends to any non-empty text.
        """
        if not self.prefix_space or not text:
            return False
        return self._prefix_always or not text.startswith(" ")

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (no BOS/EOS unless asked)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def describe(self) -> dict:
        """The CONTRACTS §1 description, JSON-ready."""
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "kind": self.kind,
            "exactness": self.exactness,
            "prefix_space": self.prefix_space,
            "byte_fallback": self.byte_fallback,
            "special_roles": self.special_roles,
        }

    def token_repr(self, i: int) -> str:
        """A readable form of id i: its bytes as text where they decode, else escaped."""
        if self.is_special[i]:
            return self.special_tokens[i]
        b = self.token_bytes[i]
        if b is None:
            return f"<unused {i}>"
        try:
            return repr(b.decode("utf-8"))[1:-1]
        except UnicodeDecodeError:
            return repr(b)[2:-1]


# --- locating and reading ------------------------------------------------------------------------

def _read_json(path: Path, what: str, raw: bytes | None = None) -> dict:
    try:
        return json.loads(path.read_bytes() if raw is None else raw)
    except OSError as exc:
        raise TokenizerLoadError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TokenizerLoadError(f"cannot read {what} {path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        hint = "; is it a tokenizer.json?" if what == "tokenizer file" else ""
        raise TokenizerLoadError(f"{path} is not valid JSON ({exc}){hint}") from None


# --- checking what was read ----------------------------------------------------------------------
# The loader reads a handful of entries of tokenizer.json and tokenizer_config.json; each is checked
# here first, so a file that is valid JSON but not what a Hugging Face tokenizer writes is a
# one-line `TokenizerLoadError` naming the file and the entry, not an AttributeError/KeyError.

def _type_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _bad(path: Path, where: str, expected: str, value) -> TokenizerLoadError:
    shown = repr(value) if not isinstance(value, (dict, list)) else _type_name(value)
    return TokenizerLoadError(f"{path}: {where} must be {expected}, got {shown}")


def _is_id(value) -> bool:
    return type(value) is int and 0 <= value < MAX_VOCAB_SIZE


_ID_WORDS = f"a token id (an integer in [0, {MAX_VOCAB_SIZE}))"


def _check_components(path: Path, where: str, obj) -> None:
    """A normalizer / pre-tokenizer / decoder spec: null, or an object (nested lists of objects)."""
    if obj is None:
        return
    if not isinstance(obj, dict):
        raise _bad(path, where, "an object or null", obj)
    if "type" in obj and not isinstance(obj["type"], str):
        raise _bad(path, f"{where}.type", "a string", obj["type"])
    for key in ("normalizers", "pretokenizers", "decoders", "processors"):
        if key in obj:
            subs = obj[key]
            if not isinstance(subs, list):
                raise _bad(path, f"{where}.{key}", "a list", subs)
            for k, sub in enumerate(subs):
                if not isinstance(sub, dict):  # a null inside the list is not a component either
                    raise _bad(path, f"{where}.{key}[{k}]", "an object", sub)
                _check_components(path, f"{where}.{key}[{k}]", sub)
            return


def _check_spec(spec, path: Path) -> None:
    """Raise `TokenizerLoadError` unless `spec` has the shape the loader reads (module comment above)."""
    if not isinstance(spec, dict) or "model" not in spec:
        raise TokenizerLoadError(f"{path} is not a tokenizer.json (no 'model' entry)")
    model = spec["model"]
    if not isinstance(model, dict):
        raise _bad(path, "model", "an object", model)
    if "type" in model and not isinstance(model["type"], str):
        raise _bad(path, "model.type", "a string", model["type"])
    if "vocab" not in model:
        raise TokenizerLoadError(f"{path}: model has no 'vocab' (is it a tokenizer.json written by the "
                                 f"tokenizers library?)")
    vocab = model["vocab"]
    if isinstance(vocab, dict):
        bad = next((kv for kv in vocab.items() if not _is_id(kv[1])), None)
        if bad is not None:
            raise _bad(path, f"model.vocab[{bad[0]!r}]", _ID_WORDS, bad[1])
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for k, entry in enumerate(vocab):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise _bad(path, f"model.vocab[{k}]", "a [piece, score] pair", entry)
        if len(vocab) > MAX_VOCAB_SIZE:
            raise TokenizerLoadError(f"{path}: model.vocab has {len(vocab)} entries, more than the "
                                     f"{MAX_VOCAB_SIZE} xtoken reads")
    else:
        raise _bad(path, "model.vocab", "an object (piece -> id) or a list of [piece, score] pairs", vocab)
    for key in ("unk_token", "continuing_subword_prefix"):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise _bad(path, f"model.{key}", "a string or null", model[key])
    added = spec.get("added_tokens")
    if added is not None and not isinstance(added, list):
        raise _bad(path, "added_tokens", "a list", added)
    for k, tok in enumerate(added or []):
        if not isinstance(tok, dict):
            raise _bad(path, f"added_tokens[{k}]", "an object with 'id' and 'content'", tok)
        for key in ("id", "content"):
            if key not in tok:
                raise TokenizerLoadError(f"{path}: added_tokens[{k}] has no {key!r}; each added token needs "
                                         f"an 'id' and a 'content'")
        if not _is_id(tok["id"]):
            raise _bad(path, f"added_tokens[{k}].id", _ID_WORDS, tok["id"])
        if not isinstance(tok["content"], str):
            raise _bad(path, f"added_tokens[{k}].content", "a string", tok["content"])
        if "special" in tok and not isinstance(tok["special"], bool):
            raise _bad(path, f"added_tokens[{k}].special", "true or false", tok["special"])
    if not vocab and not added:
        raise TokenizerLoadError(f"{path}: the tokenizer has no tokens (model.vocab and added_tokens are empty)")
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        _check_components(path, key, spec.get(key))


def _check_config(config, path: Path) -> dict:
    """`tokenizer_config.json`: an object whose `chat_template`, if any, is a string or a list of
    `{name, template}` objects."""
    if not isinstance(config, dict):
        raise TokenizerLoadError(f"{path}: a tokenizer config must be a JSON object, got {_type_name(config)}")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str):
        ok = isinstance(template, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
            for t in template)
        if not ok:
            raise TokenizerLoadError(f"{path}: chat_template must be a string or a list of {{name, template}} "
                                     f"objects, got {_type_name(template)}")
    return config


def _locate(name_or_path: str) -> tuple[Path, Path | None]:
    """(tokenizer.json path, tokenizer_config.json path or None) for a path, fixture or hub name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise TokenizerNotFoundError(
                f"{path} has no tokenizer.json (only Hugging Face fast tokenizers are read; convert "
                f"a slow one with transformers' AutoTokenizer.from_pretrained(...).save_pretrained())")
        cfg = path / "tokenizer_config.json"
        return tj, cfg if cfg.exists() else None
    if path.is_file():
        cfg = path.parent / "tokenizer_config.json"
        return path, cfg if cfg.exists() else None
    if path.exists():
        raise TokenizerLoadError(f"cannot read tokenizer at {path}: not a file or directory")
    if name_or_path.startswith((".", "/", "~")):
        raise TokenizerNotFoundError(f"cannot read tokenizer at {path}: not a file or directory")
    fixture = resolve_fixture(name_or_path)
    if fixture is not None:
        return _locate(str(fixture))
    return _from_hub(name_or_path)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers at all (so an offline machine fails in milliseconds instead of
    after huggingface_hub's retries)."""
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub(name: str) -> tuple[Path, Path | None]:
    """Fetch (or find in the HF cache) a Hub tokenizer's files."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers brings huggingface_hub
        raise TokenizerLoadError(f"unknown tokenizer {name!r} and huggingface_hub is not installed") from None
    local_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not _hub_reachable()
    try:
        tj = Path(hf_hub_download(name, "tokenizer.json", local_files_only=local_only))
    except LocalEntryNotFoundError:
        raise TokenizerNotFoundError(
            f"unknown tokenizer {name!r}: not a local path, not a bundled fixture "
            f"(run `python data/build_tokenizers.py`), and not in the Hugging Face cache "
            f"(no network?)") from None
    except Exception as exc:
        missing = isinstance(exc, (RepositoryNotFoundError, EntryNotFoundError))
        raise (TokenizerNotFoundError if missing else TokenizerLoadError)(
            f"unknown tokenizer {name!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    try:
        cfg = Path(hf_hub_download(name, "tokenizer_config.json", local_files_only=local_only))
    except Exception:
        cfg = None
    return tj, cfg


# --- describing ----------------------------------------------------------------------------------

def _components(obj) -> list[dict]:
    """Flatten a normalizer / pre-tokenizer / decoder spec into its list of components."""
    if not obj:
        return []
    for key in ("normalizers", "pretokenizers", "decoders", "processors"):
        if key in obj:
            return [c for sub in obj[key] for c in _components(sub)]
    return [obj]


def _kind(spec: dict) -> str:
    model = spec["model"]
    mtype = model.get("type")
    pre = {c.get("type") for c in _components(spec.get("pre_tokenizer"))}
    dec = {c.get("type") for c in _components(spec.get("decoder"))}
    if mtype == "WordPiece":
        return "wordpiece"
    if "ByteLevel" in pre or "ByteLevel" in dec:
        return "tiktoken" if model.get("ignore_merges") else "byte_level"
    if mtype in ("BPE", "Unigram") and ("Metaspace" in pre or "Metaspace" in dec
                                         or _metaspace_by_replace(spec)):
        return "sentencepiece_byte_fallback" if model.get("byte_fallback") else "sentencepiece"
    raise TokenizerLoadError(f"unsupported tokenizer model {mtype!r} with pre-tokenizers {sorted(pre)}: "
                             f"xtoken reads ByteLevel, SentencePiece/Metaspace and WordPiece tokenizers")


def _metaspace_by_replace(spec: dict) -> bool:
    """Legacy SentencePiece conversions mark spaces with a Replace(' ', '▁') normalizer."""
    return any(c.get("type") == "Replace" and c.get("content") == cb.METASPACE
               for c in _components(spec.get("normalizer")))


def _exactness(spec: dict, kind: str) -> str:
    norm = [c.get("type") for c in _components(spec.get("normalizer"))]
    if kind == "wordpiece":
        return "lossy"  # its pre-tokenizer drops whitespace
    if kind == "sentencepiece":
        return "lossy"  # characters outside the vocabulary become <unk>
    rest = [t for t in norm if t not in _TRANSPARENT_NORMALIZERS]
    if not rest:
        return "exact"
    if rest == ["NFC"]:
        return "exact_nfc"
    return "lossy"


def _prefix_space(spec: dict) -> bool:
    for c in _components(spec.get("pre_tokenizer")):
        if c.get("type") == "Metaspace":
            scheme = c.get("prepend_scheme", "always" if c.get("add_prefix_space", True) else "never")
            return scheme in ("first", "always")
        if c.get("type") == "ByteLevel" and c.get("add_prefix_space"):
            return True
    return any(c.get("type") == "Prepend" for c in _components(spec.get("normalizer")))


def _fingerprint(raw_spec: bytes, config: dict) -> str:
    """sha256 over what determines tokenization: the tokenizer.json file as stored and the config
    entries that add tokens (BOS/EOS insertion).

    The file's bytes are hashed as they are (a canonical re-serialisation of a 200k-entry
    vocabulary costs most of a second); a re-saved but identical tokenizer therefore gets a new
    fingerprint, which errs on the safe side.
    """
    h = hashlib.sha256(raw_spec)
    relevant = {k: config.get(k) for k in ("add_bos_token", "add_eos_token", "bos_token", "eos_token")}
    h.update(json.dumps(relevant, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return "sha256:" + h.hexdigest()


def _vocab_items(model: dict) -> list[tuple[str, int]]:
    vocab = model["vocab"]
    if isinstance(vocab, dict):
        return list(vocab.items())
    return [(piece, i) for i, (piece, _score) in enumerate(vocab)]  # Unigram: [[piece, score], ...]


def _canonical_bytes(spec: dict, kind: str, vocab_size: int, added: list[dict]) -> tuple[list, np.ndarray]:
    """Per-id canonical bytes and the special mask."""
    model = spec["model"]
    token_bytes: list = [None] * vocab_size
    if kind in ("byte_level", "tiktoken"):
        convert = cb.byte_level_piece_to_bytes
    elif kind.startswith("sentencepiece"):
        fallback = bool(model.get("byte_fallback"))
        convert = lambda p: cb.metaspace_piece_to_bytes(p, byte_fallback=fallback)  # noqa: E731
    else:
        prefix = model.get("continuing_subword_prefix") or "##"
        convert = lambda p: cb.wordpiece_piece_to_bytes(p, prefix=prefix)  # noqa: E731
    for piece, i in _vocab_items(model):
        b = convert(piece)
        # A ByteLevel vocabulary entry outside the byte alphabet cannot come out of the byte
        # mapping: it is only reachable as an added token (handled below) or never; treat it as
        # text so it is at least comparable.
        token_bytes[i] = b if b is not None else piece.encode("utf-8")
    is_special = np.zeros(vocab_size, dtype=bool)
    for tok in added:
        i = tok["id"]
        if tok.get("special", True):
            token_bytes[i] = None
            is_special[i] = True
        else:
            token_bytes[i] = tok["content"].encode("utf-8")  # a non-special added token is literal text
    unk = model.get("unk_token")
    if unk is not None:  # <unk> stands for unknown text: it has no bytes of its own
        unk_id = dict(_vocab_items(model)).get(unk)
        if unk_id is not None:
            token_bytes[unk_id] = None
            is_special[unk_id] = True
    return token_bytes, is_special


def load_tokenizer(name_or_path: str, *, name: str | None = None) -> TokenizerInfo:
    """Read a tokenizer (path, bundled fixture name or Hub name) into a `TokenizerInfo`.

    Raises `TokenizerLoadError` with a one-line message for anything that is not a readable
    Hugging Face fast tokenizer (its subclass `TokenizerNotFoundError` when there is none to read: no
    such path, an unbuilt fixture, a Hub name neither cached nor reachable).
    """
    if not str(name_or_path).strip():
        raise TokenizerNotFoundError("empty tokenizer name: give a path, a bundled fixture name or a Hub name")
    tj_path, cfg_path = _locate(str(name_or_path))
    try:
        raw_spec = tj_path.read_bytes()
    except OSError as exc:
        raise TokenizerLoadError(f"cannot read tokenizer file {tj_path}: {exc.strerror}") from None
    spec = _read_json(tj_path, "tokenizer file", raw_spec)
    _check_spec(spec, tj_path)
    config = _check_config(_read_json(cfg_path, "tokenizer config"), cfg_path) if cfg_path is not None else {}
    kind = _kind(spec)
    added = spec.get("added_tokens") or []
    ids = [i for _, i in _vocab_items(spec["model"])] + [t["id"] for t in added]
    vocab_size = max(ids) + 1
    token_bytes, is_special = _canonical_bytes(spec, kind, vocab_size, added)
    is_unused = np.array([b is None for b in token_bytes], dtype=bool) & ~is_special
    all_added = {t["content"]: t["id"] for t in added}
    specials = {t["id"]: t["content"] for t in added if t.get("special", True)}
    unk = spec["model"].get("unk_token")
    unk_id = dict(_vocab_items(spec["model"])).get(unk) if unk is not None else None
    if unk_id is not None:
        specials.setdefault(unk_id, unk)
        all_added.setdefault(unk, unk_id)
    info = TokenizerInfo(
        name=name or str(name_or_path),
        source=str(tj_path),
        kind=kind,
        vocab_size=vocab_size,
        fingerprint=_fingerprint(raw_spec, config),
        exactness=_exactness(spec, kind),
        prefix_space=_prefix_space(spec),
        byte_fallback=bool(spec["model"].get("byte_fallback")),
        special_roles=special_roles(config, all_added),
        token_bytes=token_bytes,
        is_special=is_special,
        is_unused=is_unused,
        special_tokens=specials,
        _prefix_always=any(c.get("type") == "Prepend" for c in _components(spec.get("normalizer"))),
        config=config,
    )
    register_name(info.fingerprint, info.name)  # batches name their tokenizers by fingerprint
    return info
