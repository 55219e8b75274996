"""Build everything the loop needs from a validated config: model, method, features, schedule."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any

import torch

from tunery.config import TuneryConfig
from tunery.errors import ConfigError, TuneryError
from tunery.methods import Method, count_parameters
from tunery.models.placement import enable_tf32, load_dtype
from tunery.models.unwrap import unwrap
from tunery.objectives.base import Context, Objective
from tunery.train import checkpoint as ckpt
from tunery.train import hparams
from tunery.train.batching import schedule
from tunery.train.events import EventLog
from tunery.train.loop import LoopSetup, LoopState, lr_lambda, train_loop
from tunery.train.memory import active_allocator
from tunery.train.precision import autocast_dtype, mixed_precision


def build_model(config: TuneryConfig, method: Method, method_opts: Any, objective: Objective):
    from tunery.models import load_model, load_tokenizer

    kwargs = method.load_kwargs(method_opts) if method.load_kwargs else {}
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    if objective.load_model is not None:  # e.g. classify: a sequence-classification model
        model = objective.load_model(config, kwargs)
    else:
        model = load_model(
            config.model,
            dtype=_base_dtype(config, method),
            trust_remote_code=config.trust_remote_code,
            **kwargs,
        )
    if objective.prepare_model is not None:
        model = objective.prepare_model(model, config)
    if objective.method_options is not None:  # e.g. the reward head trains in full under LoRA
        method_opts = objective.method_options(method.name, method_opts)
    if objective.head_modules is not None:  # a new head trains in full under any method
        method_opts = _train_in_full(method_opts, objective.head_modules(model))
    if config.init_from:  # sequential fine-tuning: continue an existing adapter or model
        from tunery.methods import continue_training

        model = continue_training(model, config.init_from, method)
    else:
        model = method.apply(model, method_opts)
    return model, tokenizer


def _base_dtype(config: TuneryConfig, method: Method) -> torch.dtype:
    """fp32, except a frozen bf16 base trained on a GPU with bf16 autocast: that one stays in bf16
    (2 bytes a parameter instead of 4; see models/placement.py)."""
    if not torch.cuda.is_available() or config.hyperparameters.precision not in ("auto", "bf16"):
        return torch.float32
    from tunery.models import model_info

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
    from tunery.data import cached_encode
    from tunery.data.types import Dataset

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


def train(
    config: TuneryConfig,
    out: Path,
    events: EventLog,
    method: Method,
    objective: Objective,
    method_opts: Any,
    objective_opts: Any,
    datasets: list,
    examples: list,
    val,
) -> Any:
    from tunery.train import distributed

    # A process launched as one of several ranks joins the group first (see train/distributed.py).
    dist = distributed.start(config) if distributed.launched() else None
    args = (config, out, events, method, objective, method_opts, objective_opts, datasets, examples, val)
    try:
        return _train(*args, dist)
    finally:
        if dist is not None:
            dist.close()


def _train(
    config, out, events, method, objective, method_opts, objective_opts, datasets, examples, val, dist
):
    from accelerate import Accelerator

    from tunery.train.attention import use_packed_attention
    from tunery.train.lora_kernel import fuse_lora_layers
    from tunery.train.run import RunResult, finish, seed_everything, write_config

    main = dist is None or dist.is_main
    seed_everything(config.seed)  # the same seed everywhere: every rank builds the same initial model
    hp = config.hyperparameters
    model, tokenizer = build_model(config, method, method_opts, objective)
    if dist is not None:
        dist.check_objective(objective)
    content_hash = "+".join(d.content_hash for d in datasets) + f"/{config.data.weights}/{config.seed}"
    with contextlib.nullcontext() if dist is None else dist.main_first():  # one writer of the cache
        features = encode_all(examples, tokenizer, objective, config, content_hash)
        val_features = encode_all(val.examples, tokenizer, objective, config, val.content_hash) if val else []
    if not features:
        raise TuneryError(
            "No example has anything to train on after encoding.",
            hint="Check that assistant messages are present and not all weight 0.",
        )
    truncated = sum(1 for f in features if f.get("truncated"))
    if truncated:
        events.emit(
            f"{truncated} of {len(features)} training examples were truncated to {hp.max_length} tokens",
            level="warn",
            data={"truncated": truncated},
        )

    res = hparams.resolve(hp, len(features), method.base_learning_rate)
    lengths = [objective.length(f) for f in features]
    steps = schedule(
        lengths,
        batch_size=res.batch_size,
        n_epochs=res.n_epochs,
        seed=config.seed,
        token_budget=max(hp.micro_batch_tokens, hp.max_length),
        max_steps=hp.max_steps,
    )
    if main:
        write_config(config, out, res.as_dict())
    trainable, total = count_parameters(model)
    events.emit(
        f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.3f}%)",
        # The allocator is recorded because it moves peak memory by ~25% (train/memory.py).
        data={"trainable_parameters": trainable, "total_parameters": total, "allocator": active_allocator()},
    )

    packed = hp.packing and method.supports_packing and use_packed_attention(unwrap(model))
    fused = fuse_lora_layers(model) > 0  # one autograd node per LoRA layer, exact (train/lora_kernel.py)
    cpu = not torch.cuda.is_available()
    dtype = autocast_dtype(hp.precision, torch.device("cpu" if cpu else "cuda"))
    enable_tf32()
    _reset_accelerate_state(dist)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision(dtype),  # fp16 brings accelerate's grad scaler
        **(dist.accelerator_kwargs(hp.max_grad_norm) if dist is not None else {}),
    )
    if dist is not None:  # FSDP shards before the optimizer sees the parameters
        model = dist.shard(model, accelerator)
        dist.lengths, dist.token_budget = lengths, max(hp.micro_batch_tokens, hp.max_length)
    optimizer = make_optimizer(model, method, method_opts, res.learning_rate, hp.weight_decay)
    warmup = int(hp.warmup_ratio * len(steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.lr_scheduler, warmup, len(steps)))
    if dist is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        optimizer = dist.prepare(optimizer)

    setup_extra = objective.setup(model, config, tokenizer) if objective.setup else {}
    ctx = Context(
        config=config,
        options=objective_opts,
        tokenizer=tokenizer,
        reference=_reference(model),
        extra=setup_extra,
    )

    def save_model(directory: Path) -> None:
        unwrapped = accelerator.unwrap_model(model)
        extra = objective.save_info(unwrapped, config) if objective.save_info else None
        save_trained(unwrapped, directory, config, method, objective, tokenizer, extra)

    save = save_model if dist is None else functools.partial(dist.save_model, save_fn=save_model)
    loop = LoopSetup(
        model=model,
        objective=objective,
        ctx=ctx,
        features=features,
        val_features=val_features,
        steps=steps,
        optimizer=optimizer,
        scheduler=scheduler,
        accelerator=accelerator,
        events=events,
        run_dir=out,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        packed=packed,
        max_grad_norm=hp.max_grad_norm,
        logging_steps=hp.logging_steps,
        eval_steps=hp.eval_steps,
        save_steps=hp.save_steps,
        save_total_limit=hp.save_total_limit,
        save_model=save,
        aux_loss=method.aux_loss,
        after_step=method.after_step,
        method_metrics=method.metrics,
        extra_eval=_classification_eval(config, tokenizer, val),
        dist=dist,
        shape_buckets=cpu and dtype == torch.bfloat16,
    )
    state = LoopState()
    if config.resume:
        state = resume(loop, events)
    else:
        # What actually runs, not what was asked for: a silent fallback (no packing, no fusion, another
        # precision) would otherwise pass for the requested setting in tests and benchmarks.
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        levers = {"packed": packed, "fused": fused, "precision": precision, "buckets": loop.shape_buckets}
        events.emit("Fine-tuning job started", data={"total_steps": len(steps), **res.as_dict(), **levers})
    state = train_loop(loop, state)
    if state.interrupted:
        events.emit(f"Training interrupted at step {state.step}; resume with --resume", level="warn")
        if main:
            finish(out, None)
        return RunResult(out, None, "interrupted", state.trained_tokens, state.last_metrics)
    model_dir = out / "model"
    save(model_dir)
    events.emit(f"New fine-tuned model created: {model_dir}", data={"kind": "model", "path": "model"})
    if main:
        finish(out, model_dir)
    events.emit("The job has successfully completed", data={"trained_tokens": state.trained_tokens})
    return RunResult(out, model_dir, "succeeded", state.trained_tokens, state.last_metrics)


def _reset_accelerate_state(dist: Any) -> None:
    """accelerate keeps one AcceleratorState per process and refuses a second run at another
    precision (a sweep, tests); each run starts from a fresh one. A launched rank keeps its
    PartialState: the process group it describes lives on."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=dist is None)


