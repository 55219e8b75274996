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

from tunery.modeling.shapes import pad_to_bucket
from tunery.objectives.base import Context, Objective
from tunery.train import checkpoint as ckpt
from tunery.train.batching import Step, split_micro_batches
from tunery.train.events import EventLog
from tunery.train.levers import DEFAULT as DEFAULT_LEVERS
from tunery.train.levers import Levers
from tunery.train.memory import rss_mb


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
    # The processes of this run: distributed.Dist with several ranks, single.SingleProcess alone
    # (collectives are then the identity), so the loop below has one path for both.
    dist: Any
    aux_loss: Callable[[torch.nn.Module], torch.Tensor | None] | None = None
    extra_eval: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    after_step: Callable[[torch.nn.Module, int, int], None] | None = None
    method_metrics: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    # round token-level batches up to shape buckets (bf16 on a CPU keeps memory per shape: shapes.py)
    shape_buckets: bool = False
    levers: Levers = DEFAULT_LEVERS  # the benchmark's switches (train/levers.py)
    # packed micro-batches lay the prefix their rows share once (setup.speedups says when)
    share_prefix: bool = False
    # each validation feature's task, when the validation set holds several (else None): the
    # evaluation then also reports `valid_loss/<task>`
    val_tasks: list[str] | None = None


def collate(s: LoopSetup, features: list[dict[str, Any]]) -> dict[str, Any]:
    share = {"share_prefix": True} if s.share_prefix and s.objective.shares_prefix else {}
    batch = s.objective.collate(features, s.pad_id, s.packed, **share)
    if s.shape_buckets and s.objective.token_level:
        batch = pad_to_bucket(batch, s.pad_id)
    if not s.levers.supervised_head_only:  # read by forward.supervised_loss
        batch["full_head"] = True
    return batch


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


def _loss(s: LoopSetup, model: torch.nn.Module, batch: dict[str, Any]) -> tuple:
    out = s.objective.loss(model, batch, s.ctx)
    aux = s.aux_loss(model) if s.aux_loss is not None else None
    return out.loss_sum, aux, out.metrics


def _positions(batch: dict[str, Any]) -> int:
    """Token positions a micro-batch runs through the model: every `*input_ids` tensor's size."""
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor))


def run_step(s: LoopSetup, step: Step, state: LoopState) -> dict[str, float] | None:
    """One optimizer step over its micro-batches; None if interrupted before it completed.

    With several processes each rank runs its share of the step (`real` False marks padding passes)
    and the units, losses and metrics are summed over ranks, so the step is the one-process step."""
    model, obj, dist = s.model, s.objective, s.dist
    plan = dist.plan(step)
    batches = [collate(s, [s.features[i] for i in mb]) for mb, _ in plan]
    if obj.rollout is not None:  # online objectives sample first: their units exist only afterwards
        batches = [dist.call(obj.rollout, b, s.ctx) for b in batches]
    units = sum(b["n_units"] for b, (_, real) in zip(batches, plan, strict=True) if real)
    units = int(dist.all_sum([units])[0])
    loss_total = 0.0
    sums: dict[str, float] = {}
    n_tokens = positions = 0
    model.train()
    for k, (batch, (_, real)) in enumerate(zip(batches, plan, strict=True)):
        if state.interrupted and dist.stops_alone:  # ranks stop together, at step boundaries only
            s.optimizer.zero_grad(set_to_none=True)
            return None
        positions = max(positions, _positions(batch))
        batch = _to_device(batch, s.accelerator.device)
        # 1.0 for one process: the loss below is exactly loss_sum / units
        weight = dist.loss_scale * float(real)
        with dist.sync(k == len(batches) - 1):
            with s.accelerator.autocast():
                loss_sum, aux, metrics = dist.call(lambda m, b: _loss(s, m, b), batch, train=True)
                loss = loss_sum * weight / max(1, units)
                if aux is not None:
                    loss = loss + aux * (batch["n_units"] * weight / max(1, units))
            s.accelerator.backward(loss)
        if not real:  # a padding pass adds nothing, but its metric names keep the ranks' sums aligned
            for key in metrics:
                sums.setdefault(key, 0.0)
            continue
        loss_total += float(loss_sum.detach())
        for key, v in metrics.items():
            sums[key] = sums.get(key, 0.0) + v
        n_tokens += batch.get("n_tokens", 0)
    # rank 0 logs the numbers of the whole step (one process: its own)
    names = sorted(sums)
    total = dist.all_sum([loss_total, n_tokens, *(sums[n] for n in names)])
    loss_total, n_tokens = total[0], int(total[1])
    sums = dict(zip(names, total[2:], strict=True))
    if s.max_grad_norm:
        s.accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.max_grad_norm)
    s.optimizer.step()
    if s.after_step is not None:  # before zero_grad: AdaLoRA scores importance from the gradients
        s.after_step(model, step.index, len(s.steps))
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    state.trained_tokens += n_tokens
    # batch_positions: this rank's largest micro-batch (rows x padded length); activation memory, and
    # so the RSS after the step, follows it (bench/soak.py separates that from growth with it)
    metrics = {"train_loss": loss_total / max(1, units), "n_tokens": n_tokens, "batch_positions": positions}
    metrics.update({f"train_{k}": v / max(1, units) for k, v in sums.items()})
    return metrics


