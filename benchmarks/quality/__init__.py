"""The distillation quality benchmark (issue 15): does cross-tokenizer KD work here, and which loss wins?

One command trains two tiny teachers (llama3 same-vocab, qwen3 cross-tokenizer; one architecture and
budget, CE only, cached), writes their top-k teacher caches once, then trains the student arms
(`protocol.ARMS`) for several seeds through the trainer's Python API and reports held-out bits per
byte, top-1 accuracy and the digit-heavy subset's BPB, ending with a `RESULT` line:

    python -m benchmarks.quality                       # the default configuration (2 CPU cores: ~75 min)
    python -m benchmarks.quality --config smoke        # minutes, for development
    python -m benchmarks.quality --config gpu          # one H200

Modules: `protocol` (configurations, arms, trainer configs), `teachers` (pre-training and caches),
`digits` (the digit-heavy held-out subset and the evaluation of a final student on a file),
`result` (the RESULT definitions), `report` (table, curves, REPORT.md), `cli` (the run).
"""
