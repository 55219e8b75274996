"""The training loop, top to bottom: forward -> objective loss -> backward -> optimizer step -> events.

Every objective and method goes through this one loop. Losses are summed per unit (token, pair)
and divided by the units of the whole optimizer step, so accumulating micro-batches is exactly the
big batch. The loop owns signals: SIGTERM or Ctrl-C finishes at a step boundary and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunery.objectives.base import Context, Objective
from tunery.train import checkpoint as ckpt
from tunery.train.batching import Step
from tunery.train.events import EventLog


@dataclass
class LoopState:
    step: int = 0
    trained_tokens: int = 0
    interrupted: bool = False
    last_metrics: dict[str, Any] = field(default_factory=dict)
    last_eval: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopSetup:
    model: torch.nn.Module
    objective: Objective
    ctx: Context
    features: list[dict[str, Any]]
    val_features: list[dict[str, Any]]
    steps: list[Step]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accelerator: Any
    events: EventLog
    run_dir: Path
    pad_id: int
    packed: bool
    max_grad_norm: float
    logging_steps: int
    eval_steps: int | None
    save_steps: int | None
    save_total_limit: int
    save_model: Callable[[Path], None]
    aux_loss: Callable[[torch.nn.Module], torch.Tensor | None] | None = None
    extra_eval: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    after_step: Callable[[torch.nn.Module, int, int], None] | None = None
    method_metrics: Callable[[torch.nn.Module], dict[str, Any]] | None = None


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


@contextlib.contextmanager
def stop_on_signals(state: LoopState):
    """Turn SIGTERM/SIGINT into a flag the loop checks at micro-batch boundaries."""

    def handler(signum, frame):
        state.interrupted = True

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a server thread): no signal handling
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_step(s: LoopSetup, step: Step, state: LoopState) -> dict[str, float] | None:
    """One optimizer step over its micro-batches; None if interrupted before it completed."""
    model, obj = s.model, s.objective
    batches = [obj.collate([s.features[i] for i in mb], s.pad_id, s.packed) for mb in step.micro_batches]
    if obj.rollout is not None:  # online objectives sample first: their units exist only afterwards
        batches = [obj.rollout(model, b, s.ctx) for b in batches]
    units = sum(b["n_units"] for b in batches)
    loss_total = 0.0
    sums: dict[str, float] = {}
    n_tokens = 0
    model.train()
    for batch in batches:
        if state.interrupted:
            s.optimizer.zero_grad(set_to_none=True)
            return None
        batch = _to_device(batch, s.accelerator.device)
        with s.accelerator.autocast():
            out = obj.loss(model, batch, s.ctx)
            loss = out.loss_sum / max(1, units)
            if s.aux_loss is not None:
                aux = s.aux_loss(model)
                if aux is not None:
                    loss = loss + aux * (batch["n_units"] / max(1, units))
        s.accelerator.backward(loss)
        loss_total += float(out.loss_sum.detach())
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        n_tokens += batch.get("n_tokens", 0)
    if s.max_grad_norm:
        s.accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.max_grad_norm)
    s.optimizer.step()
    if s.after_step is not None:  # before zero_grad: AdaLoRA scores importance from the gradients
        s.after_step(model, step.index, len(s.steps))
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    state.trained_tokens += n_tokens
    metrics = {"train_loss": loss_total / max(1, units), "n_tokens": n_tokens}
    metrics.update({f"train_{k}": v / max(1, units) for k, v in sums.items()})
    return metrics


@torch.no_grad()
def evaluate(s: LoopSetup) -> dict[str, Any]:
    """Validation loss and metrics with the objective itself, per unit over the whole set."""
    if not s.val_features:
        return {}
    model, obj = s.model, s.objective
    model.eval()
    from tunery.train.batching import split_micro_batches

    lengths = [obj.length(f) for f in s.val_features]
    budget = max(max(lengths), 4096)
    total = units = 0.0
    sums: dict[str, float] = {}
    for mb in split_micro_batches(list(range(len(lengths))), lengths, budget):
        batch = obj.collate([s.val_features[i] for i in mb], s.pad_id, s.packed)
        if obj.rollout is not None:
            batch = obj.rollout(model, batch, s.ctx)
        batch = _to_device(batch, s.accelerator.device)
        with s.accelerator.autocast():
            out = obj.loss(model, batch, s.ctx)
        total += float(out.loss_sum)
        units += batch["n_units"]
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    result = {"valid_loss": total / max(1, units)}
    result.update({f"valid_{k}": v / max(1, units) for k, v in sums.items()})
    if s.extra_eval is not None:
        result.update(s.extra_eval(model))
    model.train()
    return result


def save_checkpoint(s: LoopSetup, state: LoopState, step: Step) -> Path:
    meta = {
        "step": state.step,
        "epoch": step.epoch,
        "trained_tokens": state.trained_tokens,
        "metrics": {**state.last_metrics, **state.last_eval},
    }
    path = ckpt.write_checkpoint(
        s.run_dir / "checkpoints",
        state.step,
        model=s.model,
        optimizer=s.optimizer,
        scheduler=s.scheduler,
        meta=meta,
        save_model=s.save_model,
    )
    ckpt.rotate(s.run_dir / "checkpoints", s.save_total_limit)
    s.events.emit(
        f"Checkpoint created at step {state.step}",
        data={
            "kind": "checkpoint",
            "step": state.step,
            "path": str(path.relative_to(s.run_dir)),
            "metrics": meta["metrics"],
        },
    )
    return path


def train_loop(s: LoopSetup, state: LoopState) -> LoopState:
    total = len(s.steps)
    window_tokens, window_start = 0, time.perf_counter()
    with stop_on_signals(state):
        for step in s.steps:
            if step.index <= state.step:
                continue  # already done before the resume point
            s.ctx.step, s.ctx.total_steps = step.index, total
            metrics = run_step(s, step, state)
            if metrics is None:
                break
            state.step = step.index
            window_tokens += metrics.pop("n_tokens")
            last_of_epoch = step.index == total or s.steps[step.index].epoch != step.epoch
            do_eval = last_of_epoch or (s.eval_steps and step.index % s.eval_steps == 0)
            state.last_eval = evaluate(s) if do_eval else {}
            if step.index % s.logging_steps == 0 or do_eval or step.index == total:
                elapsed = time.perf_counter() - window_start
                row = {
                    "step": step.index,
                    "total_steps": total,
                    "epoch": step.epoch,
                    **metrics,
                    "learning_rate": s.scheduler.get_last_lr()[0],
                    "tokens_per_second": window_tokens / elapsed if elapsed > 0 else 0.0,
                    **state.last_eval,
                    **(s.method_metrics(s.model) if s.method_metrics is not None else {}),
                }
                state.last_metrics = {k: v for k, v in row.items() if k.startswith(("train_", "valid_"))}
                s.events.metrics(row)
                window_tokens, window_start = 0, time.perf_counter()
            if (last_of_epoch and step.index != total) or (s.save_steps and step.index % s.save_steps == 0):
                save_checkpoint(s, state, step)
            if state.interrupted:
                break
        if state.interrupted and state.step > 0:
            save_checkpoint(s, state, s.steps[state.step - 1])
    return state
