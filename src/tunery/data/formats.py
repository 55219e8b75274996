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

Message lists are checked in `messages.py`; every error names file, line and field, with a
cookbook code and OpenAI's wording in `err.openai`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunery.data.messages import (
    Where,
    as_messages,
    parse_messages,
    parse_tool_calls,
    parse_tools,
    require_string,
)
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
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
    "function_call": "assistant",
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


# --- per-format parsers (native forms) -----------------------------------------------------------


def _chat(rec: dict[str, Any], w: Where, require_assistant: bool) -> Conversation:
    msgs = parse_messages(rec.get("messages"), w, "messages", require_assistant)
    extra = {k: v for k, v in rec.items() if k not in ("messages", "tools", "parallel_tool_calls")}
    return Conversation(msgs, parse_tools(rec, w), w.line, extra)


def _prompt_completion(rec: dict[str, Any], w: Where, require_assistant: bool) -> Conversation:
    prompt = as_messages(rec.get("prompt"), w, "prompt", "user")
    completion = as_messages(rec.get("completion"), w, "completion", "assistant")
    return Conversation(prompt + completion, parse_tools(rec, w), w.line)


def _alpaca(rec: dict[str, Any], w: Where, require_assistant: bool) -> Conversation:
    instruction = require_string(rec, "instruction", w)
    extra_input = require_string(rec, "input", w, required=False)
    msgs: list[Message] = []
    if rec.get("system"):
        msgs.append({"role": "system", "content": require_string(rec, "system", w)})
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise w.fail("'history' must be a list of [question, answer] pairs.", "history", "invalid_history")
    for i, turn in enumerate(history):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise w.fail(
                "Each history entry must be a [question, answer] pair of strings.",
                f"history[{i}]",
                "invalid_history",
            )
        msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    msgs += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": require_string(rec, "output", w)},
    ]
    return Conversation(msgs, None, w.line)


def _sharegpt(rec: dict[str, Any], w: Where, require_assistant: bool) -> Conversation:
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise w.fail(
            "'conversations' must be a non-empty list of {from, value} turns.",
            "conversations",
            "missing_messages_list",
        )
    msgs: list[Message] = []
    if isinstance(rec.get("system"), str) and rec["system"]:
        msgs.append({"role": "system", "content": rec["system"]})
    for i, turn in enumerate(turns):
        field = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise w.fail("Each turn must be an object.", field, "data_type")
        speaker = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if speaker is None:
            raise w.fail("Turn has no 'from'.", f"{field}.from", "message_missing_key")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise w.fail(
                f"Unrecognized speaker {speaker!r}; expected one of {', '.join(sorted(SHAREGPT_ROLES))}.",
                f"{field}.from",
                "unrecognized_role",
            )
        if not isinstance(value, str):
            raise w.fail("Turn has no 'value' string.", f"{field}.value", "missing_content")
        if str(speaker).lower() == "function_call":  # LLaMA-Factory: the value is the call as JSON
            try:
                call = json.loads(value)
            except json.JSONDecodeError:
                raise w.fail(
                    "A function_call turn must hold JSON {name, arguments}.",
                    f"{field}.value",
                    "invalid_tool_calls",
                ) from None
            calls = call if isinstance(call, list) else [call]
            msgs.append(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": parse_tool_calls([{"function": c} for c in calls], w, field, field),
                }
            )
        else:
            msgs.append({"role": role, "content": value})
    if require_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise w.fail(
            "Example has no assistant (gpt) turn to train on.",
            "conversations",
            "example_missing_assistant_message",
        )
    return Conversation(msgs, parse_tools(rec, w), w.line)


def _reply(value: Any, w: Where, field: str) -> list[Message]:
    """A preferred/rejected reply: a string or messages ending with an assistant message."""
    msgs = as_messages(value, w, field, "assistant")
    if msgs[-1]["role"] != "assistant":
        raise w.fail(f"'{field}' must end with an assistant message.", field, "invalid_preference")
    return msgs


