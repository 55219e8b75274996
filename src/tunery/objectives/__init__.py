"""Training objectives, one module each, registered explicitly here."""

from tunery.objectives.base import Context, Objective, StepOutput
from tunery.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective")


def register(objective: Objective) -> Objective:
    return OBJECTIVES.register(objective.name, objective)


def _load_builtin() -> None:
    from tunery.objectives import sft  # noqa: F401


_load_builtin()

__all__ = ["OBJECTIVES", "Context", "Objective", "StepOutput", "register"]
