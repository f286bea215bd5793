#!/usr/bin/env bash
# The main job on the embedded default: bundled real tokenizers and corpus, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
mkdir -p out
echo "== Overlap report and coverage audit of the bundled tokenizers"
xtoken-align overlap-report llama3 qwen3 qwen3.5 cl100k o200k gpt-oss deepseek-v4 mistral-v1 tekken bert-uncased \
    --json out/overlap.json --plot out/overlap.png
echo "== Sparse projection llama3 -> qwen3 (both directions; Qwen3's output layer is 151,936 wide)"
xtoken-align build-projection --student llama3 --teacher qwen3 --teacher-vocab-size 151936 \
    --both-directions --out out/projection-llama3-qwen3
xtoken-align inspect out/projection-llama3-qwen3
echo "== Chunk alignment llama3 vs qwen3 on the held-out corpus"
xtoken-align align --student llama3 --teacher qwen3 --jsonl data/corpus/heldout.jsonl \
    --json out/alignment.jsonl --html out/alignment.html
echo "Outputs are in out/."
