"""Experiment trackers (`report_to: [tensorboard, mlflow, wandb]`) as subscribers of the run's events.

A tracker never reads the training loop's state: it sees the same events as events.jsonl. Metrics
events (`type == "metrics"`, `data` = the step row) become scalars at `data["step"]`; the resolved
config (the run's config.yaml, written before the first step) is logged once, at the first metrics
event, so trackers record `n_epochs: 3` rather than `auto`. Each backend is imported only when asked
for, and a missing package is a `ConfigError` before any model is loaded.

Tracking is never worth a training run: a tracker that cannot start (server unreachable, bad
credentials) or fails mid-run emits one warning event and is switched off; training goes on.

Where records go: TensorBoard `<run>/tensorboard/`; MLflow `$MLFLOW_TRACKING_URI`, else a SQLite
store `<run>/mlflow.db` with artifacts in `<run>/mlartifacts/`; W&B offline runs under `$WANDB_DIR`,
else `<run>/wandb/` (upload later with `wandb sync`; `WANDB_MODE=online` logs live).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tunery.config import TuneryConfig
from tunery.errors import ConfigError

Warn = Callable[[str], None]

# tracker -> (module, pip package) pairs it needs to start.
_PACKAGES = {
    "tensorboard": [("tensorboard", "tensorboard")],
    "mlflow": [("mlflow", "mlflow-skinny")],
    "wandb": [("wandb", "wandb")],
}
# MLflow's database stores (our default SQLite one included) run their schema migrations with alembic,
# which mlflow-skinny does not pull in.
_MLFLOW_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _print_warning(message: str) -> None:
    print(f"warning: {message}")


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

    def __init__(self, config: TuneryConfig, run_dir: Path, warn: Warn = _print_warning):
        self.config = config
        self.run_dir = Path(run_dir)
        self.warn = warn
        self.config_logged = False
        self.active = True

    def resolved_config(self) -> dict[str, Any]:
        path = self.run_dir / "config.yaml"
        if path.exists():
            try:
                return yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:  # half-written by a killed run: the unresolved config will do
                pass
        return self.config.to_dict()

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.active or event.get("type") != "metrics":
            return
        try:
            self._log_config_once()
            row = event.get("data") or {}
            metrics = numeric_metrics(row)
            if metrics and "step" in row:
                self.log_metrics(int(row["step"]), metrics)
        except Exception as exc:  # noqa: BLE001 - any backend failure: warn once, keep training
            self._stop(exc)

    def _log_config_once(self) -> None:
        if not self.config_logged:
            self.config_logged = True  # once, even if the backend rejects it
            self.log_config(self.resolved_config())

    def _stop(self, exc: Exception) -> None:
        self.active = False
        self.warn(
            f"report_to: the {self.name} tracker failed ({_short(exc)}) and is switched off; "
            "training continues, the run's own files (metrics.jsonl, events.jsonl) are complete."
        )

    def close(self, status: str = "succeeded") -> None:
        """End the backend's run with the training run's status (succeeded, failed or interrupted)."""
        if self.active:
            try:  # a run that failed before its first step still records its config
                self._log_config_once()
            except Exception as exc:  # noqa: BLE001
                self._stop(exc)
        self.finish(status)

    def log_config(self, config: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def finish(self, status: str) -> None:
        raise NotImplementedError


def _short(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception, cut: backends raise whole paragraphs."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, config: TuneryConfig, run_dir: Path, warn: Warn = _print_warning):
        super().__init__(config, run_dir, warn)
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

    def finish(self, status: str) -> None:
        self.writer.flush()
        self.writer.close()


def mlflow_tracking_uri(run_dir: Path) -> str:
    """`$MLFLOW_TRACKING_URI`, else a SQLite store in the run directory (no server to run)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a server that is down: MLflow's own client retries for minutes first."""
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:  # any HTTP answer, even 401 or 404, means something is listening
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout)
    except httpx.TransportError as exc:
        raise ConnectionError(f"MLflow server {uri} is unreachable: {exc}") from exc


