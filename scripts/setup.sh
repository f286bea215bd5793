#!/usr/bin/env bash
# Set up .venv (CPU torch 2.13.0 first, then xtoken with its test extra) and build the fixture
# tokenizers offline. Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# torch first, pinned: a looser requirement would pull a multi-GB CUDA build. GPU users install
# their CUDA build of torch (2.4 .. 2.14.1) before this script instead.
python -c "import torch" 2>/dev/null || pip install --quiet --disable-pip-version-check torch==2.13.0
pip install --quiet --disable-pip-version-check -e ".[test]"
python data/build_tokenizers.py
