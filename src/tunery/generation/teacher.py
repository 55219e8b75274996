"""A local model as the teacher of `tunery data synth` (`data.synth`'s teacher protocol:
`complete(prompts, temperature, max_tokens) -> texts`), answering through `generate_batch`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunery.generation.generate import chat_prompt, generate_batch
from tunery.generation.sequence import GenerationParams
from tunery.methods import load_trained


@dataclass
class LocalTeacher:
    """A local model (spec or directory, optionally with an adapter) through `generate_batch`."""

    model: str
    adapter: str | None = None
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.model_obj, self.tokenizer = load_trained(self.model, self.adapter)
        self.model_obj.eval()
        self.description = {"type": "local", "model": self.model, "adapter": self.adapter}

    def complete(self, prompts: list[list[dict[str, Any]]], temperature: float, max_tokens: int) -> list[str]:
        ids = [chat_prompt(self.tokenizer, p) for p in prompts]
        params = GenerationParams(max_new_tokens=max_tokens, temperature=temperature, seed=self.seed)
        self.seed += 1  # a new seed per call: repeated calls must not produce the same samples
        return [
            r.text
            for r in generate_batch(self.model_obj, self.tokenizer, ids, params, batch_size=self.batch_size)
        ]
