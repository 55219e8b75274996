"""The builders of a run: each returns one thing the loop needs (model, features, steps, optimizer,
context, saver). train/run.py calls them in order; nothing here runs the loop or writes the run
directory."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunery.config import TuneryConfig
from tunery.data import cached_encode
from tunery.data.types import Dataset
from tunery.errors import TuneryError
from tunery.evaluate import run as evaluation
from tunery.methods import Method, continue_training, count_parameters, has_token_averaged_loss
from tunery.modeling.attention import use_packed_attention
from tunery.models import load_model, load_tokenizer, model_info
from tunery.models.placement import enable_tf32, load_dtype
from tunery.models.unwrap import unwrap
from tunery.objectives.base import Context, Objective
from tunery.train import checkpoint as ckpt
from tunery.train import hparams
from tunery.train.batching import Step, schedule
from tunery.train.events import EventLog
from tunery.train.levers import Levers
from tunery.train.loop import LoopSetup, LoopState, lr_lambda
from tunery.train.lora_kernel import fuse_lora_layers
from tunery.train.memory import active_allocator
from tunery.train.precision import autocast_dtype, mixed_precision


@dataclass
class RunData:
    """The run's validated data: the training files, their mix, the validation set (or None), and
    each validation example's task when the set holds several (train/run.py::merge_validation)."""

    datasets: list
    examples: list
    validation: Any = None
    val_tasks: list[str] | None = None


def build_model(config: TuneryConfig, method: Method, method_opts: Any, objective: Objective):
    kwargs = method.load_kwargs(method_opts) if method.load_kwargs else {}
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)

    def load(**overrides: Any) -> torch.nn.Module:
        """The base as the method needs it (qlora: 4-bit); `overrides` win (a classifier's task)."""
        args = {"trust_remote_code": config.trust_remote_code, **kwargs, **overrides}
        if "dtype" not in args:
            args["dtype"] = _base_dtype(config, method)
        return load_model(config.model, **args)

    if objective.head is not None:  # reward, classify: a new head, trained in full under any method
        model, head_names = objective.head(config, load)
        method_opts = _train_in_full(method_opts, head_names)
    else:
        model = load()
    if config.init_from:  # sequential fine-tuning: continue an existing adapter or model
        model = continue_training(model, config.init_from, method)
    else:
        model = method.apply(model, method_opts)
    return model, tokenizer


def _base_dtype(config: TuneryConfig, method: Method) -> torch.dtype:
    """fp32, except a frozen bf16 base trained on a GPU with bf16 autocast: that one stays in bf16
    (2 bytes a parameter instead of 4; see models/placement.py)."""
    if not torch.cuda.is_available() or config.hyperparameters.precision not in ("auto", "bf16"):
        return torch.float32
    frozen = method.name not in ("full", "freeze")  # every other method leaves the base weights alone
    return load_dtype(model_info(config.model)["dtype"], torch.device("cuda"), frozen)


def _train_in_full(options: Any, names: list[str]) -> Any:
    """Options with `names` added to the method's list of fully trained modules, if it has one."""
    for field in ("modules_to_save", "modules"):
        if field in type(options).model_fields:
            keep = list(getattr(options, field) or [])
            return options.model_copy(update={field: keep + [n for n in names if n not in keep]})
    return options


def encode_all(examples: list, tokenizer, objective: Objective, config: TuneryConfig, content_hash: str):
    ds = Dataset(path="", format="", kind=objective.data_kind, examples=examples, content_hash=content_hash)
    settings = {
        "objective": objective.name,
        "max_length": config.hyperparameters.max_length,
        "train_on_prompt": config.data.train_on_prompt,
        "system_prompt": config.data.system_prompt,
    }
    feats = cached_encode(ds, tokenizer, lambda ex: objective.encode(ex, tokenizer, config), settings)
    # an example may encode to several features (pretraining splits long documents into chunks)
    return [x for f in feats if f is not None for x in (f if isinstance(f, list) else [f])]


def make_optimizer(model: torch.nn.Module, method: Method, opts: Any, lr: float, weight_decay: float):
    if method.param_groups is not None:
        groups = method.param_groups(model, opts, lr)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise TuneryError(f"Method {method.name!r} left no trainable parameters.")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)


