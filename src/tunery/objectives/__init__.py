"""Training objectives, one module each, registered explicitly here."""

from tunery.data.validate import OPENAI_FORMATS
from tunery.errors import ConfigError
from tunery.objectives.base import Context, Objective, StepOutput
from tunery.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective", loader=lambda: _load_builtin())

# OpenAI's fine-tuning `method.type` values and the objective each one trains with: the one table,
# read by `dpo.openai_method_to_config` and the server's request parser (`jobs/spec.py`).
# `reinforcement` (RFT, a policy sampled and scored by a grader) is on-policy RL, so GRPO.
OPENAI_METHOD_TYPES = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}


def validation_kind(method: str) -> str | None:
    """The data kind to check `method`'s training files against (`data.validate_file(kind=...)`):
    None for OpenAI's method types, whose stricter format rules `data.validate` keeps; an objective's
    own `data_kind` otherwise; a ConfigError naming the known ones for anything else."""
    if method in OPENAI_FORMATS:
        return None
    if method not in OBJECTIVES:
        raise ConfigError(
            f"Unknown method {method!r} for validation.",
            hint=f"Use one of: {', '.join([*OPENAI_FORMATS, *OBJECTIVES.names()])}.",
            param="method",
        )
    return OBJECTIVES.get(method).data_kind


def register(objective: Objective) -> Objective:
    return OBJECTIVES.register(objective.name, objective)


def _load_builtin() -> None:
    # Each import registers one objective (its module calls `register`): at the top, an import cycle
    # (tunery/optional.py EXCEPTIONS).
    from tunery.objectives import (  # noqa: F401
        classify,
        distill,
        dpo,
        grpo,
        kto,
        orpo,
        pretrain,
        reward,
        rlaif,
        sft,
        simpo,
    )


__all__ = [
    "OBJECTIVES",
    "OPENAI_METHOD_TYPES",
    "Context",
    "Objective",
    "StepOutput",
    "register",
    "validation_kind",
]
