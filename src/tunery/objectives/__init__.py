"""Training objectives, one module each, registered explicitly here."""

from tunery.objectives.base import Context, Objective, StepOutput
from tunery.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective", loader=lambda: _load_builtin())


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


__all__ = ["OBJECTIVES", "Context", "Objective", "StepOutput", "register"]
