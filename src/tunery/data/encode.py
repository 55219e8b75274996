"""Tokenization with the model's own chat template, and label masks.

Which tokens are trained is found by rendering the template prefix by prefix: the text of an
assistant reply is what `messages[:i+1]` adds after `messages[:i]` with the generation prompt.
This needs no knowledge of any particular template (SmolLM2's silently inserted default system
message, Llama 3's headers, ...), and the label covers the reply and its end-of-turn marker
(`<|im_end|>`, `<|eot_id|>`), which is what teaches the model to stop. When a template does not
render prefixes as prefixes (some drop earlier reasoning), we fall back to finding the reply's
text in the full rendering.

The full conversation is rendered once and tokenized exactly as `apply_chat_template(...,
tokenize=True)` does (`add_special_tokens=False`), so training sees the same ids as inference.

Truncation keeps the left part and is reported in `truncated`, never silent.
"""

from __future__ import annotations

import json
from typing import Any

from tunery.data.types import IGNORE, Conversation, Message, PreferencePair
from tunery.errors import DataError

IGNORE_INDEX = IGNORE  # the public name `tunery.data` has always exported

# For models that ship no chat template (base models): ChatML, as SmolLM2, Qwen and many others
# use. Tools are listed in the system turn as JSON, and calls are written <tool_call>{...}</tool_call>.
# When the tokenizer's EOS is not `<|im_end|>` (a base model has never seen that marker), each
# assistant turn also ends with EOS, so a trained model stops on its own EOS at generation time.
DEFAULT_CHAT_TEMPLATE = (
    "{%- set eot = '<|im_end|>' if (eos_token is not defined or not eos_token or eos_token == '<|im_end|>')"
    " else '<|im_end|>' + eos_token %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}"
    "{%- endif %}"
    '{{- \'You can call these tools. Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.\\n\''
    " + (tools | tojson) + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] is defined %}{%- for call in message['tool_calls'] %}"
    "{{- '<tool_call>' + (call['function'] | tojson) + '</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- (eot if message['role'] == 'assistant' else '<|im_end|>') + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as templates expect them: no `weight`, no None values, and tool-call arguments as
    objects (Qwen 2.5 and Llama 3.1 templates `tojson` them; OpenAI data stores JSON strings)."""
    out = []
    for m in messages:
        new = {k: v for k, v in m.items() if k != "weight" and v is not None}
        if "tool_calls" in new:
            calls = []
            for call in new["tool_calls"]:
                fn = dict(call.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass  # not JSON: the template gets the string as written
                calls.append({**call, "function": fn})
            new["tool_calls"] = calls
        out.append(new)
    return out


def render(
    tokenizer: Any,
    messages: list[Message],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The template's text for `messages` (the tokenizer's own template, else the default)."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            _template_messages(messages),
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=None if has_chat_template(tokenizer) else DEFAULT_CHAT_TEMPLATE,
        )
    except TemplateError as exc:  # e.g. "Conversation roles must alternate user/assistant/..."
        raise DataError(
            f"The model's chat template refused this conversation: {exc}", code="template_error"
        ) from None


def _ids(encoding: Any) -> list[int]:
    """`input_ids` from a list or a dict-like `BatchEncoding`."""
    if hasattr(encoding, "keys") and "input_ids" in encoding:
        encoding = encoding["input_ids"]
    return list(encoding)


def _end_markers(tokenizer: Any) -> list[str]:
    return sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)


def _reply_spans(
    tokenizer: Any, messages: list[Message], tools: list[dict[str, Any]] | None, full: str
) -> list[tuple[int, int, int]]:
    """Character spans (start, end, message index) of each assistant reply in `full`."""
    spans = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        upto = render(tokenizer, messages[: i + 1], tools)
        try:
            head = render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else None
        except DataError:  # some templates refuse a conversation that does not end with a user turn
            head = None
        if head is not None and full.startswith(upto) and upto.startswith(head) and len(head) >= cursor:
            start, end = len(head), len(upto)
            while end > start and upto[end - 1].isspace():  # the newline after <|im_end|> is layout
                end -= 1
        else:
            start, end = _find_reply(tokenizer, msg, full, cursor, i)
        spans.append((start, end, i))
        cursor = end
    return spans


def _find_reply(tokenizer: Any, msg: Message, full: str, cursor: int, index: int) -> tuple[int, int]:
    """Fallback: the reply's content found verbatim after `cursor`, plus a directly following
    end-of-turn special token."""
    content = msg.get("content") or ""
    if not content and msg.get("tool_calls"):
        content = msg["tool_calls"][0]["function"]["name"]
    start = full.find(content, cursor) if content else -1
    if start < 0:
        err = DataError(
            f"The chat template does not render assistant message {index + 1} verbatim, so its "
            "tokens cannot be labelled.",
            code="template_mismatch",
        )
        err.field = f"messages[{index}]"  # set after, so `_located` can add the line around a bare message
        raise err
    end = start + len(content)
    for marker in _end_markers(tokenizer):
        if full.startswith(marker, end):
            end += len(marker)
            break
    return start, end


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return _ids(tokenizer(text, add_special_tokens=False)), None


def _token_range(
    tokenizer: Any, text: str, offsets: list[tuple[int, int]] | None, start: int, end: int
) -> list[int]:
    """Indexes of the tokens that overlap characters [start, end)."""
    if offsets is None:  # slow tokenizers: count the tokens of the text before each boundary
        lo = len(_tokenize(tokenizer, text[:start])[0])
        hi = len(_tokenize(tokenizer, text[:end])[0])
        return list(range(lo, hi))
    return [k for k, (s, e) in enumerate(offsets) if (s < end and e > start) or (s == e and start <= s < end)]


def _located(err: DataError, line: int) -> DataError:
    """The same error, now naming the example's line."""
    return DataError(err.message, err.hint, line=line or None, field=err.field, code=err.code)


def _with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    if system_prompt and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def encode_chat(
    conv: Conversation,
    tokenizer: Any,
    max_length: int | None,
    train_on_prompt: bool = False,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Token ids and labels of a conversation: labels are -100 except on assistant replies whose
    `weight` is not 0 (reply text and end-of-turn token). `train_on_prompt` labels every token
    except weight-0 replies. Longer than `max_length`: the left part is kept, `truncated` is True."""
    messages = _with_system(conv.messages, system_prompt)
    try:
        full = render(tokenizer, messages, conv.tools)
        spans = _reply_spans(tokenizer, messages, conv.tools, full)
    except DataError as err:
        raise _located(err, conv.line) from None
    ids, offsets = _tokenize(tokenizer, full)
    trained = [False] * len(ids)
    excluded = [False] * len(ids)
    for start, end, i in spans:
        marks = excluded if messages[i].get("weight", 1) == 0 else trained
        for k in _token_range(tokenizer, full, offsets, start, end):
            marks[k] = True
    keep = [(not x) for x in excluded] if train_on_prompt else trained
    labels = [t if k else IGNORE_INDEX for t, k in zip(ids, keep, strict=True)]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def encode_prompt(
    messages: list[Message],
    tokenizer: Any,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Ids of a conversation followed by the assistant generation prompt, for generation."""
    return _tokenize(tokenizer, render(tokenizer, messages, tools, add_generation_prompt=True))[0]


def _split_completion(
    tokenizer: Any, prompt: list[Message], reply: list[Message], tools: list[dict[str, Any]] | None
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of prompt + reply, where the completion is the reply's tokens
    up to and including its end-of-turn token, and the prompt ends with the generation prompt."""
    messages = prompt + reply
    full = render(tokenizer, messages, tools)
    ids, offsets = _tokenize(tokenizer, full)
    spans = [s for s in _reply_spans(tokenizer, messages, tools, full) if s[2] >= len(prompt)]
    if not spans:
        raise DataError("The reply has no assistant message.", code="invalid_preference")
    start, end = spans[0][0], spans[-1][1]
    index = _token_range(tokenizer, full, offsets, start, end)
    first, last = index[0], index[-1] + 1
    return ids[:first], ids[first:last]


def encode_pair(pair: PreferencePair, tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """Shared prompt ids and the chosen/rejected completion ids (the reply tokens only), for DPO-style
    objectives. Over `max_length` (prompt + longer reply): the left part is kept; the prompt keeps
    at most max_length - 1 tokens so each reply keeps at least one."""
    try:
        prompt_ids, chosen = _split_completion(tokenizer, pair.prompt, pair.chosen, pair.tools)
        _, rejected = _split_completion(tokenizer, pair.prompt, pair.rejected, pair.tools)
    except DataError as err:
        raise _located(err, pair.line) from None
    truncated = max_length is not None and len(prompt_ids) + max(len(chosen), len(rejected)) > max_length
    if truncated and max_length is not None:
        prompt_ids = prompt_ids[: max_length - 1]
        room = max_length - len(prompt_ids)
        chosen, rejected = chosen[:room], rejected[:room]
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}


def encode_completion(
    prompt: list[Message],
    completion: list[Message],
    tokenizer: Any,
    max_length: int | None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Prompt ids and completion ids of one judged completion (KTO), truncated like `encode_pair`."""
    prompt_ids, completion_ids = _split_completion(tokenizer, prompt, completion, tools)
    truncated = max_length is not None and len(prompt_ids) + len(completion_ids) > max_length
    if truncated and max_length is not None:
        prompt_ids = prompt_ids[: max_length - 1]
        completion_ids = completion_ids[: max_length - len(prompt_ids)]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "truncated": truncated}


def encode_text(text: str, tokenizer: Any) -> list[int]:
    """Ids of plain text (with the tokenizer's own BOS if it adds one) and EOS appended, for
    pretraining; the caller chunks or packs them."""
    ids = _ids(tokenizer(text, add_special_tokens=True))
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids
