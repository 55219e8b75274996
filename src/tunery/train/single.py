"""One process training alone: the trivial stand-in for `distributed.Dist`.

The loop and the builders (train/loop.py, train/setup.py) talk to "the processes of this run" through
one interface. With several ranks that is `Dist` (train/distributed.py): data split, collectives,
sharded saves. With one process every collective is the identity and every save is the plain one,
which is this class, so the loop reads the same whether one process trains or many.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tunery.errors import ConfigError
from tunery.train import checkpoint as ckpt
from tunery.train.batching import Step


class SingleProcess:
    rank, world, is_main = 0, 1, True
    launched = False  # no process group: accelerate's process state is reset with each run
    # One process may stop at any micro-batch boundary; ranks stop together, at step boundaries.
    stops_alone = True
    loss_scale = 1.0  # nothing averages gradients over ranks

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None  # as prepared by accelerate
        self.accelerator: Any = None
        self.lengths: list[int] = []
        self.token_budget = 0

    # ------------------------------------------------------------- collectives: the identity
    def barrier(self) -> None:
        pass

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def any(self, flag: bool) -> bool:
        return flag

    def main_first(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # ------------------------------------------------------------- model preparation
    def check_objective(self, objective: Any) -> None:
        pass

    def accelerator_kwargs(self, max_grad_norm: float) -> dict[str, Any]:
        return {}

    def shard(self, model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
        self.accelerator = accelerator
        return model

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        self.model, optimizer = self.accelerator.prepare(model, optimizer)
        return self.model, optimizer

    # ------------------------------------------------------------- the step
    def plan(self, step: Step) -> list[tuple[tuple[int, ...], bool]]:
        return [(mb, True) for mb in step.micro_batches]

    def call(self, fn: Callable[..., Any], *args: Any, train: bool = False) -> Any:
        return fn(self.model, *args)

    def extra_eval_here(self) -> bool:
        return True

    # ------------------------------------------------------------- saving
    def save_model(self, directory: Path, save_fn: Callable[[Path], None]) -> None:
        save_fn(directory)

    def write_checkpoint(
        self, ckpt_root: Path, step: int, *, optimizer: Any, scheduler: Any, meta: dict[str, Any], save_model
    ) -> Path:
        return ckpt.write_checkpoint(
            ckpt_root,
            step,
            model=self.model,
            optimizer=optimizer,
            scheduler=scheduler,
            meta=meta,
            save_model=save_model,
        )

    def restore(self, path: Path, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        if not (path / "trainable.safetensors").exists():
            raise ConfigError(
                f"{path} holds sharded state from a multi-process run.",
                hint="Resume it with the same --nproc and distributed.strategy.",
            )
        return ckpt.restore(path, self.accelerator.unwrap_model(self.model), optimizer, scheduler)

    def close(self) -> None:
        pass
