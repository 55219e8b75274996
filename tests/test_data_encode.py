"""Tokenization and label masks: labels land exactly on the trained assistant tokens."""

from __future__ import annotations

import json

import pytest

from tests.helpers.tiny import tiny_tokenizer
from tunery.data import (
    IGNORE_INDEX,
    cached_encode,
    encode_chat,
    encode_pair,
    encode_prompt,
    encode_text,
    load_dataset,
)
from tunery.data.types import Conversation, Dataset, PreferencePair

# SmolLM2-style: a default system message is inserted when the conversation has none.
SMOL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3-style headers, no newline after the end-of-turn token.
LLAMA3_TEMPLATE = (
    "{{ '<|endoftext|>' }}{% for message in messages %}"
    "{{ '[SEP]' + message['role'] + '[MASK]\n\n' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[SEP]assistant[MASK]\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def trained_text(tok, feats) -> str:
    return tok.decode(
        [i for i, label in zip(feats["input_ids"], feats["labels"], strict=True) if label != IGNORE_INDEX]
    )


def trained_runs(feats) -> list[list[int]]:
    """Contiguous runs of labelled tokens (one per trained reply)."""
    runs, current = [], []
    for label in feats["labels"]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = [*runs, current], []
    return runs + ([current] if current else [])


def conv(*turns: tuple, tools=None) -> Conversation:
    msgs = []
    for turn in turns:
        role, content, *rest = turn
        msgs.append({"role": role, "content": content, **(rest[0] if rest else {})})
    return Conversation(msgs, tools)


def test_labels_cover_only_the_assistant_reply_and_end_of_turn(tok):
    c = conv(("system", "Be brief."), ("user", "What is the capital of France?"), ("assistant", "Paris."))
    feats = encode_chat(c, tok, 512)
    assert feats["truncated"] is False
    assert trained_text(tok, feats) == "Paris.<|im_end|>"
    # ids are exactly what the template gives at inference, and labels equal the ids where trained
    full = tok.apply_chat_template(c.messages, tokenize=True)["input_ids"]
    assert feats["input_ids"] == full
    assert all(
        label in (IGNORE_INDEX, i) for i, label in zip(feats["input_ids"], feats["labels"], strict=True)
    )


def test_multi_turn_and_weight_zero(tok):
    c = conv(
        ("user", "hi"),
        ("assistant", "hello there", {"weight": 0}),
        ("user", "two plus two?"),
        ("assistant", "Four."),
        ("user", "and ten?"),
        ("assistant", "100 no, 10.", {"weight": 1}),
    )
    feats = encode_chat(c, tok, None)
    runs = trained_runs(feats)
    assert [tok.decode(r) for r in runs] == ["Four.<|im_end|>", "100 no, 10.<|im_end|>"]
    everything = encode_chat(
        Conversation([{**m, "weight": 1} if m["role"] == "assistant" else m for m in c.messages]), tok, None
    )
    assert [tok.decode(r) for r in trained_runs(everything)][0] == "hello there<|im_end|>"


def test_train_on_prompt_trains_everything_but_weight_zero(tok):
    c = conv(("user", "hi"), ("assistant", "yes", {"weight": 0}), ("user", "again"), ("assistant", "no"))
    feats = encode_chat(c, tok, None, train_on_prompt=True)
    text = trained_text(tok, feats)
    assert "<|im_start|>user\nhi<|im_end|>" in text and "no<|im_end|>" in text and "yes" not in text
    feats_all = encode_chat(conv(("user", "hi"), ("assistant", "yes")), tok, None, train_on_prompt=True)
    assert feats_all["labels"] == feats_all["input_ids"]


def test_system_prompt_added_only_when_missing(tok):
    feats = encode_chat(conv(("user", "hi"), ("assistant", "yes")), tok, None, system_prompt="Be kind.")
    assert tok.decode(feats["input_ids"]).startswith("<|im_start|>system\nBe kind.<|im_end|>")
    feats = encode_chat(
        conv(("system", "Own."), ("user", "hi"), ("assistant", "yes")), tok, None, system_prompt="Be kind."
    )
    assert "Be kind." not in tok.decode(feats["input_ids"])


def test_truncation_keeps_the_left_part_and_is_counted(tok):
    c = conv(("user", "count"), ("assistant", " ".join(str(i) for i in range(200))))
    whole = encode_chat(c, tok, None)
    cut = encode_chat(c, tok, 32)
    assert not whole["truncated"] and cut["truncated"]
    assert cut["input_ids"] == whole["input_ids"][:32] and cut["labels"] == whole["labels"][:32]
    assert not encode_chat(c, tok, len(whole["input_ids"]))["truncated"]


@pytest.mark.parametrize("template", [SMOL_TEMPLATE, LLAMA3_TEMPLATE])
def test_other_templates(template):
    tok = tiny_tokenizer()
    tok.chat_template = template
    c = conv(("user", "hi"), ("assistant", "yes"), ("user", "and?"), ("assistant", "no."))
    feats = encode_chat(c, tok, None)
    assert [tok.decode(r) for r in trained_runs(feats)] == ["yes<|im_end|>", "no.<|im_end|>"]
    if template is SMOL_TEMPLATE:
        assert "named SmolLM" in tok.decode(feats["input_ids"])


def test_default_template_for_tokenizers_without_one():
    tok = tiny_tokenizer()
    tok.chat_template = None
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    c = conv(
        ("user", "2+2?"),
        (
            "assistant",
            None,
            {
                "tool_calls": [
                    {
                        "id": "c",
                        "type": "function",
                        "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'},
                    }
                ]
            },
        ),
        ("tool", "4", {"tool_call_id": "c"}),
        ("assistant", "Four."),
        tools=tools,
    )
    feats = encode_chat(c, tok, None)
    text = tok.decode(feats["input_ids"])
    assert '"name": "add"' in text.split("<|im_start|>user")[0]  # tools listed in the system turn
    assert [tok.decode(r) for r in trained_runs(feats)] == [
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call><|im_end|>',
        "Four.<|im_end|>",
    ]


def test_default_template_ends_replies_with_a_foreign_eos():
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.eos_token = "<|endoftext|>"  # a base model whose EOS is not the ChatML end marker
    feats = encode_chat(conv(("user", "hi"), ("assistant", "yes")), tok, None)
    assert trained_text(tok, feats) == "yes<|im_end|><|endoftext|>"


def test_encode_prompt_ends_with_generation_prompt(tok):
    ids = encode_prompt([{"role": "user", "content": "hi"}], tok)
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_encode_pair_shares_the_prompt(tok):
    pair = PreferencePair(
        [{"role": "user", "content": "Capital of France?"}],
        [{"role": "assistant", "content": "Paris."}],
        [{"role": "assistant", "content": "I do not know the answer."}],
    )
    feats = encode_pair(pair, tok, None)
    assert tok.decode(feats["prompt_ids"]) == encode_prompt_text(tok, pair.prompt)
    assert tok.decode(feats["chosen_ids"]) == "Paris.<|im_end|>"
    assert tok.decode(feats["rejected_ids"]) == "I do not know the answer.<|im_end|>"
    assert (
        feats["prompt_ids"] + feats["chosen_ids"]
        == encode_chat(Conversation(pair.prompt + pair.chosen), tok, None)["input_ids"][:-1]
    )  # all but the final newline
    cut = encode_pair(pair, tok, len(feats["prompt_ids"]) + 3)
    assert cut["truncated"] and cut["prompt_ids"] == feats["prompt_ids"]
    assert cut["chosen_ids"] == feats["chosen_ids"][:3] and cut["rejected_ids"] == feats["rejected_ids"][:3]


def encode_prompt_text(tok, messages) -> str:
    return tok.decode(encode_prompt(messages, tok))


def test_encode_text_appends_eos(tok):
    ids = encode_text("The quick brown fox.", tok)
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == "The quick brown fox."


def test_cached_encode_hits_the_second_time(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNERY_CACHE", str(tmp_path / "cache"))
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(5)
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(path)
    calls = []

    def encode(example):
        calls.append(example.line)
        return None if example.line == 3 else encode_chat(example, tok, 64)

    settings = {"max_length": 64, "train_on_prompt": False}
    first = cached_encode(ds, tok, encode, settings)
    assert len(calls) == 5 and len(first) == 4  # None means: skip this example
    second = cached_encode(ds, tok, encode, settings)
    assert len(calls) == 5 and second == first  # served from the cache
    files = list((tmp_path / "cache" / "tokenized").iterdir())
    assert len(files) == 1 and files[0].name.endswith(".json.gz")
    cached_encode(ds, tok, encode, {**settings, "max_length": 32})  # other settings: another entry
    assert len(calls) == 10
    other_tok = tiny_tokenizer()
    other_tok.chat_template = SMOL_TEMPLATE
    cached_encode(ds, other_tok, encode, settings)  # another template: another entry
    assert len(calls) == 15
    files[0].write_bytes(b"garbage")  # a damaged file is a miss, then rewritten
    assert cached_encode(ds, tok, encode, settings) == first and len(calls) == 20
    assert cached_encode(ds, tok, encode, settings) == first and len(calls) == 20


def test_cached_encode_in_memory_dataset(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNERY_CACHE", str(tmp_path / "cache"))
    ds = Dataset("memory", "chat", "chat", [conv(("user", "hi"), ("assistant", "yes"))])
    a = cached_encode(ds, tok, lambda ex: encode_chat(ex, tok, None), {})
    ds.examples[0].messages[1]["content"] = "no"
    b = cached_encode(ds, tok, lambda ex: encode_chat(ex, tok, None), {})
    assert a != b  # the examples' content is the key when there is no file hash


@pytest.mark.slow
def test_smollm2_labels_with_its_default_system_message():
    from tunery.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    c = conv(
        ("user", "What is the capital of France?"),
        ("assistant", "Paris."),
        ("user", "And Italy?"),
        ("assistant", "Rome."),
    )
    feats = encode_chat(c, tok, None)
    assert "named SmolLM" in tok.decode(feats["input_ids"])  # the template's own system message
    assert [tok.decode(r) for r in trained_runs(feats)] == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    prompt = encode_prompt(c.messages[:1], tok)
    assert feats["input_ids"][: len(prompt)] == prompt
