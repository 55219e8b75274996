"""The model card (`README.md`) every export carries: where the model came from and how it did.

Provenance is read from the run directory the saved model sits in (`run/model/` or
`run/checkpoints/step-N/model/`): `config.yaml` names the data files (hashed here, so a reader can
check which data trained the model), the method, objective and the resolved hyperparameters;
`metrics.jsonl` holds the last training and validation losses; `eval.json` (from `tunery eval`)
the evaluation results, when one was written into the run directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_EVAL_KEYS = (
    "n",
    "exact_match",
    "accuracy",
    "macro_f1",
    "weighted_f1",
    "loss",
    "perplexity",
    "chrf",
    "rouge_l",
)


@dataclass
class Provenance:
    """What the card says about a model's origin; every field may be unknown."""

    base_model: str
    license: str | None = None
    method: str | None = None
    objective: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data_files: list[dict[str, Any]] = field(default_factory=list)
    train_metrics: dict[str, Any] | None = None
    valid_metrics: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    eval_file: Path | None = None


def find_run_dir(model_dir: Path) -> Path | None:
    """The run directory holding `model_dir`: the nearest ancestor (up to 3 up) with a config.yaml."""
    for parent in [model_dir, *list(model_dir.resolve().parents)[:3]]:
        if (parent / "config.yaml").is_file():
            return parent
    return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_entry(role: str, spec: str, run_dir: Path) -> dict[str, Any]:
    # Paths in config.yaml are as the user gave them: relative to where training ran, which is
    # usually the run directory's parent's parent (`runs/x`) or the current directory.
    raw = Path(spec).expanduser()
    candidates = [raw] if raw.is_absolute() else [raw, run_dir.parent / raw, run_dir.parent.parent / raw]
    for cand in candidates:
        if cand.is_file():
            return {"role": role, "path": spec, "sha256": sha256_file(cand), "bytes": cand.stat().st_size}
    return {"role": role, "path": spec, "sha256": None, "bytes": None}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a killed process
    return rows


def _eval_file(run_dir: Path, model_dir: Path | None) -> Path | None:
    for cand in (
        *([model_dir / "eval.json"] if model_dir else []),
        run_dir / "eval.json",
        run_dir / "eval" / "eval.json",
    ):
        if cand.is_file():
            return cand
    return None


def collect(
    base_model: str, model_dir: Path | None, info: dict[str, Any] | None, license: str | None
) -> Provenance:
    """Gather the card's facts from the saved model's tunery.json and its run directory."""
    prov = Provenance(base_model=base_model, license=license)
    if info:
        prov.method, prov.objective = info.get("method"), info.get("objective")
        prov.method_options = dict(info.get("method_options") or {})
    run_dir = find_run_dir(model_dir) if model_dir else None
    if run_dir is None:
        return prov
    prov.run_dir = run_dir
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    prov.method = prov.method or config.get("method")
    prov.objective = prov.objective or config.get("objective")
    if not prov.method_options and isinstance(config.get(prov.method or ""), dict):
        prov.method_options = config[prov.method]
    prov.hyperparameters = dict(config.get("hyperparameters") or {})
    data = config.get("data") or {}
    train = data.get("train")
    for spec in [train] if isinstance(train, str) else list(train or []):
        prov.data_files.append(_data_entry("train", spec, run_dir))
    val = data.get("validation")
    for spec in [val] if isinstance(val, str) else list(val or []):  # one file, or one per task
        prov.data_files.append(_data_entry("validation", spec, run_dir))
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    prov.train_metrics = rows[-1] if rows else None
    valid = [r for r in rows if r.get("valid_loss") is not None]
    prov.valid_metrics = valid[-1] if valid else None
    prov.eval_file = _eval_file(run_dir, model_dir)
    if prov.eval_file:
        try:
            prov.evaluation = json.loads(prov.eval_file.read_text())
        except (OSError, ValueError):
            prov.evaluation = None
    return prov


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    out = ["| key | value |", "|---|---|"]
    out.extend(f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None)
    return out


def render(prov: Provenance, fmt: str, details: list[str], title: str) -> str:
    """README.md text: YAML front matter (read by the hub and by `tunery.models.resolve`) + body."""
    front: dict[str, Any] = {
        "license": (prov.license or "unknown").lower(),
        "base_model": prov.base_model,
        "tags": ["tunery", *([prov.method] if prov.method else []), fmt],
    }
    if fmt == "adapter":
        front["library_name"] = "peft"
    elif fmt == "hf":
        front["library_name"] = "transformers"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", ""]
    lines += [
        f"- **Base model:** `{prov.base_model}` (license: {prov.license or 'unknown; check the base'})",
        f"- **Method:** {prov.method or 'none (the base model, converted)'}",
        f"- **Objective:** {prov.objective or 'n/a'}",
        f"- **Export format:** {fmt}",
    ]
    if prov.run_dir:
        lines.append(f"- **Run directory:** `{prov.run_dir}`")
    lines += ["", *details]
    if prov.method_options:
        lines += ["", "## Method options", "", *_table(sorted(prov.method_options.items()))]
    if prov.hyperparameters:
        lines += ["", "## Hyperparameters", "", *_table(list(prov.hyperparameters.items()))]
    if prov.data_files:
        lines += ["", "## Training data", "", "| role | file | sha256 | bytes |", "|---|---|---|---|"]
        for d in prov.data_files:
            digest = f"`{d['sha256']}`" if d["sha256"] else "not found at export time"
            lines.append(f"| {d['role']} | `{d['path']}` | {digest} | {d['bytes'] or ''} |")
    lines += ["", "## Evaluation", ""]
    lines += _evaluation(prov)
    lines += [
        "",
        "## License",
        "",
        f"This model is a derivative of `{prov.base_model}` and is subject to its license "
        f"({prov.license or 'unknown'}). Check that your use of the training data is permitted too.",
        "",
    ]
    return "\n".join(lines)


def _evaluation(prov: Provenance) -> list[str]:
    out: list[str] = []
    if prov.train_metrics:
        m = prov.train_metrics
        out += [
            f"Final training step {m.get('step')}/{m.get('total_steps')}: "
            f"loss {_fmt(m.get('train_loss'))}, token accuracy {_fmt(m.get('train_mean_token_accuracy'))}."
        ]
    if prov.valid_metrics:
        v = prov.valid_metrics
        out += [
            f"Last validation (step {v.get('step')}): loss {_fmt(v.get('valid_loss'))}, "
            f"token accuracy {_fmt(v.get('valid_mean_token_accuracy'))}."
        ]
    if prov.evaluation:
        out += ["", f"`tunery eval` results ({prov.eval_file.name if prov.eval_file else 'eval.json'}):", ""]
        out += _table([(k, prov.evaluation.get(k)) for k in _EVAL_KEYS])
    if not out:
        out = ["No evaluation results were found with this model."]
    return out
