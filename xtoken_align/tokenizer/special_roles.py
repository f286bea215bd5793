"""Special-token roles: one map, role -> token id, shared by the aligner and the projection builder.

Roles come from the tokenizer's own configuration (`bos_token`, `eos_token`, `pad_token`,
`unk_token` in `tokenizer_config.json`) and, for chat-turn markers, from the public token strings of
each family below. A role the family does not have is simply absent.
"""

from __future__ import annotations

# Public special-token strings of the families we know, by role. Order matters only where one
# string could serve two roles (first listed wins).
KNOWN_MARKERS: dict[str, str] = {
    # Llama-3
    "<|begin_of_text|>": "bos",
    "<|end_of_text|>": "eos_text",
    "<|start_header_id|>": "role_header_start",
    "<|end_header_id|>": "role_header_end",
    "<|eot_id|>": "turn_end",
    # Qwen (ChatML)
    "<|im_start|>": "turn_start",
    "<|im_end|>": "turn_end",
    "<think>": "think_start",
    "</think>": "think_end",
    # gpt-oss (harmony)
    "<|startoftext|>": "bos",
    "<|start|>": "turn_start",
    "<|message|>": "role_header_end",
    "<|end|>": "turn_end",
    "<|return|>": "eos",
    "<|channel|>": "channel",
    # Mistral (Tekken / v3+)
    "[INST]": "turn_start",
    "[/INST]": "turn_end",
    # DeepSeek
    "<｜begin▁of▁sentence｜>": "bos",
    "<｜end▁of▁sentence｜>": "eos",
    "<｜User｜>": "user_start",
    "<｜Assistant｜>": "assistant_start",
    # SentencePiece / BERT conventions
    "<s>": "bos",
    "</s>": "eos",
    "<unk>": "unk",
    "[CLS]": "bos",
    "[SEP]": "eos",
    "[PAD]": "pad",
    "[UNK]": "unk",
    "[MASK]": "mask",
}

CONFIG_ROLES = ("bos", "eos", "pad", "unk")


def _token_content(value) -> str | None:
    """A `tokenizer_config.json` special-token entry is a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None  # anything else names no token


def special_roles(config: dict, special_ids: dict[str, int]) -> dict[str, int]:
    """Role -> id from a tokenizer config and the tokenizer's special tokens (content -> id).

    Roles named in the config win over the family table; the table fills in chat markers and the
    roles the config leaves out.
    """
    roles: dict[str, int] = {}
    for role in CONFIG_ROLES:
        content = _token_content(config.get(f"{role}_token"))
        if content is not None and content in special_ids:
            roles[role] = special_ids[content]
    for content, role in KNOWN_MARKERS.items():
        if content in special_ids and role not in roles:
            roles[role] = special_ids[content]
    return dict(sorted(roles.items()))
