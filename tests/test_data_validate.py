"""`validate_file` and `tunery data validate`: OpenAI's checks, codes, messages and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunery.cli.data import data_app
from tunery.data import validate_file
from tunery.data.validate import MAX_KEPT_ISSUES
from tunery.objectives import validation_kind


def chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "You answer."},
            {"role": "user", "content": f"What is {i}?"},
            {"role": "assistant", "content": f"It is {i}."},
        ]
    }


def pref(i: int) -> dict:
    return {
        "input": {"messages": [{"role": "user", "content": f"Say {i}"}]},
        "preferred_output": [{"role": "assistant", "content": f"{i}"}],
        "non_preferred_output": [{"role": "assistant", "content": "no"}],
    }


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def codes(report) -> list[str]:
    return [e.code for e in report.errors]


def test_valid_file(tmp_path):
    report = validate_file(write(tmp_path / "ok.jsonl", [chat(i) for i in range(12)]))
    assert report.ok and report.n == 12 and report.errors == [] and report.openai_error() is None
    assert report.format == "chat" and report.stats["duplicates"] == 0
    assert report.to_dict()["ok"] is True
    report.raise_for_errors()  # no error: returns


def test_too_few_examples(tmp_path):
    report = validate_file(write(tmp_path / "few.jsonl", [chat(i) for i in range(7)]))
    assert not report.ok and codes(report) == ["invalid_n_examples"]
    assert report.openai_error() == {
        "code": "invalid_n_examples",
        "param": "training_file",
        "message": "Training file has 7 example(s), but must have at least 10 examples",
    }


@pytest.mark.parametrize(
    ("broken", "code", "field", "openai"),
    [
        (
            {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
            "message_missing_key",
            "messages[0].role",
            "Invalid file format. Example 3, message 1 Discriminator 'role' is missing in value",
        ),
        (
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "unrecognized_role",
            "messages[0].role",
            "Example 3, message 1 Input tag 'robot' found using 'role'",
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
            "missing_content",
            "messages[0].content",
            "Example 3, message 1",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "example_missing_assistant_message",
            "messages",
            "Example 3 is missing an assistant message",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi", "mood": "x"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "message_unrecognized_key",
            "messages[0].mood",
            "Extra inputs are not permitted",
        ),
        ({"messages": "hello"}, "missing_messages_list", "messages", "Example 3"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "x", "weight": 2},
                ]
            },
            "invalid_weight",
            "messages[1].weight",
            "Example 3, message 2",
        ),
        ("{not json", "invalid_json", None, "Invalid file format. Example 3"),
        ("[1, 2, 3]", "data_type", None, "Invalid file format. Example 3"),
    ],
)
def test_example_errors_are_located(tmp_path, broken, code, field, openai):
    rows = [chat(i) for i in range(12)]
    rows[2] = broken
    report = validate_file(write(tmp_path / "bad.jsonl", rows))
    assert not report.ok and codes(report) == [code]
    err = report.errors[0]
    assert (err.line, err.field) == (3, field)
    first = report.openai_error()
    assert first["code"] == "invalid_training_file" and openai in first["message"]
    assert first["message"].startswith("Invalid file format.")


def test_openai_example_message_exactly(tmp_path):
    rows = [chat(i) for i in range(120)]
    rows[99]["messages"][1] = {"content": "no role"}
    report = validate_file(write(tmp_path / "x.jsonl", rows))
    assert report.openai_error()["message"] == (
        "Invalid file format. Example 100, message 2 Discriminator 'role' is missing in value"
    )


@pytest.mark.parametrize(
    ("rows", "method", "expected"),
    [
        (
            [pref(i) for i in range(10)],
            "supervised",
            "Unexpected file format, expected either prompt/completion pairs or chat messages.",
        ),
        ([chat(i) for i in range(10)], "dpo", "expected input/preferred_output/non_preferred_output"),
        ([{"text": f"t{i}"} for i in range(10)], "supervised", "Unexpected file format"),
    ],
)
def test_format_must_match_method(tmp_path, rows, method, expected):
    report = validate_file(write(tmp_path / "m.jsonl", rows), method=method)
    assert not report.ok and codes(report) == ["format_mismatch"]
    assert expected in report.openai_error()["message"]
    assert report.n_errors == 1  # one complaint for the file, not one per line


def test_tunery_objective_names_allow_conversions(tmp_path):
    path = write(tmp_path / "p.jsonl", [pref(i) for i in range(10)])
    report = validate_file(path, method="sft", kind=validation_kind("sft"))
    assert report.ok and [w.code for w in report.warnings] == ["converted"]
    assert (
        validate_file(path, method="dpo").ok
        and validate_file(path, method="kto", kind=validation_kind("kto")).ok
    )
    chats = write(tmp_path / "c.jsonl", [chat(i) for i in range(10)])
    assert validate_file(chats, method="pretrain", kind=validation_kind("pretrain")).ok


def test_file_level_errors_are_reported(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\xff" * 100)
    for name, code in (
        ("empty.jsonl", "empty_file"),
        ("bin.jsonl", "binary_file"),
        ("missing.jsonl", "file_not_found"),
    ):
        report = validate_file(tmp_path / name)
        assert not report.ok and codes(report) == [code]
        assert report.openai_error()["code"] == "invalid_training_file"


def test_errors_are_capped_but_counted(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}]} for _ in range(MAX_KEPT_ISSUES + 30)]
    report = validate_file(write(tmp_path / "many.jsonl", rows))
    assert report.n_errors == MAX_KEPT_ISSUES + 30 and len(report.errors) == MAX_KEPT_ISSUES


def test_duplicates_and_token_stats(tmp_path):
    from tests.helpers.tiny import tiny_tokenizer

    rows = [chat(i) for i in range(10)] + [chat(3), chat(4)]
    rows[5] = {"messages": rows[5]["messages"][:2] + [{"role": "assistant", "content": "long " * 200}]}
    tok = tiny_tokenizer()
    report = validate_file(write(tmp_path / "d.jsonl", rows), tokenizer=tok, max_length=100)
    assert report.ok and report.stats["duplicates"] == 2
    tokens = report.stats["tokens"]
    assert tokens["min"] <= tokens["p50"] <= tokens["p95"] <= tokens["max"] and tokens["max"] > 200
    assert report.stats["truncated"] == 1 and report.stats["max_length"] == 100
    warn = {w.code: w for w in report.warnings}
    assert warn["examples_truncated"].line == 6 and warn["duplicate_examples"].line == 11
    assert "line 11 repeats line 4" in warn["duplicate_examples"].message


def test_raise_for_errors_gives_a_data_error(tmp_path):
    from tunery.errors import DataError

    report = validate_file(write(tmp_path / "few.jsonl", [chat(1)]))
    with pytest.raises(DataError) as exc:
        report.raise_for_errors()
    assert exc.value.code == "invalid_n_examples" and "at least 10" in str(exc.value)


# --- CLI -----------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_exit_codes(tmp_path):
    good = write(tmp_path / "good.jsonl", [chat(i) for i in range(10)])
    result = runner.invoke(data_app, ["validate", str(good)])
    assert result.exit_code == 0 and "OK" in result.output
    bad_rows = [chat(i) for i in range(10)]
    bad_rows[4] = {"messages": [{"role": "user", "content": "hi"}]}
    bad = write(tmp_path / "bad.jsonl", bad_rows)
    result = runner.invoke(data_app, ["validate", str(bad)])
    assert result.exit_code == 1 and "example_missing_assistant_message" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(data_app, ["validate", str(good), "--method", "dpo"])
    assert result.exit_code == 1 and "format_mismatch" in result.output
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x01" * 50)
    result = runner.invoke(data_app, ["validate", str(tmp_path / "bin.jsonl")])
    assert result.exit_code == 1 and "binary" in result.output
    result = runner.invoke(data_app, ["validate", str(good), "--method", "nonsense"])
    assert result.exit_code == 2 and "Unknown method" in result.output and "Traceback" not in result.output


def test_cli_with_model_counts_tokens_and_prints_json(tmp_path):
    from tests.helpers.tiny import tiny_tokenizer

    # A model directory without weights (config written by hand: building a transformers config
    # imports torch): `--model` must load only the tokenizer.
    model_dir = tmp_path / "tiny"
    tiny_tokenizer().save_pretrained(model_dir)
    (model_dir / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    rows = [chat(i) for i in range(10)]
    rows[2]["messages"][2]["content"] = "word " * 300
    path = write(tmp_path / "c.jsonl", rows)
    result = runner.invoke(
        data_app, ["validate", str(path), "--model", str(model_dir), "--max-length", "64", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] and data["stats"]["truncated"] == 1 and data["stats"]["tokens"]["max"] > 300