def encode_data(
    config: TuneryConfig, objective: Objective, tokenizer, data: RunData, dist: Any, events: EventLog
) -> tuple[list, list, list[str] | None]:
    """Training and validation features, tokenized (through the cache) by rank 0 first, and each
    validation feature's task when the validation set holds several (else None)."""
    content_hash = "+".join(d.content_hash for d in data.datasets) + f"/{config.data.weights}/{config.seed}"
    with dist.main_first():  # one writer of the cache
        features = encode_all(data.examples, tokenizer, objective, config, content_hash)
        val_features, val_tasks = encode_validation(data, tokenizer, objective, config)
    if not features:
        raise TuneryError(
            "No example has anything to train on after encoding.",
            hint="Check that assistant messages are present and not all weight 0.",
        )
    truncated = sum(1 for f in features if f.get("truncated"))
    if truncated:
        max_length = config.hyperparameters.max_length
        events.emit(
            f"{truncated} of {len(features)} training examples were truncated to {max_length} tokens",
            level="warn",
            data={"truncated": truncated},
        )
    return features, val_features, val_tasks


def encode_validation(
    data: RunData, tokenizer, objective: Objective, config: TuneryConfig
) -> tuple[list, list[str] | None]:
    """The validation features; with several tasks, encoded task by task (an example may encode to
    several features or none) so that each feature keeps its task."""
    val = data.validation
    if not val:
        return [], None
    if not data.val_tasks:
        return encode_all(val.examples, tokenizer, objective, config, val.content_hash), None
    features: list = []
    tasks: list[str] = []
    for task in sorted(set(data.val_tasks)):
        group = [ex for ex, t in zip(val.examples, data.val_tasks, strict=True) if t == task]
        got = encode_all(group, tokenizer, objective, config, f"{val.content_hash}#task={task}")
        features += got
        tasks += [task] * len(got)
    return features, tasks


def plan_steps(
    config: TuneryConfig, objective: Objective, features: list, res: hparams.Resolved
) -> tuple[list[int], list[Step]]:
    """Each feature's length and the run's optimizer steps (train/batching.py)."""
    hp = config.hyperparameters
    lengths = [objective.length(f) for f in features]
    steps = schedule(
        lengths,
        batch_size=res.batch_size,
        n_epochs=res.n_epochs,
        seed=config.seed,
        token_budget=token_budget(hp),
        max_steps=hp.max_steps,
    )
    return lengths, steps


def token_budget(hp: Any) -> int:
    return max(hp.micro_batch_tokens, hp.max_length)


def report_parameters(model: torch.nn.Module, events: EventLog) -> None:
    trainable, total = count_parameters(model)
    events.emit(
        f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.3f}%)",
        # The allocator is recorded because it moves peak memory by ~25% (train/memory.py).
        data={"trainable_parameters": trainable, "total_parameters": total, "allocator": active_allocator()},
    )


def speedups(
    model: torch.nn.Module, config: TuneryConfig, method: Method, levers: Levers
) -> tuple[bool, bool, bool]:
    """(packed, fused, shared): packed rows with per-example attention (modeling/attention.py) where the
    method and architecture allow it, LoRA layers as one autograd node each (train/lora_kernel.py),
    and a prefix common to a packed micro-batch's rows computed once (modeling/prefix.py)."""
    hp = config.hyperparameters
    packed = hp.packing and method.supports_packing and use_packed_attention(unwrap(model), levers.attention)
    fused = fuse_lora_layers(model, levers.fused_lora) > 0 and levers.fused_lora  # exact: lora_kernel.py
    # On a GPU, auto attention is one varlen kernel call per layer, which a shared prefix would turn
    # back into one call per example (a host sync each): not measured there, so not shared there.
    per_segment = levers.attention in ("segments", "mask") or (
        levers.attention == "auto" and device_type() != "cuda"
    )
    exact = not has_token_averaged_loss(model)  # methods/base.py: MoE balancing losses
    return packed, fused, packed and levers.shared_prefix and per_segment and exact


def device_type() -> str:
    """Where this run trains: the GPU where there is one, else the CPU (the accelerator's choice)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_accelerator(hp: Any, dist: Any) -> tuple[Any, torch.dtype | None]:
    """accelerate's Accelerator for this run, and the autocast dtype (None: fp32)."""
    from accelerate import Accelerator

    cpu = device_type() == "cpu"
    dtype = autocast_dtype(hp.precision, torch.device("cpu" if cpu else "cuda"))
    enable_tf32()
    _reset_accelerate_state(dist)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision(dtype),  # fp16 brings accelerate's grad scaler
        **dist.accelerator_kwargs(hp.max_grad_norm),
    )
    return accelerator, dtype


