"""The one typed config. Defaults < YAML file < --set key=value < CLI flags.

Method options sit beside `method:` under the method's own name (`lora: {r: 8}`), and objective
options under the objective's name (`dpo: {beta: 0.1}`). Their schemas live with the method or
objective module, in the registries, which sit above this module: the config keeps the raw option
blocks, and whoever builds it with the registries at hand validates them, through pydantic's
validation context (`tunery.plugins.load_config`, the job spec, the sweep) or afterwards with
`bind_options` (the run, for a config built without them). This module imports no registry.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from tunery.errors import ConfigError

Auto = Literal["auto"]
# Finds the option schema of a method or objective by name (None: no such name); tunery.plugins
# passes the registries' lookup.
OptionSchema = Callable[[str], "type[BaseModel] | None"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = Field("auto", description="Passes over the training data; auto follows OpenAI.")
    batch_size: int | Auto = Field(
        "auto",
        description="Examples per optimizer step; auto = 0.2% of examples in [1, 256] (at least 8 on a CPU "
        "from 100 examples, see auto_rule).",
    )
    learning_rate_multiplier: float | Auto = Field(
        "auto", description="Scales the method's base learning rate; auto picks by batch size as OpenAI did."
    )
    learning_rate: float | None = Field(None, description="A raw learning rate; overrides the multiplier.")
    auto_rule: Literal["device", "openai"] = Field(
        "device",
        description="How `auto` picks batch size and multiplier: openai = OpenAI's rules everywhere; "
        "device = the same, but on a CPU from 100 examples at least batch 8, with the learning rate "
        "scaled linearly (batch 1 is slow on a CPU).",
    )
    max_length: int = Field(
        1024, description="Tokens per example; longer examples are truncated and counted."
    )
    micro_batch_tokens: int = Field(
        4096,
        description="Token budget of one forward pass; a step accumulates micro-batches up to batch_size.",
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(0.03, description="Fraction of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, description="Gradient clipping norm (0 disables).")
    max_steps: int | None = Field(None, description="Stop after this many optimizer steps.")
    packing: bool = Field(True, description="Pack examples into rows with attention isolated per example.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto = bf16 autocast on a GPU with bf16 (else fp16), and on a CPU only where bf16 is "
        "measured faster than fp32 (TUNERY_CPU_BF16=1|0 overrides); else fp32.",
    )
    logging_steps: int = Field(1, description="Log metrics every N optimizer steps.")
    eval_steps: int | None = Field(None, description="Also evaluate every N steps (always once per epoch).")
    save_steps: int | None = Field(None, description="Also checkpoint every N steps (always once per epoch).")
    save_total_limit: int = Field(3, description="Keep the last K checkpoints.")


# What a job sent over the API may ask for, whichever block a value comes in (OpenAI's
# `hyperparameters`, the method's, or `tunery.hyperparameters`). Past these a request only ties up a
# worker (a million epochs) or its memory (a billion-token context); `auto` and unset stay allowed.
REQUEST_RANGES: dict[str, tuple[float, float]] = {
    "n_epochs": (1, 50),
    "batch_size": (1, 256),
    "max_length": (1, 131_072),
    "micro_batch_tokens": (1, 1_048_576),
    "max_steps": (1, 1_000_000),
    "logging_steps": (1, 1_000_000),
    "eval_steps": (1, 1_000_000),
    "save_steps": (1, 1_000_000),
    "save_total_limit": (1, 100),
    "learning_rate_multiplier": (1e-6, 100.0),
    "learning_rate": (0.0, 1.0),
    "warmup_ratio": (0.0, 1.0),
    "weight_decay": (0.0, 10.0),
    "max_grad_norm": (0.0, 1e6),
}
_INTEGER = frozenset(
    ("n_epochs", "batch_size", "max_length", "micro_batch_tokens", "max_steps")
    + ("logging_steps", "eval_steps", "save_steps", "save_total_limit")
)


def check_request_hyperparameters(values: dict[str, Any], block: str) -> dict[str, Any]:
    """`values` checked against REQUEST_RANGES (names outside it are left to the config's own
    schema); a ConfigError naming `block.name` otherwise. Integral floats (1e3) become ints."""
    out = dict(values)
    for name, value in values.items():
        if name not in REQUEST_RANGES or value is None or value == "auto":
            continue
        lo, hi = REQUEST_RANGES[name]
        integer = name in _INTEGER
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if integer and number and float(value).is_integer():
            value = int(value)
        if not number or (integer and not isinstance(value, int)) or not lo <= value <= hi:
            kind = "an integer" if integer else "a number"
            raise ConfigError(
                f"Invalid {block}.{name} {values[name]!r}: expected {kind} in [{lo:g}, {hi:g}].",
                param=f"{block}.{name}",
                code="invalid_hyperparameters",
            )
        out[name] = value
    return out


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: str | list[str] | None = Field(None, description="Training file(s); a list mixes several tasks.")
    validation: str | list[str] | None = Field(
        None,
        description="Validation file, evaluated every epoch; a list: one file per task, scored per task.",
    )
    weights: list[float] | None = Field(None, description="Sampling weights when train lists several files.")
    train_on_prompt: bool = Field(
        False, description="Also train on prompt tokens, not only assistant replies."
    )
    system_prompt: str | None = Field(None, description="System message added to conversations without one.")


class FSDPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[2] = Field(2, description="FSDP2 (torch's fully_shard); FSDP1 is not offered.")
    reshard_after_forward: bool = Field(
        True, description="Free gathered parameters after each block's forward (less memory, more traffic)."
    )
    cpu_offload: bool = Field(False, description="Keep sharded parameters and optimizer state in CPU memory.")


class DeepSpeedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    zero_stage: Literal[2, 3] = Field(
        2, description="ZeRO stage: 2 shards optimizer state and gradients, 3 also weights."
    )
    offload_optimizer: bool = Field(False, description="Keep the optimizer state in CPU memory.")
    config_file: str | None = Field(None, description="A DeepSpeed JSON config; overrides the keys above.")


class DistributedConfig(BaseModel):
    """How several processes (`tunery train --nproc N`) train one model; ignored by one process."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp replicates the model; fsdp and deepspeed shard it across ranks."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto = nccl on CUDA, gloo on CPU.")
    find_unused_parameters: bool = Field(
        False, description="DDP: allow parameters that get no gradient in a step (slower)."
    )
    timeout_minutes: float = Field(
        60,
        gt=0,
        description="How long a rank waits in a collective while rank 0 works alone (tokenizing, "
        "saving, eval generation) before the run is failed; NCCL's own default is 10 minutes.",
    )
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)


