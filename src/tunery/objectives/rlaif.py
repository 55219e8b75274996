"""`rlaif`: RL from AI feedback. A judge model (objectives/judge.py) scores each sampled completion and
that score is the GRPO reward (`grpo.py` does the rest). The judge is a local model loaded through Tunery
(base spec plus optional adapter) or any OpenAI-compatible endpoint (`base_url`, e.g. `tunery serve`).
The same judge labels preference pairs for DPO offline: `tunery data judge` (see `objectives/cli.py`).
A reply without a number scores 0 (logged as the `reward/judge` part of the reward breakdown).
"""

from __future__ import annotations

from pydantic import Field

from tunery.objectives import register
from tunery.objectives.base import Objective
from tunery.objectives.grpo import GRPO, GRPOOptions
from tunery.objectives.judge import JudgeOptions


class RLAIFOptions(GRPOOptions):
    judge: JudgeOptions = Field(default_factory=JudgeOptions, description="The judge model or endpoint.")


register(
    Objective(
        name="rlaif",
        description="RLAIF: GRPO with a judge model (local or OpenAI-compatible endpoint) as the reward.",
        options=RLAIFOptions,
        data_kind="prompt",
        encode=GRPO.encode,
        collate=GRPO.collate,
        loss=GRPO.loss,
        setup=GRPO.setup,
        rollout=GRPO.rollout,
    )
)
