"""Canonical token bytes and the CONTRACTS §1 description, on every real fixture tokenizer."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import corpus_records, get_tokenizer
from xtoken_align import TokenizerLoadError, load_tokenizer
from xtoken_align.tokenizer.fixtures import FIXTURE_NAMES

EXACT = [n for n in FIXTURE_NAMES if n != "bert-uncased"]

SENTENCES = [
    "Hello world",
    "Numbers 1234567890 and 3.14159, 2024-11-26, -42, 1e-9; 99999999999999999999.",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(12))\r\n",
    "日本語と中文，한국어 문장。",
    "Emoji 👍🏽👨‍👩‍👧‍👦🇫🇷 and ∑∫√∞",
    "Привет, мир! مرحبا Ünïcödé Tiếng Việt",
    "   spaces   runs\n\n\n",
    "e\u0301 cafe\u0301 A\u030a",  # combining marks (not NFC)
]


def expected_bytes(tok, text: str) -> bytes:
    """What the canonical bytes of `text`'s ids must concatenate to."""
    if tok.exactness == "exact_nfc":
        text = unicodedata.normalize("NFC", text)
    return text.encode("utf-8")


def concat_ids(tok, ids: list[int], text: str) -> bytes:
    out = b"".join(tok.token_bytes[i] for i in ids)
    if tok.adds_phantom_space(text):
        assert out.startswith(b" ")
        out = out[1:]
    return out


@pytest.mark.parametrize("name", EXACT)
def test_canonical_bytes_reproduce_text(name):
    tok = get_tokenizer(name)
    texts = SENTENCES + [r["text"] for r in corpus_records("heldout")[:40]]
    for text in texts:
        ids = tok.encode(text)
        assert all(tok.token_bytes[i] is not None for i in ids), (name, text)
        assert concat_ids(tok, ids, text) == expected_bytes(tok, text), (name, text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60),
       name=st.sampled_from(EXACT))
def test_canonical_bytes_random_unicode(text, name):
    """Random text from every plane, control characters and combining marks included."""
    tok = get_tokenizer(name)
    ids = tok.encode(text)
    assert concat_ids(tok, ids, text) == expected_bytes(tok, text)


def test_partial_utf8_tokens_are_bytes_not_replacement_chars():
    """A byte-level token can hold half a character: its canonical bytes are not valid UTF-8."""
    tok = get_tokenizer("llama3")
    ids = tok.encode("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦙")
    pieces = [tok.token_bytes[i] for i in ids]
    assert any(_invalid_utf8(p) for p in pieces)
    assert all(b"\xef\xbf\xbd" not in p for p in pieces)  # no U+FFFD
    assert b"".join(pieces) == "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦙".encode()


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_byte_level_bytes_match_the_package_encoder():
    """Canonical bytes of every llama3/qwen3 id equal quicktok's own `decode_single_token_bytes`."""
    import quicktok

    for name, encoding in (("llama3", "llama3"), ("qwen3", "qwen3")):
        tok = get_tokenizer(name)
        enc = quicktok.get_encoding(encoding)
        for i in range(0, tok.vocab_size):
            if tok.is_special[i]:
                assert enc.is_special_token(i), (name, i)
            else:
                assert tok.token_bytes[i] == enc.decode_single_token_bytes(i), (name, i)


def test_sentencepiece_byte_fallback_pieces():
    tok = get_tokenizer("mistral-v1")
    byte_id = tok.backend.token_to_id("<0x41>")
    assert tok.token_bytes[byte_id] == b"A"
    word_id = tok.backend.token_to_id("\u2581Hello")
    assert tok.token_bytes[word_id] == b" Hello"
    # The phantom space is added only where the text does not start with a space already.
    assert tok.encode("Hello") == tok.encode(" Hello") == [word_id]
    assert tok.adds_phantom_space("Hello") and not tok.adds_phantom_space(" Hello")
    # A character outside the vocabulary falls back to its UTF-8 bytes, one token each.
    ids = tok.encode("\U0001f999")
    assert [tok.token_bytes[i] for i in ids][-4:] == [bytes([b]) for b in "\U0001f999".encode()]


@pytest.mark.parametrize("name,kind,exactness,prefix", [
    ("llama3", "tiktoken", "exact", False),
    ("qwen3", "tiktoken", "exact_nfc", False),
    ("qwen3.5", "tiktoken", "exact_nfc", False),
    ("deepseek-v4", "byte_level", "exact", False),
    ("mistral-v1", "sentencepiece_byte_fallback", "exact", True),
    ("tekken", "tiktoken", "exact", False),
    ("bert-uncased", "wordpiece", "lossy", False),
])
def test_description(name, kind, exactness, prefix):
    tok = get_tokenizer(name)
    assert (tok.kind, tok.exactness, tok.prefix_space) == (kind, exactness, prefix)
    assert tok.fingerprint.startswith("sha256:") and len(tok.fingerprint) == 7 + 64


