"""An Ollama `Modelfile` for an exported GGUF: the prompt template in Go syntax, and stop tokens.

Ollama does not run Jinja chat templates, so the model's template must be restated in Go's template
language. Rather than parse Jinja, the model's template is *rendered* on probe conversations and
compared with each known format (ChatML, Llama 3); the format whose rendering matches is written out.
The same comparison reveals a default system message the template inserts when a conversation has
none (SmolLM2 does), which becomes the Modelfile's SYSTEM line: Ollama then prepends it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class ChatFormat:
    """A turn-based prompt format: every message is `head(role) + content + tail`."""

    name: str
    head: str  # with {role}
    tail: str
    stops: tuple[str, ...]

    def render(self, messages: list[Message], add_generation_prompt: bool, prefix: str = "") -> str:
        text = prefix + "".join(self.head.format(role=m["role"]) + m["content"] + self.tail for m in messages)
        return text + (self.head.format(role="assistant") if add_generation_prompt else "")

    def go_template(self) -> str:
        head = self.head.format(role="{{ .Role }}")
        return (
            "{{- range .Messages }}"
            + head
            + "{{ .Content }}"
            + self.tail
            + "{{ end }}"
            + self.head.format(role="assistant")
        )


FORMATS = (
    ChatFormat("chatml", "<|im_start|>{role}\n", "<|im_end|>\n", ("<|im_start|>", "<|im_end|>")),
    ChatFormat(
        "llama3",
        "<|start_header_id|>{role}<|end_header_id|>\n\n",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
)

_PROBE = [
    {"role": "user", "content": "Probe question one?"},
    {"role": "assistant", "content": "Probe answer one."},
    {"role": "user", "content": "Probe question two?"},
]
_SYSTEM = {"role": "system", "content": "Probe system message."}


@dataclass(frozen=True)
class DetectedFormat:
    format: ChatFormat
    default_system: str | None


def _apply(tokenizer: Any, messages: list[Message]) -> str | None:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template may raise on roles it does not accept (Jinja `raise_exception`)
        return None
    return out if isinstance(out, str) else None


def detect_format(tokenizer: Any) -> DetectedFormat | None:
    """The known format the tokenizer's chat template renders exactly, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    with_system = _apply(tokenizer, [_SYSTEM, *_PROBE])
    without = _apply(tokenizer, _PROBE)
    if with_system is None or without is None:
        return None
    # A template may open with the BOS token as text; llama.cpp adds BOS itself (from
    # tokenizer.ggml.add_bos_token), so it is matched here but left out of the Go template.
    bos = getattr(tokenizer, "bos_token", None) or ""
    prefixes = [p for p in dict.fromkeys(["", bos]) if with_system.startswith(p)]
    for fmt in FORMATS:
        for prefix in prefixes:
            if fmt.render([_SYSTEM, *_PROBE], True, prefix) != with_system:
                continue
            if fmt.render(_PROBE, True, prefix) == without:
                return DetectedFormat(fmt, None)
            system = _inserted_system(fmt, without, prefix)
            if system is not None:
                return DetectedFormat(fmt, system)
    return None


def _inserted_system(fmt: ChatFormat, rendered: str, prefix: str) -> str | None:
    """The system message a template adds when there is none, if that is what it did."""
    head = prefix + fmt.head.format(role="system")
    rest = fmt.render(_PROBE, True)
    if not (rendered.startswith(head) and rendered.endswith(fmt.tail + rest)):
        return None
    system = rendered[len(head) : len(rendered) - len(fmt.tail + rest)]
    check = fmt.render([{"role": "system", "content": system}, *_PROBE], True, prefix)
    return system if check == rendered else None


def _quoted(text: str) -> str:
    if '"""' in text:  # the Modelfile's triple quotes have no escape
        raise ValueError("text contains triple quotes")
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer: Any) -> tuple[str, DetectedFormat | None]:
    """The Modelfile text for `./gguf_name`, and the format it was written for (None: not known)."""
    found = detect_format(tokenizer)
    lines = [
        "# Ollama Modelfile written by `tunery export`. Create and run the model with:",
        "#   ollama create my-model -f Modelfile && ollama run my-model",
        f"FROM ./{gguf_name}",
    ]
    stops: list[str] = []
    if found is None:
        lines.append(
            "# The chat template is not one Tunery can restate in Ollama's syntax (ChatML, Llama 3); "
            "Ollama matches the chat template stored in the GGUF against its own templates instead."
        )
    else:
        lines.append(f"TEMPLATE {_quoted(found.format.go_template())}")
        if found.default_system:
            try:
                lines.append(f"SYSTEM {_quoted(found.default_system)}")
            except ValueError:
                pass
        stops.extend(found.format.stops)
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines.extend(f'PARAMETER stop "{s}"' for s in stops)
    return "\n".join(lines) + "\n", found
