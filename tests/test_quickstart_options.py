"""`tunery quickstart --model M --task T`: the quickstart runs any base model on any bundled task.

On a tiny random model the accuracies mean nothing; what is checked is that the chosen model and task
are the ones evaluated and trained (the test split's size, the labels the replies are held to, the run's
model), and that unknown tasks and `--head` off sentiment are refused with a message."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from tests.helpers.tiny import make_tiny_model_dir
from tunery.cli import app

ROUTING = {"billing", "technical", "shipping", "account", "sales"}


@pytest.fixture(scope="module")
def tiny_long(tmp_path_factory):
    """The tiny tokenizer spells words out, so a routing prompt with a shot needs more than 512 positions."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-long"), "llama", max_position_embeddings=4096)


def _quickstart(tmp_path, *args):
    return CliRunner().invoke(app, ["quickstart", "--output", str(tmp_path / "qs"), *args])


def test_quickstart_runs_the_routing_task_on_the_model_given(tmp_path, tiny_long):
    res = _quickstart(
        tmp_path,
        "--model",
        str(tiny_long),
        "--task",
        "routing",
        "--max-train",
        "10",
        "--max-test",
        "5",
        "--epochs",
        "1",
        "--shots",
        "1",
    )
    assert res.exit_code == 0, res.output
    # What the user sees (issue 20 §6): Tunery's training bar with its ETA, tokens/s and RSS, and none
    # of transformers' own bars (the model loads and the LoRA wraps go through tunery/quiet.py).
    assert re.search(r"training .*\d+/\d+ \d+:\d\d:\d\d loss .* tok/s  RSS ", res.output), res.output
    assert "it/s]" not in res.output and "Loading weights" not in res.output, res.output
    summary = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert summary["task"] == "routing" and summary["model"] == str(tiny_long)
    assert summary["n_test"] == 5
    refs = {ex["reference"] for ex in summary["examples"]}
    assert refs and refs <= ROUTING, refs
    assert [r["label"] for r in summary["rows"]] == [
        f"{tiny_long} zero-shot",
        f"{tiny_long} 1-shot",
        "LoRA fine-tuned",
    ]
    config = yaml.safe_load((tmp_path / "qs" / "run" / "config.yaml").read_text())
    assert config["model"] == str(tiny_long)
    train_rows = [json.loads(r) for r in (tmp_path / "qs" / "train.jsonl").read_text().splitlines()]
    assert len(train_rows) == 10 and {r["messages"][-1]["content"] for r in train_rows} <= ROUTING


def test_quickstart_refuses_unknown_tasks_and_heads_off_sentiment(tmp_path):
    res = _quickstart(tmp_path, "--task", "poetry")
    assert res.exit_code != 0 and "Unknown quickstart task 'poetry'" in res.output
    assert "sentiment, routing" in res.output
    res = _quickstart(tmp_path, "--task", "routing", "--head")
    assert res.exit_code != 0 and "--head trains on the sentiment task only" in res.output