def _openai_dpo(rec: dict[str, Any], w: Where, require_assistant: bool) -> PreferencePair:
    inp = rec.get("input")
    if not isinstance(inp, dict):
        raise w.fail("'input' must be an object with 'messages'.", "input", "missing_messages_list")
    prompt = parse_messages(inp.get("messages"), w, "input.messages", require_assistant=False)
    for key in ("preferred_output", "non_preferred_output"):
        if not isinstance(rec.get(key), list) or not rec.get(key):
            raise w.fail(f"'{key}' must be a list holding one assistant message.", key, "invalid_preference")
    chosen = _reply(rec["preferred_output"], w, "preferred_output")
    rejected = _reply(rec["non_preferred_output"], w, "non_preferred_output")
    return PreferencePair(prompt, chosen, rejected, w.line, parse_tools(inp, w) or parse_tools(rec, w))


def _chosen_rejected(rec: dict[str, Any], w: Where, require_assistant: bool) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if rec.get(key) in (None, "", []):
            raise w.fail(
                f"A preference pair needs both 'chosen' and 'rejected'; '{key}' is missing.",
                key,
                "invalid_preference",
            )
    if rec.get("prompt") is None:
        # TRL's implicit-prompt form: full conversations whose common prefix is the prompt.
        chosen = as_messages(rec["chosen"], w, "chosen", "assistant")
        rejected = as_messages(rec["rejected"], w, "rejected", "assistant")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise w.fail(
                "No 'prompt', and 'chosen'/'rejected' share no prompt messages.",
                "prompt",
                "invalid_preference",
            )
    else:
        prompt = as_messages(rec["prompt"], w, "prompt", "user")
        chosen = _reply(rec["chosen"], w, "chosen")
        rejected = _reply(rec["rejected"], w, "rejected")
        # Some datasets repeat the prompt inside chosen/rejected: keep only the replies.
        if (
            chosen[: len(prompt)] == prompt
            and rejected[: len(prompt)] == prompt
            and len(chosen) > len(prompt)
        ):
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply or reply[-1]["role"] != "assistant":
            raise w.fail(f"'{key}' must end with an assistant reply.", key, "invalid_preference")
    if isinstance(rec.get("system"), str) and rec["system"] and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": rec["system"]}, *prompt]
    return PreferencePair(prompt, chosen, rejected, w.line, parse_tools(rec, w))


def _kto(rec: dict[str, Any], w: Where, require_assistant: bool) -> Unpaired:
    label = rec.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false", "1", "0"):
        label = label.strip().lower() in ("true", "1")  # CSV cells are text
    if label not in (True, False) or isinstance(label, float):
        raise w.fail(f"'label' must be true or false, got {label!r}.", "label", "invalid_label")
    prompt = as_messages(rec.get("prompt"), w, "prompt", "user")
    completion = _reply(rec.get("completion"), w, "completion")
    return Unpaired(prompt, completion, bool(label), w.line)


def _text(rec: dict[str, Any], w: Where, require_assistant: bool) -> Text:
    return Text(require_string(rec, "text", w), w.line)


def _labeled(rec: dict[str, Any], w: Where, require_assistant: bool) -> Labeled:
    text = require_string(rec, "text", w)
    raw = rec.get("labels", rec.get("label"))
    values = raw if isinstance(raw, list) else [raw]
    if not values or any(v is None or isinstance(v, dict | list) or v == "" for v in values):
        raise w.fail(
            "'label' must be a string or number, or 'labels' a non-empty list of them.",
            "labels" if "labels" in rec else "label",
            "invalid_label",
        )
    return Labeled(text, [str(v) for v in values], w.line)


def _prompt(rec: dict[str, Any], w: Where, require_assistant: bool) -> Conversation:
    extra = {k: v for k, v in rec.items() if k not in ("prompt", "tools")}
    return Conversation(
        as_messages(rec.get("prompt"), w, "prompt", "user"), parse_tools(rec, w), w.line, extra
    )


PARSERS: dict[str, Callable[[dict[str, Any], Where, bool], Any]] = {
    "chat": _chat,
    "prompt_completion": _prompt_completion,
    "alpaca": _alpaca,
    "sharegpt": _sharegpt,
    "openai_dpo": _openai_dpo,
    "chosen_rejected": _chosen_rejected,
    "kto": _kto,
    "text": _text,
    "labeled": _labeled,
    "prompt": _prompt,
}


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
    recs: Records, kind: str | None = None, *, accept: set[str] | None = None, on_error: OnError | None = None
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
