"""From an OpenAI job request to a job row, and from a job row to the `TuneryConfig` a worker trains.

OpenAI fields: `hyperparameters` {n_epochs, batch_size, learning_rate_multiplier} ("auto" allowed),
`method: {type: supervised|dpo, <type>: {hyperparameters: {...}}}` (dpo adds beta), suffix, seed,
metadata. Tunery extensions ride in extra body fields: `tunery: {method, objective, options: {name:
{...}}, hyperparameters: {...any Tunery hyperparameter...}, <name>: {...}}`, or top-level
`method_name` / `objective`. Any method or objective in the registries is accepted.
`tunery.resources: {num_cpus, num_gpus}` is what the job reserves on a Ray cluster (the ray executor).
Names in option blocks (teachers, judges, reward models, templates) are checked by the server's
resolver (`serve/resolver.py`); what they resolve to rides in the row's `tunery.resolved`, applied here.
"""

from __future__ import annotations

import copy
import re
import secrets
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tunery.config import REQUEST_RANGES, check_request_hyperparameters
from tunery.errors import TuneryError
from tunery.methods import METHODS
from tunery.objectives import OBJECTIVES, OPENAI_METHOD_TYPES
from tunery.plugins import option_schema, validate

# OpenAI's `reinforcement` type carries a `grader`, which the server does not turn into GRPO rewards
# yet: it is refused by name rather than trained without its grader (`tunery.objective: grpo` works).
_UNSERVED_TYPES = frozenset({"reinforcement"})
# The OpenAI method types the server accepts, and the objective each one trains with.
OBJECTIVE_FOR_TYPE = {t: o for t, o in OPENAI_METHOD_TYPES.items() if t not in _UNSERVED_TYPES}
OPENAI_HPARAMS = ("n_epochs", "batch_size", "learning_rate_multiplier")
_RANGES = REQUEST_RANGES  # one table for every block hyperparameters come in (config.py)
# OpenAI's legacy fine-tunes fields, spelled as the run config spells them (config.py).
CLASSIFICATION_FIELDS = (
    "compute_classification_metrics",
    "classification_positive_class",
    "classification_betas",
)
_EXT_FIELDS = ("method", "objective", "options", "hyperparameters", "resources", *CLASSIFICATION_FIELDS)


class InvalidRequest(TuneryError):
    code = "invalid_request_error"


def _check_hparam(name: str, value: Any, param: str) -> Any:
    if value == "auto" or value is None:
        return "auto"
    if name == "beta":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 2
        if not ok:
            raise InvalidRequest(
                f"Invalid beta {value!r}: expected 'auto' or a number in (0, 2].",
                param=param,
                code="invalid_hyperparameters",
            )
        return float(value)
    if name == "learning_rate_multiplier":
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise InvalidRequest(
                f"Invalid learning_rate_multiplier {value!r}: expected 'auto' or a number > 0.",
                param=param,
                code="invalid_hyperparameters",
            )
        return float(value)
    lo, hi = _RANGES[name]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidRequest(
            f"Invalid {name} {value!r}: expected 'auto' or an integer in [{lo}, {hi}].",
            param=param,
            code="invalid_hyperparameters",
        )
    return value


def parse_request(body: dict[str, Any]) -> dict[str, Any]:
    """Validate the training fields of a create request. Returns job-row fields: hyperparameters,
    method (OpenAI shape, echoed back), tunery (method, objective, options, extra hyperparameters)."""
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or not isinstance(method.get("type", "supervised"), str):
        raise InvalidRequest('method must be an object like {"type": "supervised"}.', param="method")
    mtype = method.get("type", "supervised")
    ext = body.get("tunery") or {}
    if not isinstance(ext, dict):
        raise InvalidRequest("tunery must be an object.", param="tunery")
    objective, tuning = _names(body, ext, mtype)
    hp, nested = _openai_hyperparameters(body, method, mtype)
    options = _options(ext)
    if mtype == "dpo" or "beta" in nested:
        beta = _check_hparam("beta", nested.get("beta", "auto"), "method.dpo.hyperparameters.beta")
        hp["beta"] = beta
        if beta != "auto":
            options.setdefault(objective, {})["beta"] = beta
    for name in options:
        if name not in (tuning, objective):
            raise InvalidRequest(
                f"Options for {name!r} given, but the job uses method {tuning!r} and "
                f"objective {objective!r}.",
                param=f"tunery.{name}",
            )
    extra_hp = ext.get("hyperparameters") or {}
    if not isinstance(extra_hp, dict):
        raise InvalidRequest("tunery.hyperparameters must be an object.", param="tunery.hyperparameters")
    extra_hp = check_request_hyperparameters(extra_hp, "tunery.hyperparameters")
    ext_out = {"method": tuning, "objective": objective, "options": options, "hyperparameters": extra_hp}
    if ext.get("resources") is not None:
        ext_out["resources"] = _resources(ext["resources"])
    # Top level, as OpenAI's legacy API took them, or under `tunery`; `tunery` wins.
    ext_out.update(_classification({**{k: body[k] for k in CLASSIFICATION_FIELDS if k in body}, **ext}))
    echo = {"type": mtype, mtype: {"hyperparameters": dict(hp)}} if mtype in OBJECTIVE_FOR_TYPE else method
    return {
        "hyperparameters": hp,
        "method": echo,
        "tunery": ext_out,
    }


