"""Tunery's internal example forms. Every input format converts into one of these.

Messages are OpenAI-style dicts: {"role", "content", optional "weight" (0/1), "tool_calls",
"tool_call_id", "name"}. `line` is the 1-based line (JSONL) or row (CSV/Parquet, header excluded)
the example came from, so every later error can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]

# The label of a token that is not trained (prompt, padding): torch's cross-entropy skips it. The one
# definition; `data.encode.IGNORE_INDEX`, `objectives.logps.IGNORE_INDEX` are this value by name.
IGNORE = -100


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    line: int = 0
    # The record's other top-level fields (e.g. the answer an RL grader reads); for kind "prompt"
    # (GRPO / RL, no reply) also the data's reference reply under "completion", when it had one.
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferencePair:
    prompt: list[Message]  # the conversation up to the reply
    chosen: list[Message]  # the preferred assistant reply (one message)
    rejected: list[Message]
    line: int = 0
    tools: list[dict[str, Any]] | None = None


@dataclass
class Unpaired:
    """A single judged completion (KTO): desirable or not."""

    prompt: list[Message]
    completion: list[Message]
    desirable: bool
    line: int = 0


@dataclass
class Text:
    text: str
    line: int = 0


@dataclass
class Labeled:
    """A text with one label or several (classification heads)."""

    text: str
    labels: list[str]
    line: int = 0


@dataclass
class Dataset:
    """Loaded examples of one kind, with the file and format they came from."""

    path: str
    format: str  # "chat", "prompt_completion", "alpaca", "sharegpt", "text", "preference", ...
    kind: str  # "chat" | "preference" | "unpaired" | "text" | "labeled" | "prompt" (Conversation, no reply)
    examples: list[Any] = field(default_factory=list)
    content_hash: str = ""

    def __len__(self) -> int:
        return len(self.examples)