def _artifact_location(uri: str) -> str | None:
    """Beside a SQLite store, as `mlflow server` does; MLflow itself would pick `./mlruns` in the
    current directory. Other stores (servers, databases) keep their own default."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()


class MLflowTracker(Tracker):
    """An explicit `MlflowClient`, not the `mlflow.*` fluent API: no process-wide active run or
    tracking URI, so several runs in one process (sweeps, the jobs server) never mix."""

    name = "mlflow"
    _STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

    def __init__(self, config: TuneryConfig, run_dir: Path, warn: Warn = _print_warning):
        super().__init__(config, run_dir, warn)
        from mlflow.tracking import MlflowClient

        self.uri = mlflow_tracking_uri(self.run_dir)
        _check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunery")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = _artifact_location(self.uri)
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        self.run_id = self.client.create_run(
            experiment_id, run_name=self.run_dir.name, tags={"tunery.run_dir": str(self.run_dir.resolve())}
        ).info.run_id

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters and a batch at 100 params.
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self, status: str) -> None:
        if not self.active:  # it failed mid-run: a server that went away would cost minutes of retries
            _check_reachable(self.uri)
        self.client.set_terminated(self.run_id, status=self._STATUS.get(status, "FAILED"))


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, config: TuneryConfig, run_dir: Path, warn: Warn = _print_warning):
        super().__init__(config, run_dir, warn)
        import wandb

        # Offline unless WANDB_MODE says otherwise: Tunery is self-hosted and sends nothing out on its
        # own. WANDB_DIR, WANDB_PROJECT and WANDB_ENTITY are honoured; the defaults keep it in the run.
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tunery"),
            name=self.run_dir.name,
            dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            # Independent run objects: sweeps and the jobs server start one run after another.
            reinit="create_new",
            # The host process's stdout stays its own (progress bar, server logs).
            settings=wandb.Settings(console="off"),
        )

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "succeeded" else 1)


TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}


def _needed(name: str) -> list[tuple[str, str]]:
    needed = list(_PACKAGES[name])
    scheme = (os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:").split(":", 1)[0].split("+")[0]
    if name == "mlflow" and scheme in _MLFLOW_DB_SCHEMES:
        needed.append(("alembic", "alembic"))
    return needed


def check_installed(names: list[str]) -> None:
    """Raise a ConfigError naming the package to install for each tracker that cannot run."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}", param="report_to")
        missing = [pkg for module, pkg in _needed(name) if importlib.util.find_spec(module) is None]
        if missing:
            raise ConfigError(
                f"report_to: {name} needs {', '.join(f'`{p}`' for p in missing)}, which is not installed.",
                hint=f"pip install {' '.join(missing)}   (or pip install 'tunery[track]' for all trackers)",
                param="report_to",
            )


def make_trackers(config: TuneryConfig, run_dir: Path, warn: Warn = _print_warning) -> list[Tracker]:
    """The trackers `config.report_to` asks for, ready to subscribe to the run's EventLog.

    A missing package is the user's to fix before training (ConfigError); a backend that fails to
    start is warned about through `warn` and left out.
    """
    names = list(dict.fromkeys(config.report_to or []))
    if not names:
        return []
    check_installed(names)
    trackers = []
    for name in names:
        try:
            trackers.append(TRACKERS[name](config, Path(run_dir), warn))
        except Exception as exc:  # noqa: BLE001 - unreachable server, bad credentials, broken install
            warn(
                f"report_to: the {name} tracker could not start ({_short(exc)}); "
                "training continues without it."
            )
    return trackers


def close_all(trackers: list[Tracker], status: str = "succeeded") -> None:
    """Close every tracker; one failing to flush must not hide the run's own result."""
    for tracker in trackers:
        try:
            tracker.close(status)
        except Exception as exc:  # noqa: BLE001 - reporting, not control flow
            tracker.warn(f"report_to: closing the {tracker.name} tracker failed ({_short(exc)}).")
