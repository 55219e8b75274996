"""Fuzz of the data validator: random and mutated JSONL (and the same bytes named .json / .csv) through
`validate_file`, `load_dataset` and `tunery data validate`. Whatever the bytes, the answer is a report or
a `TuneryError` that names the line at fault, never a traceback.

Bounded and reproducible: a fixed number of derandomized examples, no deadline (the machine is shared).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tunery.data import load_dataset, validate_file
from tunery.data.formats import KINDS
from tunery.data.validate import OPENAI_FORMATS
from tunery.errors import DataError, TuneryError
from tunery.objectives import OBJECTIVES, validation_kind

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# One valid record of every format the loader detects: mutations start from these.
VALID: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "weight": 1},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
        "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}],
    },
    {"prompt": "2+2?", "completion": "4"},
    {"instruction": "Add", "input": "2 2", "output": "4", "history": [["q", "a"]], "system": "s"},
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "system": "s"},
    {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad"}],
    },
    {"prompt": "q", "chosen": "good", "rejected": "bad"},
    {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
    },
    {"prompt": "q", "completion": "a", "label": True},
    {"text": "plain text"},
    {"text": "great film", "label": "positive"},
    {"text": "both", "labels": ["a", "b"]},
    {"prompt": [{"role": "user", "content": "solve"}], "answer": "42"},
]

_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(
        ["user", "assistant", "system", "tool", "function", "gpt", "human", "function_call", ""]
    )
)
json_values = st.recursive(
    _leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _slots(value: Any, out: list) -> list:
    """Every (container, key) inside `value`, the places a mutation can hit."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        out.append((value, key))
        _slots(child, out)
    return out


@st.composite
def mutated_record(draw) -> Any:
    rec = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(rec, [])
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["delete", "replace", "replace", "add", "wrap"]))
        if action == "delete":
            del container[key]
        elif action == "replace":
            container[key] = draw(json_values)
        elif action == "wrap":
            container[key] = [container[key]]
        elif isinstance(container, dict):
            container[draw(st.text(max_size=8))] = draw(json_values)
        else:
            container.append(draw(json_values))
    return rec


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def damaged_line(draw) -> bytes:
    """A valid line cut, spliced with random bytes or re-encoded."""
    raw = _dumps(draw(st.sampled_from(VALID)))
    cut = draw(st.integers(0, len(raw)))
    action = draw(st.sampled_from(["truncate", "insert", "latin1", "deep"]))
    if action == "truncate":
        return raw[:cut]
    if action == "insert":
        return raw[:cut] + draw(st.binary(min_size=1, max_size=4)) + raw[cut:]
    if action == "latin1":
        return raw[:cut] + b"caf\xe9" + raw[cut:]
    return b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"


lines = st.one_of(
    st.sampled_from(VALID).map(_dumps),
    mutated_record().map(_dumps),
    json_values.map(_dumps),
    damaged_line(),
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"NaN", b'{"text": NaN}', b'{"text": "\\ud800"}', b"[1, 2]"]),
)


@st.composite
def data_files(draw) -> bytes:
    body = b"\n".join(draw(st.lists(lines, min_size=1, max_size=8)))
    if draw(st.booleans()):
        body = body.replace(b"\n", b"\r\n")
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"PK\x03\x04"])) + body
    return body


# Problems of the whole file, which name no line: every other problem must.
FILE_LEVEL = {"empty_file", "binary_file", "invalid_encoding", "invalid_n_examples"}
# .json and .csv files can also be unreadable as a whole (a dict instead of a list, no header row).
WHOLE_FILE = FILE_LEVEL | {"data_type", "invalid_json", "invalid_csv"}


def _n_lines(data: bytes) -> int:
    return max(1, len(data.splitlines()))