def _names(body: dict[str, Any], ext: dict[str, Any], mtype: str) -> tuple[str, str]:
    """(objective, method) of a request: named under `tunery`, or the objective from OpenAI's type."""
    objective = ext.get("objective") or body.get("objective")
    if objective is None:
        if mtype not in OBJECTIVE_FOR_TYPE:
            raise InvalidRequest(
                f"Method type {mtype!r} is not supported; use supervised or dpo, or name a "
                "Tunery objective in `tunery.objective`.",
                param="method.type",
            )
        objective = OBJECTIVE_FOR_TYPE[mtype]
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise InvalidRequest(
            f"Unknown objective {objective!r}. Available: {', '.join(OBJECTIVES.names())}.",
            param="tunery.objective",
        )
    tuning = ext.get("method") or body.get("method_name") or "lora"
    if not isinstance(tuning, str) or tuning not in METHODS:
        raise InvalidRequest(
            f"Unknown method {tuning!r}. Available: {', '.join(METHODS.names())}.", param="tunery.method"
        )
    return objective, tuning


def _openai_hyperparameters(
    body: dict[str, Any], method: dict[str, Any], mtype: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(OpenAI's hyperparameters, checked; the nested block they came from). The new API nests them
    under the method type; the deprecated top-level field wins only where the nested one is silent."""
    sub = method.get(mtype) or {}
    nested = (sub.get("hyperparameters") if isinstance(sub, dict) else None) or {}
    top = body.get("hyperparameters") or {}
    if not isinstance(top, dict) or not isinstance(nested, dict):
        raise InvalidRequest("hyperparameters must be an object.", param="hyperparameters")
    hp: dict[str, Any] = {}
    for name in OPENAI_HPARAMS:
        value = nested.get(name, top.get(name, "auto"))
        hp[name] = _check_hparam(name, value, f"hyperparameters.{name}")
    unknown = (set(top) | set(nested)) - set(OPENAI_HPARAMS) - {"beta"}
    if unknown:
        raise InvalidRequest(
            f"Unknown hyperparameter(s): {', '.join(sorted(unknown))}.", param="hyperparameters"
        )
    return hp, nested


def _options(ext: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Option blocks: `tunery.options`, and any other object under `tunery` named like a block."""
    given = ext.get("options") or {}
    if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
        raise InvalidRequest(
            'tunery.options must be an object of option blocks, like {"lora": {"r": 8}}.',
            param="tunery.options",
        )
    options = {key: dict(value) for key, value in given.items()}
    for key, value in ext.items():
        if key not in _EXT_FIELDS and isinstance(value, dict):
            options[key] = dict(value)
    return options


def _classification(given: dict[str, Any]) -> dict[str, Any]:
    """The classification-metrics fields a request set, type-checked (so the error names the field)."""
    out = {k: given[k] for k in CLASSIFICATION_FIELDS if given.get(k) is not None}
    checks = {
        "compute_classification_metrics": (lambda v: isinstance(v, bool), "true or false"),
        "classification_positive_class": (lambda v: isinstance(v, str) and 0 < len(v) <= 256, "a label"),
        "classification_betas": (
            lambda v: (
                isinstance(v, list)
                and 0 < len(v) <= 16
                and all(isinstance(b, int | float) and not isinstance(b, bool) and b > 0 for b in v)
            ),
            "a list of up to 16 positive numbers",
        ),
    }
    for name, value in out.items():
        ok, expected = checks[name]
        if not ok(value):
            raise InvalidRequest(f"Invalid {name} {value!r}: expected {expected}.", param=name)
    return out


def _resources(value: Any) -> dict[str, float]:
    """What a job reserves where it runs (a Ray cluster); the server's flags fill in the rest."""
    if not isinstance(value, dict) or not set(value) <= {"num_cpus", "num_gpus"}:
        raise InvalidRequest(
            'tunery.resources must be an object like {"num_cpus": 2, "num_gpus": 1}.',
            param="tunery.resources",
        )
    for name, n in value.items():
        if not isinstance(n, int | float) or isinstance(n, bool) or n < 0:
            raise InvalidRequest(
                f"Invalid tunery.resources.{name} {n!r}: expected a number >= 0.",
                param=f"tunery.resources.{name}",
            )
    return {k: float(v) for k, v in value.items()}


def slug(text: str, default: str = "user") -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s[:40] or default


def base_display(spec: str) -> str:
    """The base part of an `ft:` name: an alias as is, a path or hub id by its last component."""
    name = spec.rstrip("/").split("/")[-1]
    return re.sub(r"[:\s]+", "-", name)[:120] or "model"


def model_name(base_spec: str, owner_name: str, suffix: str | None) -> str:
    """`ft:{base}:{owner}:{suffix}:{8-char id}`; an empty suffix leaves `::` as OpenAI does."""
    tail = "".join(
        secrets.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(8)
    )
    return f"ft:{base_display(base_spec)}:{slug(owner_name)}:{suffix or ''}:{tail}"


def build_config(job: Any, data_dir: str | Path, training_path: Path, validation_path: Path | None):
    """The run config of a job row (the worker calls this; so does job creation, to fail early)."""
    data_dir = Path(data_dir)
    ext = job.tunery or {}
    raw: dict[str, Any] = {
        "model": ext.get("base_spec") or job.model,
        "data": {
            "train": str(training_path),
            "validation": str(validation_path) if validation_path else None,
        },
        "method": ext.get("method", "lora"),
        "objective": ext.get("objective", "sft"),
        "seed": int(job.seed),
        "output": str(data_dir / job.run_dir),
        "resume": bool(job.resume),
    }
    if ext.get("adapter"):
        raw["init_from"] = str(data_dir / ext["adapter"])
    raw.update({k: ext[k] for k in CLASSIFICATION_FIELDS if k in ext})
    hp = {k: v for k, v in (job.hyperparameters or {}).items() if k in OPENAI_HPARAMS}
    hp.update(ext.get("hyperparameters") or {})
    raw["hyperparameters"] = hp
    for name, opts in (ext.get("options") or {}).items():
        raw[name] = copy.deepcopy(opts)  # the overlay below must not reach the options a job echoes
    _apply_resolved(raw, ext.get("resolved") or {}, data_dir)
    # Requests come from the network: reward code is never imported from a request, whatever it asks.
    for name in ("grpo", "rlaif"):
        if raw["objective"] == name or name in raw:
            value = raw.get(name)
            block = value if isinstance(value, dict) else {}
            raw[name] = {**block, "allow_custom_rewards": False}
    return _validate(raw)


def _apply_resolved(raw: dict[str, Any], resolved: dict[str, Any], data_dir: Path) -> None:
    """Put in what the server's resolver made of the names a request gave (serve/resolver.py):
    `{"distill.teacher_adapter": ["data", "jobs/ftjob-1/model"]}`. "data" values are relative to the
    data dir (they move with it), "spec" values are used as they are (an alias, an operator's path or
    a registered endpoint's URL and key variable)."""
    for dotted, (kind, value) in resolved.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = str(data_dir / value) if kind == "data" else value


def invalid_setting(exc: ValidationError, prefix: str) -> InvalidRequest:
    """A request's first schema error as the 400 a client reads: the setting's dotted name and why.
    Job creation and the estimate (serve/ui.py) both answer with it, so one bad value reads alike."""
    err = exc.errors()[0]
    loc = ".".join([prefix, *(str(x) for x in err["loc"])]).strip(".")
    param = loc if loc.startswith("hyperparameters") else f"tunery.{loc}"
    return InvalidRequest(f"Invalid setting {loc}: {err['msg']}", param=param, code="invalid_hyperparameters")


def _validate(raw: dict[str, Any]):
    # Option blocks first, so an error names its block (`tunery.lora.r`), not just the field.
    for name in (raw["method"], raw["objective"]):
        schema = option_schema(name)
        if schema is not None and isinstance(raw.get(name), dict):
            try:
                schema.model_validate(raw[name])
            except ValidationError as exc:
                raise invalid_setting(exc, name) from None
    try:
        return validate(raw)  # the option blocks through the registries, in the same pass
    except ValidationError as exc:
        raise invalid_setting(exc, "") from None
