"""The fixture tokenizers are the real ones: ids equal the source packages' own encoders."""

from __future__ import annotations

import importlib.util
import sys
import unicodedata

import pytest

from tests.conftest import REPO, corpus_records, get_tokenizer


def _load_build_script():
    """`data/build_tokenizers.py` as a module (data/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("build_tokenizers", REPO / "data" / "build_tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


build_tokenizers = _load_build_script()

CHECKED = [n for n, r in build_tokenizers.RECIPES.items() if r.reference_encoder is not None]


def _texts() -> list[str]:
    records = corpus_records("heldout")
    by_category: dict[str, list[str]] = {}
    for r in records:
        by_category.setdefault(r["category"], []).append(r["text"][:1500])
    texts = list(build_tokenizers.REFERENCE_TEXTS)
    for items in by_category.values():
        texts.extend(items[:6])
    return texts


@pytest.mark.parametrize("name", CHECKED)
def test_ids_equal_the_package_encoder(name):
    recipe = build_tokenizers.RECIPES[name]
    reference = recipe.reference_encoder()
    tok = get_tokenizer(name)
    compared = 0
    for text in _texts():
        if recipe.known_divergence is not None and recipe.known_divergence[1](text):
            continue
        ref_text = unicodedata.normalize("NFC", text) if recipe.nfc else text
        got = tok.backend.encode(text, add_special_tokens=(name == "mistral-v1")).ids
        assert got == reference(ref_text), (name, text[:80])
        compared += 1
    assert compared >= 10, f"{name}: only {compared} texts compared"


def test_long_digit_runs_split_like_the_original():
    """Oniguruma's reading of possessive `{1,3}+` would keep 12345 whole; the fixtures must not."""
    llama = get_tokenizer("llama3")
    pieces = [llama.token_bytes[i] for i in llama.encode("12345678")]
    assert pieces == [b"123", b"456", b"78"]
    qwen = get_tokenizer("qwen3")
    assert [qwen.token_bytes[i] for i in qwen.encode("2024")] == [b"2", b"0", b"2", b"4"]


def test_qwen_normalises_to_nfc():
    qwen = get_tokenizer("qwen3")
    assert qwen.encode("e\u0301") == qwen.encode("\u00e9")


def test_second_build_is_a_no_op(tmp_path):
    """Idempotent: an up-to-date fixture is not rebuilt."""
    root = REPO / "data" / "tokenizers"
    status = build_tokenizers.build_one("bert-uncased", root)
    assert status == "up to date"


def test_every_fixture_loads_with_transformers():
    from transformers import AutoTokenizer

    for name in ("llama3", "mistral-v1", "qwen3"):
        hf = AutoTokenizer.from_pretrained(str(REPO / "data" / "tokenizers" / name))
        assert hf("Hello world", add_special_tokens=False)["input_ids"] == get_tokenizer(name).encode("Hello world")


@pytest.mark.parametrize("name", ["llama3", "qwen3", "mistral-v1", "deepseek-v4", "gpt-oss"])
def test_chat_template_renders(name):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(REPO / "data" / "tokenizers" / name))
    messages = [{"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "12 + 30 = 42."}]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert "What is 12 + 30?" in text and "12 + 30 = 42." in text
