"""The config resolved against the registries: the option schemas of registered methods and
objectives, and the entry points that validate a config's option blocks with them.

config.py sits below the registries and keeps option blocks raw; everything that builds a config
for training (the CLI, the job spec, the sweep, the run itself) validates them through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tunery.config import TuneryConfig, read_config
from tunery.errors import ConfigError
from tunery.methods import METHODS
from tunery.objectives import OBJECTIVES


def option_schema(name: str) -> type[BaseModel] | None:
    # The registries load torch and peft: imported when first asked, so that modules which only
    # name this function (the server's resolver) stay light to import.
    if name in METHODS:
        return METHODS.get(name).options
    if name in OBJECTIVES:
        return OBJECTIVES.get(name).options
    return None


# pydantic's validation context that checks option blocks in the same pass as the other fields
CONTEXT = {"option_schema": option_schema}


def load_config(
    path: str | Path | None = None, sets: list[str] | None = None, overrides: dict[str, Any] | None = None
) -> TuneryConfig:
    """The config of a YAML file, `--set` assignments and flag overrides, option blocks validated."""
    return read_config(path, sets, overrides, option_schema=option_schema)


def validate(raw: dict[str, Any]) -> TuneryConfig:
    """`TuneryConfig.model_validate(raw)` with the option blocks validated in the same pass (a
    pydantic ValidationError otherwise, for the caller to word)."""
    return TuneryConfig.model_validate(raw, context=CONTEXT)


def validate_options(config: TuneryConfig) -> TuneryConfig:
    """Validate the option blocks of a config built without the registries (`TuneryConfig(...)`);
    a config built through here is unchanged."""
    try:
        config.bind_options(option_schema)
    except ValueError as exc:
        raise ConfigError(
            f"Invalid config: {exc}", hint="See `tunery train --help` and examples/*.yaml."
        ) from None
    return config