def resume(loop: LoopSetup, events: EventLog) -> LoopState:
    dist = loop.dist
    if dist is None or dist.is_main:
        ckpt.clean_stale(loop.run_dir / "checkpoints")
    if dist is not None:
        dist.barrier()
    found = ckpt.list_checkpoints(loop.run_dir / "checkpoints")
    state = LoopState()
    if not found:
        events.emit("No checkpoint to resume from; starting from the beginning", level="warn")
        return state
    if dist is not None:
        meta = dist.restore(found[-1], loop.optimizer, loop.scheduler)
    elif not (found[-1] / "trainable.safetensors").exists():
        raise ConfigError(
            f"{found[-1]} holds sharded state from a multi-process run.",
            hint="Resume it with the same --nproc and distributed.strategy.",
        )
    else:
        model = loop.accelerator.unwrap_model(loop.model)
        meta = ckpt.restore(found[-1], model, loop.optimizer, loop.scheduler)
    state.step, state.trained_tokens = meta["step"], meta.get("trained_tokens", 0)
    events.truncate_after(state.step)
    events.emit(f"Resumed from checkpoint at step {state.step}", data={"step": state.step})
    return state


def _reference(model: torch.nn.Module):
    """The frozen reference is the base with the adapter disabled: no second copy in memory."""
    import contextlib

    if hasattr(model, "disable_adapter"):
        return model.disable_adapter
    return contextlib.nullcontext


def _classification_eval(config: TuneryConfig, tokenizer, val):
    # A classify head reports its own validation metrics; generated-label metrics apply to LMs only.
    if not (config.compute_classification_metrics and val) or config.objective == "classify":
        return None

    def run(model):
        from tunery.evaluate.run import classification_eval

        return classification_eval(
            model,
            tokenizer,
            val.examples,
            positive_class=config.classification_positive_class,
            betas=config.classification_betas,
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