def build_optimizer(
    model: torch.nn.Module,
    method: Method,
    method_opts: Any,
    res: hparams.Resolved,
    config: TuneryConfig,
    n_steps: int,
    accelerator: Any,
    dist: Any,
) -> tuple[torch.nn.Module, Any, Any]:
    """(model, optimizer, scheduler), placed by accelerate or sharded by the ranks."""
    hp = config.hyperparameters
    model = dist.shard(model, accelerator)  # FSDP shards before the optimizer sees the parameters
    optimizer = make_optimizer(model, method, method_opts, res.learning_rate, hp.weight_decay)
    warmup = int(hp.warmup_ratio * n_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.lr_scheduler, warmup, n_steps))
    model, optimizer = dist.prepare(model, optimizer)
    return model, optimizer, scheduler


def build_context(model: torch.nn.Module, config: TuneryConfig, objective: Objective, tokenizer) -> Context:
    setup_extra = objective.setup(model, config, tokenizer) if objective.setup else {}
    return Context(
        config=config,
        options=config.objective_options,
        tokenizer=tokenizer,
        reference=_reference(model),
        extra=setup_extra,
    )


def model_saver(
    model: torch.nn.Module,
    config: TuneryConfig,
    method: Method,
    objective: Objective,
    tokenizer,
    accelerator,
    dist,
) -> Callable[[Path], None]:
    """save(directory): the usable model (or adapter) with its tokenizer, gathered from the ranks."""

    def save_model(directory: Path) -> None:
        unwrapped = accelerator.unwrap_model(model)
        extra = objective.save_info(unwrapped, config) if objective.save_info else None
        save_trained(unwrapped, directory, config, method, objective, tokenizer, extra)

    return functools.partial(dist.save_model, save_fn=save_model)


def _reset_accelerate_state(dist: Any) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second run at another
    precision (a sweep, tests); each run starts from a fresh one. A launched rank keeps its
    PartialState: the process group it describes lives on."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=not dist.launched)


def resume(loop: LoopSetup, events: EventLog) -> LoopState:
    dist = loop.dist
    if dist.is_main:
        ckpt.clean_stale(loop.run_dir / "checkpoints")
    dist.barrier()
    found = ckpt.list_checkpoints(loop.run_dir / "checkpoints")
    state = LoopState()
    if not found:
        events.emit("No checkpoint to resume from; starting from the beginning", level="warn")
        return state
    meta = dist.restore(found[-1], loop.optimizer, loop.scheduler)
    state.step, state.trained_tokens = meta["step"], meta.get("trained_tokens", 0)
    events.truncate_after(state.step)
    events.emit(f"Resumed from checkpoint at step {state.step}", data={"step": state.step})
    return state


def _reference(model: torch.nn.Module):
    """The frozen reference is the base with the adapter disabled: no second copy in memory."""
    if hasattr(model, "disable_adapter"):
        return model.disable_adapter
    return contextlib.nullcontext


def classification_eval(config: TuneryConfig, tokenizer, val, tasks: list[str] | None = None):
    """The `compute_classification_metrics` hook (None when off): generated-label metrics on the
    validation set, per task too (`valid_accuracy/<task>`) when `tasks` names several."""
    # A classify head reports its own validation metrics; generated-label metrics apply to LMs only.
    if not (config.compute_classification_metrics and val) or config.objective == "classify":
        return None

    def run(model):
        return evaluation.classification_eval(
            model,
            tokenizer,
            val.examples,
            positive_class=config.classification_positive_class,
            betas=config.classification_betas,
            tasks=tasks,
        )

    return run


def save_trained(
    model: torch.nn.Module,
    directory: Path,
    config: TuneryConfig,
    method: Method,
    objective: Objective,
    tokenizer=None,
    extra: dict[str, Any] | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    method.save(model, directory)
    if tokenizer is not None:  # the chat template travels with the model (servers read it from here)
        tokenizer.save_pretrained(directory)
    info = {
        "base_model": config.model,
        "method": method.name,
        "objective": objective.name,
        "method_options": config.method_options.model_dump(mode="json"),
        **(extra or {}),
    }
    (directory / "tunery.json").write_text(json.dumps(info, indent=2))
