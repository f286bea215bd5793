#!/usr/bin/env bash
# Set up (as the quick start does) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== ruff (lint)"
ruff check .
echo "== pytest"
python -m pytest -q "$@"
