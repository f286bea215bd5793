"""Render one conversation with every template in this folder (smoke check).

Uses a Jinja2 environment configured like Hugging Face transformers'
``apply_chat_template`` (sandboxed, ``trim_blocks``/``lstrip_blocks``,
``loopcontrols``, ``raise_exception`` and ``strftime_now`` globals).

    python data/chat_templates/render_check.py          # print every rendering
    python data/chat_templates/render_check.py --quiet  # only the summary

Exits non-zero if a template fails to render or misses an expected marker.
"""
import json
import sys
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = Path(__file__).resolve().parent

# family -> (bos_token, eos_token, markers that must appear in the rendering)
SPECIALS = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>",
               ["<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
                "<|start_header_id|>assistant<|end_header_id|>\n\n"]),
    "llama3.2": ("<|begin_of_text|>", "<|eot_id|>",
                 ["Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
                  "<|start_header_id|>user<|end_header_id|>\n\n"]),
    "qwen3": ("<|endoftext|>", "<|im_end|>",
              ["<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"]),
    "mistral": ("<s>", "</s>", ["<s>[INST] ", " [/INST]", "</s>"]),
    "mistral_common_v1": ("<s>", "</s>", ["<s> [INST] ", " [/INST]", "</s>"]),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>",
                 ["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"]),
    "gpt-oss": ("<|startoftext|>", "<|return|>",
                ["<|start|>system<|message|>", "<|start|>developer<|message|># Instructions\n\n",
                 "<|start|>user<|message|>", "<|start|>assistant<|channel|>final<|message|>",
                 "<|end|><|start|>assistant"]),
}

SYSTEM = "You are a concise assistant for Python questions."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What does `sorted()` return? 🙂"},
    {"role": "assistant", "content": "A new sorted list; the input is left unchanged."},
    {"role": "user", "content": "Et pour un dictionnaire ? Réponds en français."},
]
# Mistral v1 (HF Mistral-7B-Instruct-v0.1) has no system role.
NO_SYSTEM = {"mistral"}


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def strftime_now(fmt):
    # Fixed date so the check is deterministic (HF passes the real clock).
    import datetime
    return datetime.datetime(2024, 7, 26).strftime(fmt)


def make_env():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render(name, messages, add_generation_prompt=True, **kwargs):
    bos, eos, _ = SPECIALS[name]
    source = (HERE / f"{name}.jinja").read_text(encoding="utf-8")
    tmpl = make_env().from_string(source)
    return tmpl.render(messages=messages, bos_token=bos, eos_token=eos,
                       add_generation_prompt=add_generation_prompt, **kwargs)


def main(argv):
    quiet = "--quiet" in argv
    failures = 0
    for name in SPECIALS:
        msgs = [m for m in CONVERSATION if m["role"] != "system"] if name in NO_SYSTEM else CONVERSATION
        # the mistral v1 HF template ends on a user turn without a generation prompt
        try:
            out = render(name, msgs, add_generation_prompt=(name != "mistral"))
        except Exception as exc:  # noqa: BLE001
            print(f"[FAIL] {name}: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        missing = [m for m in SPECIALS[name][2] if m not in out]
        status = "ok" if not missing else f"MISSING {missing!r}"
        failures += bool(missing)
        print(f"[{'ok' if not missing else 'FAIL'}] {name}: {len(out)} chars; {status}")
        if not quiet:
            print(out)
            print("-" * 72)
    # Qwen3 thinking switch
    q = render("qwen3", CONVERSATION, enable_thinking=False)
    ok = q.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    print(f"[{'ok' if ok else 'FAIL'}] qwen3 enable_thinking=False adds empty think block")
    failures += not ok
    # Qwen3 on a finished conversation: last assistant turn gets an (empty) think block
    done = CONVERSATION[:3]
    q2 = render("qwen3", done, add_generation_prompt=False)
    ok = "<|im_start|>assistant\n<think>\n\n</think>\n\nA new sorted list" in q2
    print(f"[{'ok' if ok else 'FAIL'}] qwen3 final assistant turn rendered with think block")
    failures += not ok
    # Mistral alternation check raises on a system message
    try:
        render("mistral", CONVERSATION)
        print("[FAIL] mistral accepted a system message")
        failures += 1
    except jinja2.exceptions.TemplateError:
        print("[ok] mistral rejects a system message (as the original does)")
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
