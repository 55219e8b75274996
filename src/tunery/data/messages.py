"""OpenAI chat messages: check them and normalise them, with OpenAI's error codes and wording.

Errors carry a cookbook code (`missing_messages_list`, `message_missing_key`, ...) and, in
`err.openai`, the detail OpenAI's service would print ("Example 3, message 2 Discriminator 'role'
is missing in value"). `field` is a JSON path with 0-based indexes (`messages[1].role`), while the
OpenAI text counts messages from 1, as people do.
"""

from __future__ import annotations

import json
from typing import Any

from tunery.data.types import Message
from tunery.errors import DataError

ROLES = ("system", "user", "assistant", "tool", "function")
# The cookbook allows role, content, name, function_call, weight; tool calling adds the last two.
MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "weight", "tool_calls", "tool_call_id"})


class Where:
    """Where an example came from, for error messages."""

    def __init__(self, file: str, line: int):
        self.file, self.line = file, line

    def fail(
        self, message: str, field: str | None = None, code: str = "invalid_example", openai: str | None = None
    ) -> DataError:
        err = DataError(message, file=self.file, line=self.line, field=field, code=code)
        err.openai = openai or message  # type: ignore[attr-defined]
        return err


def _content(value: Any, w: Where, field: str, openai: str) -> str | None:
    """A message's content: a string, or OpenAI content parts of type text (joined)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = []
        for part in value:
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise w.fail(
                    f"Only text content parts are supported, got type {part.get('type')!r}.",
                    field,
                    "missing_content",
                    f"{openai} content part is not text",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise w.fail(
        f"Content must be a string, got {type(value).__name__}.",
        field,
        "missing_content",
        f"{openai} Input should be a valid string",
    )


def parse_tool_calls(value: Any, w: Where, field: str, openai: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise w.fail("tool_calls must be a non-empty list.", field, "invalid_tool_calls", openai)
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise w.fail(
                "Each tool call needs a function with a name: "
                '{"id", "type": "function", "function": {"name", "arguments"}}.',
                f"{field}[{j}]",
                "invalid_tool_calls",
                f"{openai} tool call {j + 1} is invalid",
            )
        args = fn.get("arguments", "{}")
        calls.append(
            {
                "id": call.get("id") or f"call_{j}",
                "type": "function",
                "function": {
                    "name": fn["name"],
                    "arguments": args if isinstance(args, str) else json.dumps(args),
                },
            }
        )
    return calls


def parse_message(msg: Any, w: Where, field: str, openai: str) -> Message:
    """Check one message of a list (`field` names it, `openai` is OpenAI's prefix for its errors)."""
    if not isinstance(msg, dict):
        raise w.fail(
            "Each message must be an object.",
            field,
            "data_type",
            f"{openai} Input should be a valid dictionary",
        )
    if "role" not in msg:
        raise w.fail(
            "Message has no 'role'.",
            f"{field}.role",
            "message_missing_key",
            f"{openai} Discriminator 'role' is missing in value",
        )
    extra = sorted(set(msg) - MESSAGE_KEYS)
    if extra:
        raise w.fail(
            f"Unrecognized key(s) {', '.join(map(repr, extra))} in message; allowed: "
            f"{', '.join(sorted(MESSAGE_KEYS))}.",
            f"{field}.{extra[0]}",
            "message_unrecognized_key",
            f"{openai} Extra inputs are not permitted: {extra[0]}",
        )
    role = msg["role"]
    if role not in ROLES:
        raise w.fail(
            f"Unrecognized role {role!r}; expected one of {', '.join(ROLES)}.",
            f"{field}.role",
            "unrecognized_role",
            f"{openai} Input tag {role!r} found using 'role' does not "
            f"match any of the expected tags: {', '.join(map(repr, ROLES))}",
        )
    content = _content(msg.get("content"), w, f"{field}.content", openai)
    new: Message = {"role": role, "content": content}
    if msg.get("tool_calls") is not None:
        new["tool_calls"] = parse_tool_calls(msg["tool_calls"], w, f"{field}.tool_calls", openai)
    if isinstance(msg.get("function_call"), dict):  # legacy form: one call, answered by role function
        new["tool_calls"] = parse_tool_calls(
            [{"function": msg["function_call"]}], w, f"{field}.function_call", openai
        )
    if role == "function":
        new["role"] = "tool"
    for key in ("name", "tool_call_id"):
        if msg.get(key) is not None:
            new[key] = msg[key]
    if content is None and "tool_calls" not in new:
        raise w.fail(
            "Message has no 'content'.",
            f"{field}.content",
            "missing_content",
            f"{openai} Field required: content",
        )
    if "weight" in msg:
        if role != "assistant" or msg["weight"] not in (0, 1) or isinstance(msg["weight"], float):
            raise w.fail(
                "'weight' must be 0 or 1, and only on assistant messages.",
                f"{field}.weight",
                "invalid_weight",
                f"{openai} Invalid weight",
            )
        new["weight"] = int(msg["weight"])
    return new


def parse_messages(
    value: Any,
    w: Where,
    where: str = "messages",
    require_assistant: bool = True,
) -> list[Message]:
    """Check an OpenAI message list and normalise it (legacy function calls become tool calls)."""
    if not isinstance(value, list) or not value:
        raise w.fail(
            f"'{where}' must be a non-empty list of messages.",
            where,
            "missing_messages_list",
            f"Example {w.line}: '{where}' must be a non-empty list",
        )
    out = [
        parse_message(msg, w, f"{where}[{i}]", f"Example {w.line}, message {i + 1}")
        for i, msg in enumerate(value)
    ]
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        raise w.fail(
            "Example has no assistant message to train on.",
            where,
            "example_missing_assistant_message",
            f"Example {w.line} is missing an assistant message",
        )
    return out


def as_messages(value: Any, w: Where, field: str, role: str) -> list[Message]:
    """A string becomes one message of `role`; a list is checked as OpenAI messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return parse_messages(value, w, field, require_assistant=False)
    raise w.fail(f"'{field}' must be a string or a list of messages.", field, "missing_content")


def parse_tools(record: dict[str, Any], w: Where) -> list[dict[str, Any]] | None:
    tools = record.get("tools")
    if isinstance(tools, str) and tools.strip():  # LLaMA-Factory stores tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise w.fail("'tools' is a string but not JSON.", "tools", "invalid_tools") from None
    if tools in (None, "", []):
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise w.fail("'tools' must be a list of tool definitions.", "tools", "invalid_tools")
    return tools


def require_string(record: dict[str, Any], key: str, w: Where, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise w.fail(f"'{key}' must be a non-empty string.", key, "missing_content")
    return value
