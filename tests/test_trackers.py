"""`report_to` trackers on real tiny trainings, read back through each tool's own reader.

One training logs to all three (imports, W&B's service and MLflow's SQLite schema are the slow
part, not the logging); a second one checks that trackers that cannot start only warn.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def _train(tmp_path, tiny_llama, report_to: str, *extra: str):
    from tests.helpers.tiny import write_chat_jsonl
    from tunery.plugins import load_config
    from tunery.train import run

    data = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    cfg = load_config(
        sets=[
            f"model={tiny_llama}",
            f"data.train={data}",
            f"output={tmp_path / 'run'}",
            "hyperparameters.n_epochs=2",
            "hyperparameters.batch_size=4",
            "hyperparameters.precision=fp32",
            f"report_to={report_to}",
            *extra,
        ]
    )
    return run(cfg)


def _reset_wandb() -> None:
    """W&B reads its environment once per process (a singleton); the next test sets other values."""
    import wandb

    wandb.teardown()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_llama):
    """A run with report_to [tensorboard, mlflow, wandb]: MLflow into its default SQLite store in
    the run dir, W&B offline into WANDB_DIR, all under tmp."""
    tmp = tmp_path_factory.mktemp("tracked")
    env = {
        "MLFLOW_EXPERIMENT_NAME": "tunery-test",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp / "wandb-dir"),
        # W&B keeps settings and caches under the home directory otherwise.
        "WANDB_CONFIG_DIR": str(tmp / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp / "wandb-data"),
    }
    (tmp / "wandb-dir").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        result = _train(tmp, tiny_llama, "[tensorboard,mlflow,wandb]")
        _reset_wandb()
    from tunery.train.events import read_jsonl

    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    config = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    return {"tmp": tmp, "env": env, "result": result, "rows": rows, "config": config, "model": tiny_llama}


def _metric_keys(rows):
    from tunery.train.trackers import numeric_metrics

    return set().union(*(numeric_metrics(r) for r in rows))


def test_tensorboard_records_every_metric_and_config(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, rows = tracked["result"], tracked["rows"]
    acc = EventAccumulator(str(result.output_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "learning_rate", "train_mean_token_accuracy"} <= tags
    for key in _metric_keys(rows):
        logged = {e.step: e.value for e in acc.Scalars(key)}
        assert logged == pytest.approx({r["step"]: r[key] for r in rows if key in r}), key
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "n_epochs: 2" in config_text and "batch_size: 4" in config_text
    assert str(tracked["model"]) in config_text


def test_mlflow_records_every_metric_per_step_and_the_resolved_config(tracked, tmp_path):
    from mlflow.tracking import MlflowClient

    from tunery.train.trackers import flatten

    result, rows = tracked["result"], tracked["rows"]
    assert result.status == "succeeded" and len(rows) == 6
    client = MlflowClient(tracking_uri=f"sqlite:///{result.output_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tunery-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    keys = _metric_keys(rows)
    assert {"train_loss", "learning_rate", "train_mean_token_accuracy", "epoch"} <= keys
    for key in keys:
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx({r["step"]: float(r[key]) for r in rows if key in r}), key
    # Params are the resolved config, flattened: `auto` already replaced by the values used.
    assert run.data.params == {k: str(v) for k, v in flatten(tracked["config"]).items()}
    assert run.data.params["hyperparameters.n_epochs"] == "2"
    assert run.data.params["hyperparameters.learning_rate"] != "auto"
    # The config as YAML too, stored beside the database (MLflow's default is ./mlruns in the cwd).
    assert run.info.artifact_uri.startswith((result.output_dir / "mlartifacts").resolve().as_uri())
    local = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(open(local)) == tracked["config"]


def test_wandb_offline_run_holds_history_config_and_exit(tracked):
    tmp, rows = tracked["tmp"], tracked["rows"]
    (wandb_file,) = (tmp / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb")
    assert not (tracked["result"].output_dir / "wandb").exists()  # WANDB_DIR is honoured
    # W&B's own reader of the transaction log (0.31 dropped the Python datastore module).
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **tracked["env"]},
        check=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == [r["step"] for r in rows]
    for row in rows:
        for key in _metric_keys([row]):
            assert history[row["step"]][key] == pytest.approx(float(row[key])), (row["step"], key)
    config = {}
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
    for key, value in tracked["config"].items():
        assert config[key] == value, key
    assert config["hyperparameters"]["n_epochs"] == 2
    (exit_record,) = [r for r in records if r["type"] == "exit"]
    assert exit_record["exit"].get("exit_code", 0) == 0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trackers_that_cannot_start_warn_and_training_continues(tmp_path, tiny_llama, monkeypatch):
    from tunery.train.events import read_jsonl

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # nothing listens there
    # W&B online with no API key; its server address kept on loopback so nothing leaves the machine.
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    _reset_wandb()
    result = _train(tmp_path, tiny_llama, "[mlflow,wandb]", "hyperparameters.max_steps=2")
    _reset_wandb()
    assert result.status == "succeeded" and (result.model_dir / "adapter_model.safetensors").exists()
    assert len(read_jsonl(result.output_dir / "metrics.jsonl")) == 2
    events = read_jsonl(result.output_dir / "events.jsonl")
    warnings = [e["message"] for e in events if e["level"] == "warn" and "report_to" in e["message"]]
    assert len(warnings) == 2, warnings
    mlflow_warning, wandb_warning = warnings
    assert "mlflow tracker could not start" in mlflow_warning and uri in mlflow_warning
    assert "wandb tracker could not start" in wandb_warning and "API key" in wandb_warning
    assert all("training continues" in w for w in warnings)


def test_a_tracker_failing_mid_run_warns_once_and_still_closes_its_run(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tunery.plugins import load_config
    from tunery.train.trackers import MLflowTracker, close_all

    # The store the module's training made (already migrated); a metric name MLflow refuses
    # (a comma) stands in for any backend error mid-run.
    uri = f"sqlite:///{tracked['result'].output_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tracked["tmp"] / "second"
    run_dir.mkdir()
    warnings: list[str] = []
    config = load_config(sets=["data.train=train.jsonl", f"output={run_dir}", "report_to=[mlflow]"])
    tracker = MLflowTracker(config, run_dir, warnings.append)
    rows = [{"train_loss": 3.0}, {"train_loss": 2.0, "bad,name": 1.0}, {"train_loss": 1.0}]
    for step, row in enumerate(rows, 1):
        tracker({"type": "metrics", "data": {"step": step, "total_steps": 3, **row}})
    close_all([tracker], "succeeded")
    assert len(warnings) == 1 and "mlflow tracker failed" in warnings[0] and "bad,name" in warnings[0]
    client = MlflowClient(tracking_uri=uri)
    assert {m.step: m.value for m in client.get_metric_history(tracker.run_id, "train_loss")} == {1: 3.0}
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
