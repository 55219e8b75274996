"""The CLI: config precedence, examples, methods listing, clean errors for user mistakes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunery.cli import app
from tunery.errors import ConfigError
from tunery.plugins import load_config

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config(path)
    assert cfg.method and cfg.objective
    cfg.method_options  # noqa: B018 - validates the method's option block
    cfg.objective_options  # noqa: B018


def test_precedence_yaml_then_set_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": "a", "seed": 1, "hyperparameters": {"n_epochs": 2}}))
    cfg = load_config(
        cfg_file, ["seed=3", "hyperparameters.n_epochs=1", "objective=dpo", "model=b"], {"model": "c"}
    )
    assert (cfg.model, cfg.seed, cfg.hyperparameters.n_epochs, cfg.objective) == ("c", 3, 1, "dpo")


def test_config_and_sweep_files_share_one_yaml_reader(tmp_path):
    from tunery.workflows.sweep import load_spec

    cases = {
        "list.yaml": ("- a\n- b\n", "top level must be a mapping of keys, not a list"),
        "bad.yaml": ("model: [unclosed\n", "not valid YAML"),
        "latin1.yaml": (b"model: caf\xe9\n", "cannot be read"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        for load in (load_config, load_spec):
            with pytest.raises(ConfigError, match=message) as err:
                load(path)
            assert str(path) in err.value.message
    with pytest.raises(ConfigError, match="Config file not found"):
        load_config(tmp_path / "none.yaml")
    with pytest.raises(ConfigError, match="Sweep file not found"):
        load_spec(tmp_path / "none.yaml")
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"base": "list.yaml", "eval_data": "t.jsonl"}))
    with pytest.raises(ConfigError, match="list.yaml: the top level must be a mapping"):
        load_spec(spec)


def test_method_options_sit_beside_the_method():
    cfg = load_config(sets=["method=lora", "lora.r=8", "lora.dora=true"])
    assert cfg.method_options.r == 8 and cfg.method_options.dora is True
    with pytest.raises(ConfigError, match="lora.nope"):
        load_config(sets=["lora.nope=1"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(sets=["bogus.x=1"])


def test_methods_lists_every_method_and_objective():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("full", "lora", "qlora", "sft", "dpo", "grpo"):
        assert name in result.output


def test_train_refuses_bad_data_before_loading_a_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad.write_text((json.dumps(row) + "\n") * 3)
    result = runner.invoke(
        app, ["train", "--model", "does-not-exist", "--data", str(bad), "--output", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert "must have at least 10 examples" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["status"] == "failed" and run_json["error"]["code"] == "invalid_n_examples"


def test_unknown_model_lists_aliases(tmp_path):
    from tests.helpers.tiny import write_chat_jsonl

    data = write_chat_jsonl(tmp_path / "t.jsonl", 12)
    result = runner.invoke(
        app, ["train", "--model", "no-such-model-xyz", "--data", str(data), "--output", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert "smollm2-135m" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02\xff\xfe" * 100, "caf\xe9\n".encode("latin-1")])
def test_train_never_tracebacks_on_garbage(tmp_path, content):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    proc = subprocess.run(
        [sys.executable, "-m", "tunery.cli", "train", "--data", str(bad), "--output", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "bad.jsonl" in proc.stderr