def _eval_sums(
    s: LoopSetup, indices: list[int], lengths: list[int], budget: int
) -> tuple[float, float, dict[str, float]]:
    """(loss sum, units, metric sums) of the objective over the validation features `indices`."""
    model, obj = s.model, s.objective
    total = units = 0.0
    sums: dict[str, float] = {}
    for mb in split_micro_batches(indices, lengths, budget):
        batch = collate(s, [s.val_features[i] for i in mb])
        if obj.rollout is not None:
            batch = obj.rollout(model, batch, s.ctx)
        batch = _to_device(batch, s.accelerator.device)
        with s.accelerator.autocast():
            out = s.dist.call(lambda m, b: obj.loss(m, b, s.ctx), batch)
        total += float(out.loss_sum)
        units += batch["n_units"]
        for k, v in out.metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    return total, units, sums


def task_groups(tasks: list[str] | None, n: int) -> dict[str | None, list[int]]:
    """The validation features by task ({None: all} for one task), tasks in sorted order."""
    if not tasks:
        return {None: list(range(n))}
    groups: dict[str | None, list[int]] = {}
    for i, task in sorted(enumerate(tasks), key=lambda x: x[1]):
        groups.setdefault(task, []).append(i)
    return groups


@torch.no_grad()
def evaluate(s: LoopSetup) -> dict[str, Any]:
    """Validation loss and metrics with the objective itself, per unit over the whole set; with
    several tasks also each task's loss (`valid_loss/<task>`), its units' share of the whole."""
    if not s.val_features:
        return {}
    model = s.model
    model.eval()
    lengths = [s.objective.length(f) for f in s.val_features]
    budget = max(max(lengths), 4096)
    total = units = 0.0
    sums: dict[str, float] = {}
    per_task: dict[str, float] = {}
    for task, indices in task_groups(s.val_tasks, len(lengths)).items():
        t_total, t_units, t_sums = _eval_sums(s, indices, lengths, budget)
        total, units = total + t_total, units + t_units
        for k, v in t_sums.items():
            sums[k] = sums.get(k, 0.0) + v
        if task is not None:
            per_task[f"valid_loss/{task}"] = t_total / max(1, t_units)
    result = {"valid_loss": total / max(1, units)}
    result.update({f"valid_{k}": v / max(1, units) for k, v in sums.items()})
    result.update(per_task)
    if s.extra_eval is not None and s.dist.extra_eval_here():
        result.update(s.dist.call(s.extra_eval))
    s.dist.barrier()  # the other ranks wait for rank 0's generation-based metrics
    model.train()
    return result


def save_checkpoint(s: LoopSetup, state: LoopState, step: Step) -> Path:
    meta = {
        "step": state.step,
        "epoch": step.epoch,
        "trained_tokens": state.trained_tokens,
        "metrics": {**state.last_metrics, **state.last_eval},
    }
    path = s.dist.write_checkpoint(
        s.run_dir / "checkpoints",
        state.step,
        optimizer=s.optimizer,
        scheduler=s.scheduler,
        meta=meta,
        save_model=s.save_model,
    )
    if s.dist.is_main:
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
    """Run the steps after `state.step`. The caller holds `stop_on_signals(state)` around this and
    the final save, so a signal at any point from the first step to run.json ends the run cleanly."""
    total = len(s.steps)
    # tokens/s counts the steps' own time: evaluations and checkpoint saves are left out of the window
    window_tokens, window_seconds = 0, 0.0
    for step in s.steps:
        if step.index <= state.step:
            continue  # already done before the resume point
        s.ctx.step, s.ctx.total_steps = step.index, total
        started = time.perf_counter()
        metrics = run_step(s, step, state)
        if metrics is None:
            break
        window_seconds += time.perf_counter() - started
        state.interrupted = s.dist.any(state.interrupted)
        # With several ranks only the vote decides: a signal landing during the evaluation or the
        # save below reaches the ranks at different moments, and one rank leaving while another
        # steps on pairs unlike collectives (a hang). The next step's vote catches it on all.
        stop = state.interrupted
        state.step = step.index
        window_tokens += metrics.pop("n_tokens")
        last_of_epoch = step.index == total or s.steps[step.index].epoch != step.epoch
        do_eval = last_of_epoch or (s.eval_steps and step.index % s.eval_steps == 0)
        state.last_eval = evaluate(s) if do_eval else {}
        if step.index % s.logging_steps == 0 or do_eval or step.index == total:
            row = {
                "step": step.index,
                "total_steps": total,
                "epoch": step.epoch,
                **metrics,
                "learning_rate": s.scheduler.get_last_lr()[0],
                "tokens_per_second": window_tokens / window_seconds if window_seconds > 0 else 0.0,
                "rss_mb": round(rss_mb(), 1),  # soak tests and the progress bar watch it for growth
                **state.last_eval,
                **(s.method_metrics(s.model) if s.method_metrics is not None else {}),
            }
            state.last_metrics = {k: v for k, v in row.items() if k.startswith(("train_", "valid_"))}
            s.events.metrics(row)
            window_tokens, window_seconds = 0, 0.0
        if (last_of_epoch and step.index != total) or (s.save_steps and step.index % s.save_steps == 0):
            save_checkpoint(s, state, step)
        if stop or (s.dist.stops_alone and state.interrupted):
            break
    # a signal after the last vote, on some ranks only: all agree again
    state.interrupted = s.dist.any(state.interrupted)
    if state.step == total:
        # every step ran: a signal now (during the last evaluation) ends the run as it is, and the
        # final save goes ahead; an "interrupted" run with nothing left to train would resume to nothing
        state.interrupted = False
    elif state.interrupted and state.step > 0:
        save_checkpoint(s, state, s.steps[state.step - 1])
    return state
