"""Where the config finds the option schemas of registered methods and objectives."""

from __future__ import annotations

from pydantic import BaseModel


def option_schema(name: str) -> type[BaseModel] | None:
    from tunery.methods import METHODS
    from tunery.objectives import OBJECTIVES

    if name in METHODS:
        return METHODS.get(name).options
    if name in OBJECTIVES:
        return OBJECTIVES.get(name).options
    return None
