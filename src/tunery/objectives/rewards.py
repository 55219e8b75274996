"""Reward functions for online RL (GRPO, RLAIF), by name.

A reward function scores one completion: `fn(completion: str, example: dict, **params) -> float`,
where `example` holds the prompt's `messages` and the data record's other fields (an `answer`, the
reference `completion`...). The config names them with their parameters and a weight:

    grpo:
      reward_functions:
        - {name: contains, word: blue}
        - {name: length, target: 20, weight: 0.5}
        - {name: "my_rewards:score"}       # a custom Python callable module:function

Builtins are registered below. Custom callables import user code, so they are accepted only from
a local config or CLI; the server sets `allow_custom_rewards: false`.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunery.errors import ConfigError
from tunery.registry import Registry

RewardFn = Callable[..., float]
REWARD_FUNCTIONS: Registry[RewardFn] = Registry("reward function")


class RewardSpec(BaseModel):
    """One reward function in the config: its name, weight and parameters (any other keys)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        description="A builtin (contains, regex, exact_answer, json_valid, length) or module:function."
    )
    weight: float = Field(1.0, description="Weight in the summed reward.")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def contains(completion: str, example: dict[str, Any], word: str, case_sensitive: bool = False) -> float:
    """1 when the completion contains `word` as a whole word."""
    flags = 0 if case_sensitive else re.IGNORECASE
    return 1.0 if re.search(rf"\b{re.escape(word)}\b", completion, flags) else 0.0


def regex(completion: str, example: dict[str, Any], pattern: str, full_match: bool = False) -> float:
    """1 when the completion matches `pattern` (anywhere, or entirely with `full_match`)."""
    match = re.fullmatch if full_match else re.search
    return 1.0 if match(pattern, completion.strip(), re.DOTALL) else 0.0


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.-]", " ", text.lower()).split()).rstrip(".")


def exact_answer(completion: str, example: dict[str, Any], field: str = "answer") -> float:
    """1 when the completion equals the example's `field` (default `answer`; else the data's
    reference `completion`), ignoring case, punctuation and spacing."""
    expected = example.get(field, example.get("completion"))
    if expected is None:
        return 0.0
    return 1.0 if _normal(completion) == _normal(str(expected)) else 0.0


def json_valid(completion: str, example: dict[str, Any]) -> float:
    """1 when the completion (or a ```json fenced block in it) parses as JSON."""
    text = completion.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return 0.0
    return 1.0


def length(completion: str, example: dict[str, Any], target: int = 50, unit: str = "words") -> float:
    """1 at `target` words (or characters), falling linearly to 0 at zero or twice the target."""
    n = len(completion.split()) if unit == "words" else len(completion)
    return max(0.0, 1.0 - abs(n - target) / max(1, target))


for _fn in (contains, regex, exact_answer, json_valid, length):
    REWARD_FUNCTIONS.register(_fn.__name__, _fn)


def resolve(spec: RewardSpec, allow_custom: bool) -> RewardFn:
    """The callable a spec names; custom `module:function` only when `allow_custom`."""
    if ":" not in spec.name:
        return REWARD_FUNCTIONS.get(spec.name)
    if not allow_custom:
        raise ConfigError(
            f"Custom reward function {spec.name!r} refused: only builtin reward functions "
            f"({', '.join(REWARD_FUNCTIONS.names())}) are accepted here.",
            param="reward_functions",
        )
    module_name, _, attr = spec.name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"Cannot load reward function {spec.name!r}: {exc}", param="reward_functions"
        ) from None
    if not callable(fn):
        raise ConfigError(f"{spec.name!r} is not callable.", param="reward_functions")
    return fn


def bind(
    specs: list[RewardSpec], allow_custom: bool
) -> list[tuple[str, float, Callable[[str, dict], float]]]:
    """(metric name, weight, fn(completion, example)) for each spec, checked before training."""
    bound = []
    for k, spec in enumerate(specs):
        fn = resolve(spec, allow_custom)
        params = spec.params
        name = spec.name.split(":")[-1] if len(specs) == len({s.name for s in specs}) else f"{spec.name}_{k}"

        def call(completion: str, example: dict, _fn: RewardFn = fn, _p: dict = params) -> float:
            return float(_fn(completion, example, **_p))

        try:
            call("", {})  # wrong parameter names fail here, not mid-training
        except TypeError as exc:
            raise ConfigError(f"Reward function {spec.name!r}: {exc}", param="reward_functions") from None
        except Exception:  # noqa: BLE001 - user code may reject an empty completion; that is fine
            pass
        bound.append((name, spec.weight, call))
    return bound
