"""Readers and format conversion: every supported file type and format, and every file-level mistake."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tunery.data import load_dataset
from tunery.data.readers import MAX_LINE_BYTES, read_records
from tunery.data.types import Conversation, Labeled, PreferencePair, Text, Unpaired
from tunery.errors import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


# --- formats -------------------------------------------------------------------------------------


def test_openai_chat_with_weights_tools_and_legacy_function_call(tmp_path):
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo", "weight": 0},
                {"role": "user", "content": "again"},
                {"role": "assistant", "content": "hello", "weight": 1},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "4"},
                {"role": "assistant", "content": "4"},
            ],
            "tools": tools,
        },
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": None, "function_call": {"name": "add", "arguments": "{}"}},
                {"role": "function", "name": "add", "content": "4"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "fo"}, {"type": "text", "text": "ur"}],
                },
            ]
        },
    ]
    ds = load_dataset(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert (ds.format, ds.kind, len(ds)) == ("chat", "chat", 3)
    first, second, third = ds.examples
    assert [m.get("weight") for m in first.messages] == [None, 0, None, 1]
    assert second.tools == tools and second.messages[1]["tool_calls"][0]["function"]["name"] == "add"
    assert second.messages[2]["tool_call_id"] == "c1"
    # legacy: function_call becomes a tool call, role function becomes role tool
    assert third.messages[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": "{}"}
    assert third.messages[2] == {"role": "tool", "content": "4", "name": "add"}
    assert third.messages[3]["content"] == "four"
    assert [c.line for c in ds.examples] == [1, 2, 3]


def test_prompt_completion(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4"}]))
    assert ds.format == "prompt_completion"
    assert ds.examples[0].messages == [
        {"role": "user", "content": "2+2="},
        {"role": "assistant", "content": " 4"},
    ]
    as_text = load_dataset(tmp_path / "pc.jsonl", "text")
    assert as_text.examples[0] == Text("2+2= 4", 1)


def test_alpaca_with_system_and_history(tmp_path):
    row = {
        "instruction": "Translate",
        "input": "chat",
        "output": "cat",
        "system": "You translate.",
        "history": [["Translate: chien", "dog"]],
    }
    conv = load_dataset(write_jsonl(tmp_path / "a.jsonl", [row, {"instruction": "Say hi", "output": "hi"}]))
    assert conv.format == "alpaca"
    assert conv.examples[0].messages == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate: chien"},
        {"role": "assistant", "content": "dog"},
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    assert conv.examples[1].messages[0] == {"role": "user", "content": "Say hi"}


def test_sharegpt(tmp_path):
    row = {
        "system": "sys",
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "bye"},
            {"from": "gpt", "value": "ciao"},
        ],
    }
    ds = load_dataset(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert ds.format == "sharegpt"
    assert [(m["role"], m["content"]) for m in ds.examples[0].messages] == [
        ("system", "sys"),
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "bye"),
        ("assistant", "ciao"),
    ]


def test_plain_text_and_labeled(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": "The end.", "label": "story"}])
    ds = load_dataset(tmp_path / "t.jsonl")
    assert ds.kind == "text" and ds.examples == [Text("Once upon a time.", 1), Text("The end.", 2)]
    write_jsonl(
        tmp_path / "l.jsonl", [{"text": "great", "label": "positive"}, {"text": "meh", "labels": ["a", 2]}]
    )
    labeled = load_dataset(tmp_path / "l.jsonl", "labeled")
    assert labeled.examples == [Labeled("great", ["positive"], 1), Labeled("meh", ["a", "2"], 2)]
    assert load_dataset(tmp_path / "l.jsonl").kind == "text"  # text alone is plain text


def test_openai_dpo_and_chosen_rejected(tmp_path):
    dpo = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    ds = load_dataset(write_jsonl(tmp_path / "dpo.jsonl", [dpo]), "preference")
    assert ds.format == "openai_dpo"
    assert ds.examples[0] == PreferencePair(
        [{"role": "user", "content": "Hi"}],
        [{"role": "assistant", "content": "Hello!"}],
        [{"role": "assistant", "content": "Go away."}],
        1,
    )
    strings = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    implicit = {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}],
    }
    ds2 = load_dataset(write_jsonl(tmp_path / "cr.jsonl", [strings, implicit]))
    assert ds2.kind == "preference" and ds2.format == "chosen_rejected"
    assert ds2.examples[0].prompt == ds2.examples[1].prompt == [{"role": "user", "content": "Hi"}]
    assert ds2.examples[1].chosen == [{"role": "assistant", "content": "Hello!"}]
    assert ds2.examples[1].rejected == [{"role": "assistant", "content": "Go away."}]


def test_kto_unpaired_and_preference_unpairing(tmp_path):
    rows = [
        {"prompt": "Hi", "completion": "Hello!", "label": True},
        {"prompt": "Hi", "completion": "Go away.", "label": False},
    ]
    ds = load_dataset(write_jsonl(tmp_path / "kto.jsonl", rows))
    assert ds.kind == "unpaired" and [u.desirable for u in ds.examples] == [True, False]
    assert ds.examples[0].completion == [{"role": "assistant", "content": "Hello!"}]
    pairs = load_dataset(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b"}]), "unpaired"
    )
    assert pairs.examples == [
        Unpaired([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "a"}], True, 1),
        Unpaired([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "b"}], False, 1),
    ]


def test_conversions_between_kinds(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "good", "rejected": "bad"}])
    as_chat = load_dataset(tmp_path / "p.jsonl", "chat")
    assert as_chat.examples[0].messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "good"},
    ]
    write_jsonl(tmp_path / "c.jsonl", [CHAT | {"answer": "Paris"}])
    text = load_dataset(tmp_path / "c.jsonl", "text").examples[0].text
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    prompt = load_dataset(tmp_path / "c.jsonl", "prompt").examples[0]
    assert isinstance(prompt, Conversation) and prompt.messages[-1]["role"] == "user"
    assert prompt.extra == {"answer": "Paris", "completion": "Paris."}


@pytest.mark.parametrize(
    ("rows", "kind", "expected"),
    [
        (
            [CHAT],
            "preference",
            "expected input/preferred_output/non_preferred_output or prompt/chosen/rejected",
        ),
        (
            [{"text": "hello"}],
            "chat",
            "Unexpected file format, expected either prompt/completion pairs or chat messages.",
        ),
        (
            [{"foo": 1}],
            "chat",
            "Unexpected file format, expected either prompt/completion pairs or chat messages.",
        ),
        ([{"text": "hello"}], "labeled", 'expected {"text", "label"}'),
    ],
)
def test_wrong_kind_is_refused_in_openai_words(tmp_path, rows, kind, expected):
    with pytest.raises(DataError) as exc:
        load_dataset(write_jsonl(tmp_path / "x.jsonl", rows), kind)
    assert expected in str(exc.value) and "x.jsonl, line 1" in str(exc.value)


def test_content_hash_is_sha256_of_the_file(tmp_path):
    import hashlib

    path = write_jsonl(tmp_path / "c.jsonl", [CHAT])
    assert load_dataset(path).content_hash == hashlib.sha256(path.read_bytes()).hexdigest()


# --- file types ----------------------------------------------------------------------------------


def test_json_list_and_data_wrapper(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([CHAT, CHAT]))
    (tmp_path / "b.json").write_text(json.dumps({"data": [CHAT]}))
    assert len(load_dataset(tmp_path / "a.json")) == 2
    assert load_dataset(tmp_path / "b.json").examples[0].line == 1
    (tmp_path / "c.json").write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT) + "\n")  # JSONL named .json
    assert len(load_dataset(tmp_path / "c.json")) == 2
    (tmp_path / "d.json").write_text('{"messages": 1}')
    with pytest.raises(DataError, match='list of examples or {"data"'):
        load_dataset(tmp_path / "d.json")


def test_csv_with_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Add", "1, 2", "3"])
        w.writerow(["Say hi", "", "hi"])
    ds = load_dataset(path)
    assert ds.format == "alpaca" and [c.line for c in ds.examples] == [1, 2]
    assert ds.examples[0].messages[0]["content"] == "Add\n\n1, 2"
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["messages"])
        w.writerow([json.dumps(CHAT["messages"])])
    assert load_dataset(tmp_path / "m.csv").examples[0].messages == CHAT["messages"]


def test_parquet_and_datasets_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ds = load_dataset(tmp_path / "d.parquet")
    assert ds.format == "prompt_completion" and len(ds) == 3 and ds.examples[2].line == 3
    datasets.Dataset.from_list([CHAT, CHAT]).save_to_disk(str(tmp_path / "saved"))
    saved = load_dataset(tmp_path / "saved")
    assert saved.format == "chat" and saved.examples[1].messages == CHAT["messages"]
    assert len(saved.content_hash) == 64
    datasets.DatasetDict({"train": datasets.Dataset.from_list([CHAT])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_dataset(tmp_path / "dd")) == 1


# --- file-level mistakes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "code", "fragment"),
    [
        ("empty.jsonl", b"", "empty_file", "empty"),
        ("blank.jsonl", b"\n  \n\n", "empty_file", "empty"),
        ("bin.jsonl", b"\x00\x01\x02\x03binary\x00", "binary_file", "binary"),
        ("zip.jsonl", b"PK\x03\x04rest", "binary_file", "binary"),
        ("utf16.jsonl", '{"text": "hé"}\n'.encode("utf-16"), "invalid_encoding", "UTF-16"),
        ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "invalid_encoding", "UTF-8"),
        ("notjson.jsonl", b'{"text": "ok"}\n{"text": oops}\n', "invalid_json", "not valid JSON"),
        ("list.jsonl", b'{"text": "ok"}\n[1, 2]\n', "data_type", "JSON object, got a list"),
        ("bad.csv", b"a,b\n\xe9t\xe9,1\n", "invalid_encoding", "UTF-8"),
        ("random.jsonl", bytes(range(1, 256)) * 20, "binary_file", "binary"),
        ("deep.jsonl", b"[" * 100_000 + b"\n", "invalid_json", "nested too deeply"),
        ("nan.jsonl", b'{"text": NaN}\n', "invalid_json", "NaN is not valid JSON"),
        ("surrogate.jsonl", b'{"text": "\\ud800"}\n', "invalid_json", "surrogate"),
        ("bigint.jsonl", b'{"text": ' + b"9" * 5000 + b"}\n", "invalid_json", "digits"),
        ("bad.parquet", b"not parquet at all", "invalid_parquet", "Parquet"),
    ],
)
def test_file_mistakes_raise_data_error(tmp_path, name, content, code, fragment):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as exc:
        load_dataset(path)
    assert exc.value.code == code and fragment in str(exc.value) and name in str(exc.value)
    if name in ("notjson.jsonl", "list.jsonl", "latin1.jsonl"):
        assert exc.value.line == 2


def test_missing_file_and_plain_directory(tmp_path):
    with pytest.raises(DataError, match="File not found"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a dataset saved with"):
        load_dataset(tmp_path / "dir")


def test_huge_line_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"text": "ok"}\n{"text": "')
        fh.write(b"x" * (MAX_LINE_BYTES + 10))
        fh.write(b'"}\n')
    with pytest.raises(DataError) as exc:
        read_records(path)
    assert exc.value.code == "line_too_long" and exc.value.line == 2 and "10 MB" in str(exc.value)


def test_line_errors_can_be_collected(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "a"}\nnope\n"str"\n{"text": "caf\xe9"}\n{"text": "b"}\n')
    errors: list[DataError] = []
    recs = read_records(path, on_error=errors.append)
    assert [line for line, _ in recs.records] == [1, 5]
    assert [(e.line, e.code) for e in errors] == [
        (2, "invalid_json"),
        (3, "data_type"),
        (4, "invalid_encoding"),
    ]
