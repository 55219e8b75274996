"""One parser per native record format (`formats.py` detects the format and converts between kinds).

Each parser takes a record, where it came from (file and line) and whether chat examples must end
with an assistant reply, and returns the format's native form (`data/types.py`): `Conversation`,
`PreferencePair`, `Unpaired`, `Text` or `Labeled`. Errors name the line and field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tunery.data.messages import (
    Where,
    as_messages,
    parse_messages,
    parse_tool_calls,
    parse_tools,
    require_string,
)
from tunery.data.types import Conversation, Labeled, Message, PreferencePair, Text, Unpaired

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
