"""Training objectives, one module each, registered explicitly here."""

from tunery.objectives.base import Context, Objective, StepOutput
from tunery.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective")


def register(objective: Objective) -> Objective:
    return OBJECTIVES.register(objective.name, objective)


def _load_builtin() -> None:
    # Each import registers one objective; `tunery methods` lists them in this order.
    from tunery.objectives import (  # noqa: F401
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


_load_builtin()

__all__ = ["OBJECTIVES", "Context", "Objective", "StepOutput", "register"]
