"""Shared test fixtures: real tokenizers, loaded once per session.

The fixture tokenizers are built by `python data/build_tokenizers.py` (the README's test command
runs it first); a missing fixture is an error, not a skip.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from xtoken_align import load_tokenizer
from xtoken_align.tokenizer.fixtures import FIXTURE_NAMES

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus"


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str):
    """A fixture tokenizer, loaded once per test session."""
    return load_tokenizer(name, name=name)


@functools.lru_cache(maxsize=None)
def corpus_records(split: str = "heldout") -> tuple[dict, ...]:
    with open(CORPUS / f"{split}.jsonl", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


@pytest.fixture(scope="session")
def tokenizers():
    """name -> TokenizerInfo for every fixture tokenizer."""
    return {name: get_tokenizer(name) for name in FIXTURE_NAMES}
