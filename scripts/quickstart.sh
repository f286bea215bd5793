#!/usr/bin/env bash
# The main job on the embedded default: bundled real tokenizers and corpus, no network.
# Trains data/configs/demo.yaml (teachers pre-trained and the projection built on the first run,
# cached in data/cache/), prints the held-out bits per byte of student and teachers, writes the plot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== xtoken-train: the demo (student llama3 <- teachers qwen3 [P-KL] + llama3 [KL])"
# resume=true: a second quick start continues the finished run instead of refusing its directory
xtoken-train --config data/configs/demo.yaml resume=true
xtoken-train plot out/demo
echo "Outputs are in out/demo/ (metrics.jsonl, curves.png, final/ = the student as a Hugging Face model)."