def _check_located(line: int | None, code: str, suffix: str, data: bytes, text: str) -> None:
    assert text.strip(), f"empty message for {code}"
    if line is None:
        allowed = FILE_LEVEL if suffix == ".jsonl" else WHOLE_FILE
        assert code in allowed, f"{code} names no line: {text}"
    elif suffix != ".json":  # a .json file numbers the items of its list, not its lines
        assert 1 <= line <= _n_lines(data), f"line {line} out of range for {code}: {text}"
    assert "Traceback" not in text


def _write(tmp_path: Path, data: bytes, suffix: str) -> Path:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    return path


@FUZZ
@given(
    data=data_files(),
    method=st.sampled_from(sorted([*OPENAI_FORMATS, *OBJECTIVES.names()])),
    suffix=st.sampled_from([".jsonl", ".jsonl", ".jsonl", ".json", ".csv"]),
)
def test_validate_file_reports_every_problem_with_its_line(tmp_path, data, method, suffix):
    path = _write(tmp_path, data, suffix)
    note(f"{suffix} {method} {data!r}")
    report = validate_file(path, method=method, kind=validation_kind(method), min_examples=1)
    for issue in report.errors:
        _check_located(issue.line, issue.code, suffix, data, issue.message)
    if report.ok:
        return
    first = report.errors[0]
    api = report.openai_error()
    if first.line is not None:
        # The API's one-line answer, and the training error, both say where.
        assert re.search(rf"\b{first.line}\b", api["message"]), api["message"]
    try:
        report.raise_for_errors()
    except DataError as err:
        if first.line is not None:
            assert f"line {first.line}" in str(err), str(err)
    else:
        raise AssertionError("a report with errors did not raise")
    json.dumps(report.to_dict())  # the API returns it as JSON


@FUZZ
@given(data=data_files(), kind=st.sampled_from([None, *KINDS]))
def test_load_dataset_raises_only_located_data_errors(tmp_path, data, kind):
    path = _write(tmp_path, data, ".jsonl")
    note(f"{kind} {data!r}")
    try:
        dataset = load_dataset(path, kind)
    except DataError as err:
        _check_located(err.line, err.code, ".jsonl", data, str(err))
    else:
        assert all(isinstance(ex.line, int) for ex in dataset.examples)


@pytest.fixture(scope="module")
def tokenizer():
    from tests.helpers.tiny import tiny_tokenizer

    return tiny_tokenizer()


@settings(FUZZ, max_examples=100)
@given(
    records=st.lists(st.one_of(st.sampled_from(VALID), mutated_record()), min_size=1, max_size=6),
    method=st.sampled_from(sorted([*OPENAI_FORMATS, *OBJECTIVES.names()])),
    max_length=st.integers(1, 64),
)
def test_token_statistics_of_mutated_records(tmp_path, tokenizer, records, method, max_length):
    """With a tokenizer the validator also renders every example through the chat template and the
    encoders: a record that passed the format checks must not crash them."""
    data = b"\n".join(map(_dumps, records))
    path = _write(tmp_path, data, ".jsonl")
    note(f"{method} {data!r}")
    kind = validation_kind(method)
    report = validate_file(path, method, tokenizer, max_length, kind=kind, min_examples=1)
    for issue in report.errors:
        _check_located(issue.line, issue.code, ".jsonl", data, issue.message)
    json.dumps(report.to_dict())


@settings(FUZZ, max_examples=40)
@given(data=data_files(), method=st.sampled_from(["supervised", "dpo", "sft", "kto", "pretrain"]))
def test_cli_validate_never_shows_a_traceback(tmp_path, data, method):
    from tunery.cli import app

    path = _write(tmp_path, data, ".jsonl")
    note(f"{method} {data!r}")
    result = CliRunner().invoke(app, ["data", "validate", str(path), "--method", method])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (0, 1, 2), result.output
    assert "Traceback" not in result.output


def test_a_tunery_error_is_what_a_bad_method_gets(tmp_path):
    path = _write(tmp_path, _dumps(VALID[0]), ".jsonl")
    try:
        validate_file(path, method="no-such-method")
    except TuneryError as err:
        assert "no-such-method" in str(err)
    else:
        raise AssertionError("an unknown method was accepted")
