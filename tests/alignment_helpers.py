"""Helpers shared by the alignment tests: tokenizers loaded once, the alignment invariants, text
strategies."""

from __future__ import annotations

import unicodedata

import numpy as np
from hypothesis import strategies as st

from tests.conftest import get_tokenizer as tok  # noqa: F401  (re-exported: the session's tokenizers, loaded once)
from xtoken_align.alignment.aligner import Alignment

# Fixture tokenizers whose canonical bytes always spell the text, and those exact on NFC text.
EXACT = ("llama3", "cl100k", "o200k", "gpt-oss", "deepseek-v4", "mistral-v1", "tekken")
EXACT_NFC = ("qwen3", "qwen3.5")


def spells_special(info, text: str) -> bool:
    """Whether `text` contains one of the tokenizer's special-token strings (it parses them)."""
    return any(content in text for content in info.special_tokens.values())


def exact_on(info, text: str) -> bool:
    """Whether the tokenizer's canonical bytes must spell `text`: no special-token strings in it,
    NFC text for `exact_nfc`, and no U+2581 for SentencePiece (Metaspace reads it as a space)."""
    if info.exactness == "lossy" or spells_special(info, text):
        return False
    if info.exactness == "exact_nfc" and unicodedata.normalize("NFC", text) != text:
        return False
    return not (info.kind.startswith("sentencepiece") and "\u2581" in text)


def token_bytes_of(info, ids) -> bytes:
    return b"".join(info.token_bytes[i] or b"" for i in ids)


def check_invariants(al: Alignment, a, b, *, exact: bool = False) -> None:
    """Chunks tile the bytes and both token sequences exactly once, in order; every correct chunk's
    sides spell its bytes. With `exact`, every chunk with bytes is correct and the boundaries are
    exactly the shared token boundaries (the finest partition)."""
    text = al.text_bytes
    ch = al.chunks
    assert al.a_token_bytes.sum() == len(text) or len(al.a_ids) == 0
    assert al.b_token_bytes.sum() == len(text) or len(al.b_ids) == 0
    if len(text) == 0:
        assert len(ch) == 0
        return
    assert ch[0, 0] == 0 and ch[-1, 1] == len(text)
    assert ch[0, 2] == 0 and ch[-1, 3] == len(al.a_ids)
    assert ch[0, 4] == 0 and ch[-1, 5] == len(al.b_ids)
    assert np.all(ch[1:, 0] == ch[:-1, 1])
    assert np.all(ch[1:, 2] == ch[:-1, 3]) and np.all(ch[1:, 4] == ch[:-1, 5])
    assert np.all(ch[:, 1] >= ch[:, 0])
    assert np.all((ch[:, 3] > ch[:, 2]) | (ch[:, 5] > ch[:, 4])), "a chunk without tokens"
    for row in ch[ch[:, 6] == 1]:
        span = text[row[0]:row[1]]
        assert row[1] > row[0]
        for info, ids in ((a, al.a_ids[row[2]:row[3]]), (b, al.b_ids[row[4]:row[5]])):
            got = token_bytes_of(info, ids)
            if got != span:  # only a phantom prefix space may differ, at the text start
                assert info.prefix_space and row[0] == 0 and got == b" " + span, (got, span)
    if exact:
        assert np.all(ch[:, 6][ch[:, 1] > ch[:, 0]] == 1), "an exact pair left a non-correct chunk"
        ends_a = set(np.cumsum(al.a_token_bytes).tolist())
        ends_b = set(np.cumsum(al.b_token_bytes).tolist())
        assert set(ch[:, 1].tolist()) | {0} == (ends_a & ends_b) | {0}


def mirrored(ch: np.ndarray) -> np.ndarray:
    return ch[:, [0, 1, 4, 5, 2, 3, 6]]


_FRAGMENTS = ["\r\n", "\n\n\n", "   ", "\t \t", " ", "0", "1234567", "9" * 25, "3.14159",
              "e\u0301", "n\u0303\u0323", "\U0001F468\u200D\U0001F469\u200D\U0001F467",
              "\U0001F1EB\U0001F1F7", "\U0001F44D\U0001F3FD", "\u200b", "\x00", "\x07", "\x1b[0m",
              "\ufeff", "中文字符", "日本語のテキスト", "한국어", "Ελληνικά", "русский", "עברית",
              "\U00020000\U0002A6D6", "\U0010FFFD", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "'s", "'LL", "  def f(x):\n    return x",
              "<s>", "[INST]", "▁", "Ġ", "<0x41>", "ﬁ", "Å", "½"]

any_char = st.characters(blacklist_categories=("Cs",))
random_text = st.lists(
    st.one_of(st.text(any_char, max_size=12), st.sampled_from(_FRAGMENTS),
              st.from_regex(r"[0-9]{4,30}", fullmatch=True), st.from_regex(r"[ \t\n\r]{2,12}", fullmatch=True)),
    max_size=12).map("".join)
nfc_text = random_text.map(lambda s: unicodedata.normalize("NFC", s))
