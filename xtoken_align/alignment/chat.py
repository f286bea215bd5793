"""Conversations: render with each tokenizer's own chat template and find the message contents.

Each tokenizer renders the conversation with its template (`tokenizer_config.json`'s
`chat_template`), so the two byte streams differ in their scaffolding (role headers, turn markers,
BOS/EOS, default system prompts) but hold the same message contents. The aligner's common axis for
a conversation is the concatenation of the contents found verbatim, in order, in every side's
render; scaffolding collapses to zero width between them (see `alignment.to_axis`).
"""

from __future__ import annotations

import re

import numpy as np

from xtoken_align.tokenizer.loader import TokenizerInfo
from xtoken_core.errors import AlignmentError

_MARK = re.compile("\ue000(\\d+)\ue001")

# The roles chat templates know: the Hugging Face chat format's four, OpenAI's `developer` (gpt-oss),
# Llama-3.1's `ipython` (tool output) and the legacy `function`.
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")


_JSON_WORDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list",
               type(None): "null"}


def check_conversation(messages, where: str = "conversation") -> None:
    """Raise a one-line `AlignmentError` unless `messages` is a non-empty list of
    `{"role": <one of ROLES>, "content": <str>}` dicts; `where` names the sample in the message
    (`"sample 3"`, `"data.jsonl line 4"`).

    A content that is not a string (a number, None, a list of parts) would be rendered into the
    template but count 0 bytes on the common axis, so it is refused rather than silently dropped;
    an empty message is `""`.
    """
    if not isinstance(messages, list):
        raise AlignmentError(f"{where}: a conversation must be a list of {{'role': ..., 'content': ...}} "
                             f"messages, got {type(messages).__name__}")
    if not messages:
        raise AlignmentError(f"{where}: the conversation has no messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise AlignmentError(f"{where}: a conversation must be a list of {{'role': ..., 'content': ...}} "
                                 f"dicts; message {k} is {_JSON_WORDS.get(type(m), type(m).__name__)}")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            got = "no 'role'" if "role" not in m else f"unknown role {role!r}"
            raise AlignmentError(f"{where}, message {k}: {got}; a role is one of {', '.join(ROLES)}")
        if "content" not in m:
            raise AlignmentError(f"{where}, message {k} ({role}): no 'content'; give a string (\"\" for an "
                                 f"empty message)")
        content = m["content"]
        if not isinstance(content, str):
            shown = ("a list (structured contents are not aligned: give the text as a string)"
                     if isinstance(content, list) else repr(content) if content is None
                     or isinstance(content, (bool, int, float)) else type(content).__name__)
            raise AlignmentError(f"{where}, message {k} ({role}): 'content' must be a string, got {shown}")


def _template_kwargs(info: TokenizerInfo) -> dict[str, str]:
    out = {}
    for key, value in info.config.items():
        if key.endswith("_token"):
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[key] = value
    return out


def _render(info: TokenizerInfo, messages: list[dict]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    template = info.config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not template:
        raise AlignmentError(f"{info.name}: the tokenizer has no chat_template in its "
                             f"tokenizer_config.json; pass plain texts instead of conversations")
    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                            add_generation_prompt=False,
                                            **_template_kwargs(info))
    except Exception as exc:  # jinja errors, raise_exception() in the template
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AlignmentError(f"{info.name}: its chat template rejects the conversation: {msg}") from None
    return rendered[0]


def render_conversation(info: TokenizerInfo, messages: list[dict], *, where: str = "conversation"
                        ) -> tuple[str, list[tuple[int, int, int]]]:
    """The conversation rendered by `info`'s template, and where each message's content lies in it:
    `(message index, byte start, byte end)` in render order (first occurrence of each message).

    Contents are located by rendering once with placeholder contents; if the template transforms
    contents (strips, splits), messages it changed are searched verbatim in the real render, and a
    content not found there is left to the scaffolding. `messages` must pass `check_conversation`
    (`where` names the sample in its errors).
    """
    check_conversation(messages, where)
    text_idx = [i for i, m in enumerate(messages) if m["content"]]
    marked = [dict(m, content=f"\ue000{i}\ue001") if i in set(text_idx) else m
              for i, m in enumerate(messages)]
    real = _render(info, messages)
    skeleton = _render(info, marked)
    pieces: list[str] = []
    found: list[tuple[int, int, int]] = []
    seen: set[int] = set()
    pos_bytes = 0
    last = 0
    for m in _MARK.finditer(skeleton):
        i = int(m.group(1))
        scaffold = skeleton[last:m.start()]
        pieces.append(scaffold)
        pos_bytes += len(scaffold.encode("utf-8"))
        content = messages[i]["content"]
        n = len(content.encode("utf-8"))
        if i not in seen:
            found.append((i, pos_bytes, pos_bytes + n))
            seen.add(i)
        pieces.append(content)
        pos_bytes += n
        last = m.end()
    pieces.append(skeleton[last:])
    if "".join(pieces) == real:
        return real, found
    return real, _search_verbatim(real, messages, text_idx)


def _search_verbatim(real: str, messages: list[dict], text_idx: list[int]) -> list[tuple[int, int, int]]:
    raw = real.encode("utf-8")
    found = []
    cursor = 0
    for i in text_idx:
        content = messages[i]["content"].encode("utf-8")
        at = raw.find(content, cursor)
        if at >= 0:
            found.append((i, at, at + len(content)))
            cursor = at + len(content)
    return found


def common_messages(located: list[list[tuple[int, int, int]]]) -> list[int]:
    """The indices of the messages every side holds in one common order, increasing: the messages
    behind the rows of `common_segments`, row for row."""
    keep = set.intersection(*(set(i for i, _, _ in loc) for loc in located)) if located else set()
    while True:  # drop messages some side renders out of order, until all orders agree
        orders = []
        for loc in located:
            order, last = [], -1
            for i, _, _ in loc:
                if i in keep and i > last:
                    order.append(i)
                    last = i
            orders.append(order)
        agreed = set.intersection(*(set(o) for o in orders)) if orders else set()
        if agreed == keep:
            break
        keep = agreed
    return sorted(keep)


def common_segments(located: list[list[tuple[int, int, int]]]) -> list[np.ndarray]:
    """Per side, the `[S, 3]` axis segments `(render start, render end, axis start)` of the message
    contents every side holds, in one common increasing order (the messages `common_messages`
    lists)."""
    keep = set(common_messages(located))
    out = []
    for loc in located:
        rows, axis = [], 0
        for i, s, e in sorted((x for x in loc if x[0] in keep), key=lambda x: x[0]):
            rows.append((s, e, axis))
            axis += e - s
        out.append(np.array(rows, np.int64).reshape(-1, 3))
    return out
