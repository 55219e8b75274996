"""Experiment trackers (`report_to: [tensorboard, mlflow, wandb]`) as subscribers of the run's events.

A tracker never reads the training loop's state: it sees the same events as events.jsonl. Metrics
events (`type == "metrics"`, `data` = the step row) become scalars at `data["step"]`; the resolved
config (the run's config.yaml, written before the first step) is logged once, at the first metrics
event, so trackers record `n_epochs: 3` rather than `auto`. Each backend is imported only when asked
for, and a missing package is a `ConfigError` before any model is loaded.

Where files go: TensorBoard `<run>/tensorboard/`, MLflow a file store at `<run>/mlruns/`, W&B offline
runs under `<run>/wandb/` (sync later with `wandb sync`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml

from tunery.config import TuneryConfig
from tunery.errors import ConfigError

_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists become strings (trackers take scalars only)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    name = prefix[:-1]
    out[name] = obj if isinstance(obj, int | float | str | bool) or obj is None else str(obj)
    return out


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row, minus the step counters (they are the x axis, not a metric)."""
    skip = {"step", "total_steps"}
    return {
        k: float(v)
        for k, v in row.items()
        if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    """Base: turns events into `log_config` / `log_metrics` calls of a backend."""

    name = "tracker"

    def __init__(self, config: TuneryConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)
        self.config_logged = False
        self.failed = False

    def resolved_config(self) -> dict[str, Any]:
        path = self.run_dir / "config.yaml"
        if path.exists():
            try:
                return yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:  # half-written by a killed run: the unresolved config will do
                pass
        return self.config.to_dict()

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("level") == "error":
            self.failed = True
        if event.get("type") != "metrics":
            return
        if not self.config_logged:
            self.log_config(self.resolved_config())
            self.config_logged = True
        row = event.get("data") or {}
        metrics = numeric_metrics(row)
        if metrics and "step" in row:
            self.log_metrics(int(row["step"]), metrics)

    def close(self) -> None:
        if not self.config_logged:  # a run that failed before its first step still records its config
            self.log_config(self.resolved_config())
            self.config_logged = True
        self.finish()

    def log_config(self, config: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, config: TuneryConfig, run_dir: Path):
        super().__init__(config, run_dir)
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = self.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_config(self, config: dict[str, Any]) -> None:
        # Markdown code block: TensorBoard's text plugin renders it verbatim.
        text = "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```"
        self.writer.add_text("config", text, global_step=0)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def finish(self) -> None:
        self.writer.flush()
        self.writer.close()


class MLflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, config: TuneryConfig, run_dir: Path):
        super().__init__(config, run_dir)
        import mlflow

        self.mlflow = mlflow
        # A file store inside the run dir: no server to run, `mlflow ui --backend-store-uri` reads it.
        mlflow.set_tracking_uri((self.run_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment("tunery")
        self.run = mlflow.start_run(run_name=self.run_dir.name)

    def log_config(self, config: dict[str, Any]) -> None:
        # MLflow params are limited to 6000 characters each; config values are far shorter.
        self.mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config).items()})
        self.mlflow.log_dict(config, "config.yaml")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self) -> None:
        self.mlflow.end_run(status="FAILED" if self.failed else "FINISHED")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, config: TuneryConfig, run_dir: Path):
        super().__init__(config, run_dir)
        import wandb

        self.wandb = wandb
        # Offline always: Tunery is self-hosted and never sends data out on its own.
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tunery"),
            name=self.run_dir.name,
            dir=str(self.run_dir),
            mode="offline",
            reinit=True,
        )

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(flatten(config), allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish(exit_code=1 if self.failed else 0)


TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}


def check_installed(names: list[str]) -> None:
    """Raise a ConfigError naming the package to install for each tracker that cannot run."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}", param="report_to")
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(
                f"report_to: {name} needs the `{_PACKAGES[name]}` package, which is not installed.",
                hint=f"pip install {_PACKAGES[name]}"
                + ("   (or pip install 'tunery[tracking]')" if name == "tensorboard" else ""),
                param="report_to",
            )


def make_trackers(config: TuneryConfig, run_dir: Path) -> list[Tracker]:
    """The trackers `config.report_to` asks for, ready to subscribe to the run's EventLog."""
    names = list(dict.fromkeys(config.report_to or []))
    if not names:
        return []
    check_installed(names)
    return [TRACKERS[name](config, Path(run_dir)) for name in names]


def close_all(trackers: list[Tracker]) -> None:
    """Close every tracker; one failing to flush must not hide the run's own result."""
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as exc:  # noqa: BLE001 - reporting, not control flow
            print(f"warning: closing the {tracker.name} tracker failed: {exc}")