class TuneryConfig(BaseModel):
    """A fine-tuning run. Extra top-level keys must name a method or objective (their options)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field("smollm2-135m", description="Alias, local HF directory, hub id or .gguf file.")
    data: DataConfig = Field(default_factory=DataConfig)
    method: str = Field("lora", description="Tuning method; see `tunery methods`.")
    objective: str = Field("sft", description="Training objective; see `tunery methods`.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    seed: int = Field(42, description="Seed for data order, initialisation and dropout.")
    output: str = Field("runs/latest", description="Run directory.")
    init_from: str | None = Field(
        None, description="Continue training this saved model or adapter dir (sequential fine-tuning)."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory.")
    compute_classification_metrics: bool = Field(
        False, description="Run classification metrics on the validation file every evaluation."
    )
    classification_positive_class: str | None = Field(None, description="Positive label for binary metrics.")
    classification_betas: list[float] | None = Field(None, description="F-beta scores to report (binary).")
    resume: bool = Field(False, description="Continue from the latest checkpoint in the run directory.")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="Multi-process training: strategy (ddp|fsdp|deepspeed), backend, fsdp.*, deepspeed.*.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that receive every metric and the resolved config.",
    )

    _option_schema: OptionSchema | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_extra(self, info: ValidationInfo) -> TuneryConfig:
        # Validated with {"option_schema": lookup} as context, the option blocks are checked in the
        # same pass, so their errors read like any other field's; without it they stay raw.
        lookup = (info.context or {}).get("option_schema")
        if lookup is not None:
            self.bind_options(lookup)
        return self

    def bind_options(self, option_schema: OptionSchema) -> None:
        """Validate the option blocks with the schemas `option_schema` finds, in place (raw dicts
        become the schemas' models), and keep the lookup for the defaults of absent blocks.
        A ValueError names the block (`lora.r`, not just `r`) or the unknown key."""
        extra = self.model_extra or {}
        for key, value in extra.items():
            schema = option_schema(key)
            if schema is None:
                raise ValueError(f"unknown config key {key!r}")
            if isinstance(value, dict):
                try:
                    extra[key] = schema.model_validate(value)
                except ValidationError as exc:
                    raise ValueError(
                        "; ".join(
                            f"{key}.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
                        )
                    ) from None
        self._option_schema = option_schema

    def options(self, name: str) -> BaseModel:
        """The validated options of a method or objective (defaults when absent)."""
        value = (self.model_extra or {}).get(name)
        if isinstance(value, BaseModel):
            return value
        if self._option_schema is None:
            raise ConfigError(
                f"The {name!r} options have not been validated.",
                hint="Build the config with tunery.plugins.load_config, or pass it through "
                "tunery.plugins.validate_options.",
            )
        schema = self._option_schema(name)
        if schema is None:
            raise ConfigError(f"{name!r} is not a method or objective")
        return schema.model_validate(value or {})

    @property
    def method_options(self) -> BaseModel:
        return self.options(self.method)

    @property
    def objective_options(self) -> BaseModel:
        return self.options(self.objective)

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json", exclude={"resume"})
        for key, value in (self.model_extra or {}).items():
            out[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return out


def _parse_scalar(text: str) -> Any:
    value = yaml.safe_load(text)
    return text if value is None and text not in ("null", "~", "") else value


def apply_set(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override to a nested dict (YAML scalar parsing)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = _parse_scalar(text)


def read_yaml_mapping(path: str | Path, what: str = "Config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is `{}`). Missing, unreadable, invalid
    or non-mapping files are ConfigErrors naming the file; `what` names the kind of file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, not a {type(raw).__name__}")
    return raw


def read_config(
    path: str | Path | None = None,
    sets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    option_schema: OptionSchema | None = None,
) -> TuneryConfig:
    """Build the config: YAML file, then `--set` assignments, then flag overrides (dotted keys).

    With `option_schema` the option blocks are validated too (tunery.plugins.load_config passes the
    registries'); without it they stay raw."""
    raw: dict[str, Any] = read_yaml_mapping(path) if path else {}
    for assignment in sets or []:
        apply_set(raw, assignment)
    for key, value in (overrides or {}).items():
        if value is not None:
            apply_set(raw, f"{key}={value}") if not isinstance(value, str) else _set_str(raw, key, value)
    try:
        context = {"option_schema": option_schema} if option_schema is not None else None
        return TuneryConfig.model_validate(raw, context=context)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError(
            "Invalid config:\n" + "\n".join(lines), hint="See `tunery train --help` and examples/*.yaml."
        ) from None


def _set_str(raw: dict[str, Any], key: str, value: str) -> None:
    # Flags such as --model take strings verbatim: a model named "1e3" stays a string.
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