def test_vocab_sizes_and_special_ids():
    """Public facts about the real tokenizers."""
    llama, qwen, oss = get_tokenizer("llama3"), get_tokenizer("qwen3"), get_tokenizer("gpt-oss")
    assert llama.vocab_size == 128256 and int(llama.is_special.sum()) == 256
    assert qwen.vocab_size == 151669 and int(qwen.is_special.sum()) == 26
    assert oss.vocab_size == 201088
    assert llama.special_roles["bos"] == 128000
    assert llama.special_roles["role_header_start"] == 128006
    assert llama.special_roles["turn_end"] == 128009
    assert qwen.special_roles["turn_start"] == 151644 and qwen.special_roles["turn_end"] == 151645
    assert oss.special_roles["turn_start"] == 200006 and oss.special_roles["role_header_end"] == 200008
    assert get_tokenizer("mistral-v1").special_roles == {"bos": 1, "eos": 2, "unk": 0}


def test_known_ids():
    assert get_tokenizer("llama3").encode("Hello world") == [9906, 1917]
    assert get_tokenizer("qwen3").encode("Hello world") == [9707, 1879]
    assert get_tokenizer("llama3").encode("Hello world", add_special_tokens=True) == [128000, 9906, 1917]


def test_holes_in_id_space_are_unused():
    tok = get_tokenizer("cl100k")
    assert tok.vocab_size == 100277  # <|endofprompt|> is 100276
    assert tok.is_unused[100261:100276].all()
    assert not tok.is_unused[:100256].any()


def test_fingerprints_differ_between_tokenizers_and_are_stable(tmp_path):
    fps = {get_tokenizer(n).fingerprint for n in FIXTURE_NAMES}
    assert len(fps) == len(FIXTURE_NAMES)
    again = load_tokenizer(get_tokenizer("qwen3").source)
    assert again.fingerprint == get_tokenizer("qwen3").fingerprint
    # Changing what determines tokenization changes the fingerprint.
    import json
    import shutil
    src = get_tokenizer("mistral-v1").source
    shutil.copy(src, tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["prepend_scheme"] = "never"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    changed = load_tokenizer(str(tmp_path))
    assert changed.fingerprint != get_tokenizer("mistral-v1").fingerprint
    assert changed.prefix_space is False


def test_packed_layout_matches_token_bytes():
    tok = get_tokenizer("qwen3")
    data, offsets = tok.packed
    assert offsets.shape == (tok.vocab_size + 1,)
    rng = np.random.default_rng(0)
    for i in rng.integers(0, tok.vocab_size, 200):
        expected = tok.token_bytes[i] or b""
        assert bytes(data[offsets[i]:offsets[i + 1]]) == expected


@pytest.mark.parametrize("bad,message", [
    ("definitely-not-a-tokenizer-xyz", "unknown tokenizer"),
    ("/nonexistent/dir/", "cannot read tokenizer"),
])
def test_bad_names_raise_one_line_errors(bad, message):
    with pytest.raises(TokenizerLoadError, match=message) as info:
        load_tokenizer(bad)
    assert "\n" not in str(info.value)


def test_not_a_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"hello": 1}')
    with pytest.raises(TokenizerLoadError, match="no 'model' entry"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerLoadError, match="not valid JSON"):
        load_tokenizer(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerLoadError, match="has no tokenizer.json"):
        load_tokenizer(str(empty))


def test_bert_is_lossy_for_a_reason():
    """BERT lowercases and drops whitespace: canonical bytes cannot reproduce the text."""
    tok = get_tokenizer("bert-uncased")
    text = "Hello World"
    joined = b"".join(tok.token_bytes[i] for i in tok.encode(text))
    assert joined == b"helloworld" != text.encode()


@pytest.mark.parametrize("bad", ["/nonexistent/dir/", "./no/such/tokenizer"])
def test_missing_tokenizer_is_not_found(bad, tmp_path):
    from xtoken_core.errors import TokenizerNotFoundError

    for name in (bad, str(tmp_path)):  # no such path; a directory without tokenizer.json
        with pytest.raises(TokenizerNotFoundError) as info:
            load_tokenizer(name)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, TokenizerLoadError)
