"""evaluate / few-shot / compare / classification_eval on a tiny model and small chat files."""

from __future__ import annotations

import pytest

from tests.helpers.tiny import write_jsonl
from tunery.data.types import Conversation
from tunery.evaluate.run import (
    build_few_shot,
    classification_eval,
    compare,
    evaluate,
    forgetting,
    split_example,
    with_few_shot,
)

SYSTEM = {"role": "system", "content": "Classify the sentiment."}


def _conv(text, label, line=0, system=True):
    msgs = [SYSTEM] if system else []
    return Conversation(
        [*msgs, {"role": "user", "content": text}, {"role": "assistant", "content": label}], line=line
    )


TRAIN = [
    _conv(f"review {i} " + w, lab, i + 1)
    for i, (w, lab) in enumerate(
        [("great", "positive"), ("awful", "negative"), ("fine but slow", "mixed")] * 4
    )
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.tiny import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp("eval-tiny"), "llama", initializer_range=0.3)
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_few_shot_picks_every_label_deterministically():
    shots = build_few_shot(TRAIN, 3, seed=1)
    assert sorted(split_example(s)[1] for s in shots) == ["mixed", "negative", "positive"]
    assert [s.line for s in shots] == [s.line for s in build_few_shot(TRAIN, 3, seed=1)]
    assert build_few_shot(TRAIN, 0, seed=1) == []


def test_few_shot_prompt_respects_the_chat_template(tiny):
    from tunery.data import encode_prompt

    _, _, tok = tiny
    shots = build_few_shot(TRAIN, 2, seed=0)
    test_prompt, _ = split_example(_conv("brand new review", "positive"))
    messages = with_few_shot(test_prompt, shots)
    assert messages[0] == SYSTEM and sum(m["role"] == "system" for m in messages) == 1
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user", "assistant", "user"]
    rendered = tok.decode(encode_prompt(messages, tok))
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected
    s0, s1 = (split_example(s) for s in shots)
    assert expected == (
        "<|im_start|>system\nClassify the sentiment.<|im_end|>\n"
        f"<|im_start|>user\n{s0[0][-1]['content']}<|im_end|>\n<|im_start|>assistant\n{s0[1]}<|im_end|>\n"
        f"<|im_start|>user\n{s1[0][-1]['content']}<|im_end|>\n<|im_start|>assistant\n{s1[1]}<|im_end|>\n"
        "<|im_start|>user\nbrand new review<|im_end|>\n<|im_start|>assistant\n"
    )
    # Without a system message the demonstrations come first.
    bare = with_few_shot([{"role": "user", "content": "x"}], shots)
    assert bare[0]["role"] == "user" and bare[-1] == {"role": "user", "content": "x"}


def test_evaluate_classification_keys_and_invalid(tiny, tmp_path):
    _, model, tok = tiny
    data = tmp_path / "test.jsonl"
    rows = [_conv(f"item {i}", lab) for i, lab in enumerate(["positive", "negative", "mixed"] * 2)]
    write_jsonl(data, [{"messages": c.messages} for c in rows])
    res = evaluate(model, tok, data, batch_size=4, progress=False)
    for key in (
        "accuracy",
        "exact_match",
        "n",
        "invalid",
        "per_class",
        "confusion_matrix",
        "labels",
        "macro_f1",
        "weighted_f1",
        "loss",
        "perplexity",
        "examples",
    ):
        assert key in res, key
    assert res["n"] == 6 and res["task"] == "classification"
    assert res["labels"] == ["mixed", "negative", "positive"]
    # A random model does not answer with labels: every reply is counted as invalid.
    assert res["invalid"] + sum(map(sum, res["confusion_matrix"])) == 6
    assert res["loss"] > 0 and res["perplexity"] == pytest.approx(2.718281828 ** res["loss"], rel=1e-6)
    assert res["examples"][0]["reference"] == "positive" and "prediction" in res["examples"][0]
    # Few-shot changes the prompt and so the loss of the references.
    few = evaluate(model, tok, data, batch_size=4, progress=False, few_shot=build_few_shot(TRAIN, 3, 0))
    assert few["loss"] != res["loss"] and few["generation"]["few_shot"] == 3


def test_evaluate_free_text_metrics(tiny):
    _, model, tok = tiny
    convs = [
        Conversation(
            [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": f"A long free text answer about topic {i}."},
            ]
        )
        for i in range(3)
    ]
    res = evaluate(model, tok, convs, progress=False, max_new_tokens=6)
    assert res["task"] == "generation" and res["accuracy"] is None
    assert 0 <= res["chrf"] <= 100 and 0 <= res["rouge_l"] <= 100
    assert res["generation"]["max_new_tokens"] == 6


def test_classification_eval_hook_restores_train_mode(tiny):
    _, model, tok = tiny
    model.train()
    out = classification_eval(model, tok, TRAIN[:6], max_new_tokens=3)
    assert model.training
    model.eval()
    assert set(out) >= {"valid_accuracy", "valid_exact_match", "valid_macro_f1", "valid_invalid"}


def test_compare_lists_disagreements(tiny):
    from transformers import AutoModelForCausalLM

    path, model, tok = tiny
    other = AutoModelForCausalLM.from_pretrained(path).eval()
    for p in other.parameters():  # a different "fine-tuned" model
        p.data.mul_(1.5)
    rows = [
        ("base zero-shot", model, tok, None),
        ("base 3-shot", model, tok, build_few_shot(TRAIN, 3, 0)),
        ("tuned", other, tok, None),
    ]
    res = compare(rows, TRAIN[:4], max_new_tokens=4, progress=False)
    assert [r["label"] for r in res["rows"]] == ["base zero-shot", "base 3-shot", "tuned"]
    assert res["n_disagreements"] >= 1
    d = res["disagreements"][0]
    assert set(d["predictions"]) == {"base zero-shot", "base 3-shot", "tuned"}


def test_forgetting_perplexity(tiny, tmp_path):
    _, model, tok = tiny
    text = tmp_path / "english.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    res = forgetting(model, tok, text)
    assert res["tokens"] > 100 and res["perplexity"] > 1
