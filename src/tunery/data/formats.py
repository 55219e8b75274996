"""Detect the format of each record and convert it to Tunery's internal forms (`data/types.py`).

Formats (detected per record from its keys):

| format            | keys                                             | native kind  |
|-------------------|--------------------------------------------------|--------------|
| `chat`            | `messages` (+ `tools`), OpenAI chat              | chat         |
| `prompt_completion` | `prompt`, `completion`                         | chat         |
| `alpaca`          | `instruction`, `input`?, `output`, `system`?, `history`? | chat |
| `sharegpt`        | `conversations` of `from`/`value`                | chat         |
| `openai_dpo`      | `input{messages}`, `preferred_output`, `non_preferred_output` | preference |
| `chosen_rejected` | `prompt`?, `chosen`, `rejected`                  | preference   |
| `kto`             | `prompt`, `completion`, `label` (bool)           | unpaired     |
| `text`            | `text`                                           | text         |
| `labeled`         | `text` + `label`/`labels` (only when kind "labeled" is asked) | labeled |
| `prompt`          | `prompt` alone                                   | prompt       |

An objective asks for a kind; `CONVERSIONS` lists what converts into what (preference data used
for SFT trains on the chosen reply, chat data used for pretraining is rendered as ChatML text...).
Anything else is refused with OpenAI's wording.

Each format is read by its parser in `parsers.py` and message lists are checked in `messages.py`;
every error names file, line and field, with a
cookbook code and OpenAI's wording in `err.openai`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Set
from pathlib import Path
from typing import Any

from tunery.data.messages import (
    Where,
)
from tunery.data.parsers import PARSERS
from tunery.data.readers import OnError, Records, read_records
from tunery.data.types import Conversation, Dataset, Labeled, Message, PreferencePair, Text, Unpaired
from tunery.errors import DataError

KINDS = ("chat", "preference", "unpaired", "text", "labeled", "prompt")
FORMAT_KIND = {
    "chat": "chat",
    "prompt_completion": "chat",
    "alpaca": "chat",
    "sharegpt": "chat",
    "openai_dpo": "preference",
    "chosen_rejected": "preference",
    "kto": "unpaired",
    "text": "text",
    "labeled": "labeled",
    "prompt": "prompt",
}
# What the wrong kind of file gets told, per wanted kind (the chat one is OpenAI's own sentence).
EXPECTED = {
    "chat": "Unexpected file format, expected either prompt/completion pairs or chat messages.",
    "preference": "Invalid file format for preference training (e.g. method dpo): expected "
    "input/preferred_output/non_preferred_output or prompt/chosen/rejected examples.",
    "unpaired": "Invalid file format for unpaired feedback (kto): expected prompt/completion/label "
    "examples or preference pairs.",
    "text": 'Invalid file format for pretraining: expected {"text": ...} examples or chat data.',
    "labeled": 'Invalid file format for classification: expected {"text", "label"} or '
    '{"text", "labels"} examples.',
    "prompt": "Invalid file format for reinforcement fine-tuning: expected chat messages or prompts.",
}
FORMAT_NAMES = {
    "chat": "chat messages",
    "prompt_completion": "prompt/completion pairs",
    "alpaca": "Alpaca examples",
    "sharegpt": "ShareGPT conversations",
    "openai_dpo": "preference pairs",
    "chosen_rejected": "preference pairs",
    "kto": "unpaired prompt/completion/label examples",
    "text": "plain text",
    "labeled": "labeled text",
    "prompt": "prompts without replies",
}


# --- detection -----------------------------------------------------------------------------------


def detect_format(record: dict[str, Any], kind: str | None = None) -> str | None:
    """The format of one record from its keys, or None when nothing matches."""
    if "messages" in record:
        return "chat"
    if "input" in record and ("preferred_output" in record or "non_preferred_output" in record):
        return "openai_dpo"
    if "chosen" in record or "rejected" in record:
        return "chosen_rejected"
    if "prompt" in record and "completion" in record:
        return "kto" if "label" in record else "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "conversations" in record:
        return "sharegpt"
    if "text" in record:
        return "labeled" if kind == "labeled" and ("label" in record or "labels" in record) else "text"
    if "prompt" in record:
        return "prompt"
    return None


# --- conversions between kinds -------------------------------------------------------------------


def render_chatml(messages: list[Message]) -> str:
    """Messages as ChatML text: how chat data reads when it is used as plain text (pretraining)."""
    parts = []
    for m in messages:
        body = m.get("content") or ""
        if m.get("tool_calls"):
            body += "".join(json.dumps(c["function"], ensure_ascii=False) for c in m["tool_calls"])
        parts.append(f"<|im_start|>{m['role']}\n{body}<|im_end|>\n")
    return "".join(parts)


def _split_reply(conv: Conversation) -> Conversation:
    """A conversation as an RL prompt: the trailing assistant reply becomes the reference."""
    msgs = list(conv.messages)
    extra = dict(conv.extra)
    if msgs and msgs[-1]["role"] == "assistant":
        extra.setdefault("completion", msgs.pop()["content"])
    return Conversation(msgs, conv.tools, conv.line, extra)


def _chosen_conversation(p: PreferencePair) -> Conversation:
    return Conversation(p.prompt + p.chosen, p.tools, p.line)


def _chat_labeled(conv: Conversation) -> list[Labeled]:
    """A chat example whose last assistant reply is a label (sentiment: system + review + label)
    as a labeled text: the last user message, labelled with the reply."""
    msgs = conv.messages
    users = [m for m in msgs[:-1] if m["role"] == "user"]
    if not msgs or msgs[-1]["role"] != "assistant" or not users:
        raise DataError(
            "A chat example used for classification must end with a user message and the assistant's label.",
            line=conv.line,
            field="messages",
        )
    label = str(msgs[-1].get("content") or "").strip()
    return [Labeled(str(users[-1].get("content") or ""), [label], conv.line)]


CONVERSIONS: dict[tuple[str, str], Callable[[Any], list[Any]]] = {
    ("chat", "labeled"): _chat_labeled,
    ("chat", "chat"): lambda c: [c],
    ("chat", "text"): lambda c: [Text(render_chatml(c.messages), c.line)],
    ("chat", "prompt"): lambda c: [_split_reply(c)],
    ("preference", "preference"): lambda p: [p],
    ("preference", "chat"): lambda p: [_chosen_conversation(p)],
    ("preference", "text"): lambda p: [Text(render_chatml(p.prompt + p.chosen), p.line)],
    ("preference", "prompt"): lambda p: [_split_reply(_chosen_conversation(p))],
    # TRL's unpairing: the chosen reply is desirable, the rejected one is not.
    ("preference", "unpaired"): lambda p: [
        Unpaired(p.prompt, p.chosen, True, p.line),
        Unpaired(p.prompt, p.rejected, False, p.line),
    ],
    ("unpaired", "unpaired"): lambda u: [u],
    ("text", "text"): lambda t: [t],
    ("labeled", "labeled"): lambda t: [t],
    ("labeled", "text"): lambda t: [Text(t.text, t.line)],
    ("prompt", "prompt"): lambda c: [c],
}


def native_kind(record: dict[str, Any]) -> str | None:
    fmt = detect_format(record)
    return FORMAT_KIND[fmt] if fmt else None


def convert_records(
    recs: Records,
    kind: str | None = None,
    *,
    accept: Set[str] | None = None,
    on_error: OnError | None = None,
) -> Dataset:
    """Convert raw records to examples of `kind` (default: the first record's own kind).

    `accept` narrows which native kinds may convert (validation of OpenAI method names is strict).
    Per-example errors go to `on_error` when given, else raise; a file whose first example is of
    the wrong kind always raises, since every other line would repeat the same complaint.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    examples: list[Any] = []
    formats: list[str] = []
    first = True
    for line, rec in recs.records:
        w = Where(recs.path, line)
        fmt = detect_format(rec, kind)
        try:
            if fmt is None:
                keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
                wanted = EXPECTED.get(kind or "chat")
                raise w.fail(f"{wanted} This example has keys: {keys}.", None, "unrecognized_format", wanted)
            src = FORMAT_KIND[fmt]
            target = kind or (FORMAT_KIND[formats[0]] if formats else src)
            if (src, target) not in CONVERSIONS or (accept is not None and src not in accept):
                raise w.fail(
                    f"{EXPECTED[target]} The file has {FORMAT_NAMES[fmt]}.",
                    None,
                    "format_mismatch",
                    EXPECTED[target],
                )
            native = PARSERS[fmt](rec, w, target == "chat")
        except DataError as err:
            if on_error is None or (first and err.code == "format_mismatch"):
                raise
            on_error(err)
            first = False
            continue
        first = False
        if fmt not in formats:
            formats.append(fmt)
        if fmt == "prompt_completion" and target == "text" and isinstance(rec.get("prompt"), str):
            # Legacy completion data reads as prompt followed by completion, without chat markup.
            examples.append(Text(rec["prompt"] + str(rec.get("completion") or ""), line))
            continue
        examples.extend(CONVERSIONS[(src, target)](native))
    fmt_name = formats[0] if len(formats) == 1 else ("mixed" if formats else "unknown")
    final_kind = kind or (FORMAT_KIND[formats[0]] if formats else "chat")
    return Dataset(recs.path, fmt_name, final_kind, examples, recs.content_hash)


def load_dataset(path: str | Path, kind: str | None = None) -> Dataset:
    """Read a data file and convert it to examples of `kind` ("chat", "preference", "unpaired",
    "text", "labeled", "prompt"; None keeps the file's own kind). Raises `DataError` on the first
    problem, naming the file, line and field."""
    return convert_records(read_records(path), kind)
