"""Training objectives, one module each, registered explicitly here."""

from tunery.objectives.base import Context, Objective, StepOutput
from tunery.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective", loader=lambda: _load_builtin())

# OpenAI's fine-tuning `method.type` values and the objective each one trains with: the one table,
# read by `dpo.openai_method_to_config` and the server's request parser (`jobs/spec.py`).
# `reinforcement` (RFT, a policy sampled and scored by a grader) is on-policy RL, so GRPO.
OPENAI_METHOD_TYPES = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}


def register(objective: Objective) -> Objective:
    return OBJECTIVES.register(objective.name, objective)


def _load_builtin() -> None:
    # Each import registers one objective (its module calls `register`).
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


__all__ = ["OBJECTIVES", "OPENAI_METHOD_TYPES", "Context", "Objective", "StepOutput", "register"]
