"""Every objective beyond SFT end to end on a tiny Llama: its target metric moves the right way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import quick_run_config, write_jsonl
from tunery.plugins import load_config
from tunery.train import run
from tunery.train.events import read_jsonl

GOOD = ["wonderful", "great story", "I loved it", "the acting was wonderful", "positive"]


pytestmark = pytest.mark.usefixtures("one_thread")
BAD = ["terrible", "it broke", "support never answered", "terrible product", "negative"]


def write_pairs(path: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        rows.append(
            {
                "input": {"messages": [{"role": "user", "content": f"Review {i}: how was it?"}]},
                "preferred_output": [{"role": "assistant", "content": GOOD[i % len(GOOD)]}],
                "non_preferred_output": [{"role": "assistant", "content": BAD[(i + 2) % len(BAD)]}],
            }
        )
    return write_jsonl(path, rows)


def config(tmp_path: Path, model: Path, data: Path, objective: str, **sets):
    sets = {"method": "lora", **sets}
    return quick_run_config(model, data, tmp_path / f"run-{objective}", objective=objective, **sets)


def load_saved(model_dir: Path):
    """(model, tokenizer) of a run's saved model directory, through the method that saved it."""
    from tunery.methods import METHODS, read_info
    from tunery.models import load_model, load_tokenizer

    info = read_info(model_dir)
    base = load_model(info["base_model"], dtype=torch.float32)
    model = METHODS.get(info["method"]).load(base, Path(info["path"]), trainable=False)
    return model.eval(), load_tokenizer(info["base_model"])


def metrics(result) -> list[dict]:
    return read_jsonl(Path(result.output_dir) / "metrics.jsonl")


@torch.no_grad()
def preference_rate(model, tokenizer, data: Path) -> float:
    """How often the model's own log-likelihood ranks the chosen reply above the rejected one."""
    from tunery.config import TuneryConfig
    from tunery.data import load_dataset
    from tunery.objectives.common import collate_pairs, encode_pair_features, row_logps

    cfg = TuneryConfig()
    feats = [encode_pair_features(p, tokenizer, cfg) for p in load_dataset(data, "preference").examples]
    batch = collate_pairs(feats, tokenizer.pad_token_id, packed=False)
    logps, _ = row_logps(model.eval(), batch)
    n = len(feats)
    return float((logps[:n] > logps[n:]).float().mean())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_raises_chosen_over_rejected(tmp_path, tiny_llama, method):
    data = write_pairs(tmp_path / "pairs.jsonl")
    lr = 0.01 if method == "lora" else 0.002
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        "dpo",
        method=method,
        **{
            "hyperparameters.n_epochs": 10,
            "hyperparameters.batch_size": 12,
            "hyperparameters.learning_rate": lr,
        },
    )
    result = run(cfg)
    assert result.status == "succeeded"
    rows = metrics(result)
    assert rows[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2
    assert rows[-1]["train_accuracy"] > 0.9 and rows[-1]["train_margin"] > 0
    from tunery.models import load_model

    trained, tok = load_saved(result.model_dir)
    base = load_model(str(tiny_llama), dtype=torch.float32)
    before, after = preference_rate(base, tok, data), preference_rate(trained, tok, data)
    # the implicit reward ranks every pair right; the model's own likelihood ranking improves too
    # (a long chosen reply may keep a lower total log-likelihood than a short rejected one)
    assert after > before and after >= 0.8


def test_reward_model_separates_toy_set(tmp_path, tiny_llama):
    from tunery.data import load_dataset
    from tunery.objectives.reward import load_reward_model, score_conversations

    data = write_pairs(tmp_path / "pairs.jsonl", n=20)
    held_out = write_pairs(tmp_path / "valid.jsonl", n=10)
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        "reward",
        **{
            "data.validation": str(held_out),
            "hyperparameters.n_epochs": 8,
            "hyperparameters.batch_size": 10,
            "hyperparameters.learning_rate": 0.002,
        },
    )
    result = run(cfg)
    rows = metrics(result)
    assert rows[-1]["valid_accuracy"] > 0.9 and rows[-1]["valid_margin"] > rows[0]["train_margin"]
    adapter = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["score"]  # the head trained in full and saved with LoRA
    model, tok = load_reward_model(result.model_dir)
    pairs = load_dataset(held_out, "preference").examples
    chosen = score_conversations(model, tok, [p.prompt + p.chosen for p in pairs])
    rejected = score_conversations(model, tok, [p.prompt + p.rejected for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs) > 0.9

    import typer
    from typer.testing import CliRunner

    from tunery.objectives.cli import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    out = tmp_path / "scores.jsonl"
    res = CliRunner().invoke(
        app, ["score", "--adapter", str(result.model_dir), "--input", str(held_out), "--output", str(out)]
    )
    assert res.exit_code == 0, res.output
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == 10 and sum(r["margin"] > 0 for r in scored) >= 9


def write_prompts(path: Path, n: int = 12) -> Path:
    topics = ["the sky", "the sea", "a flower", "my car", "the wall", "a shirt"]
    return write_jsonl(path, [{"prompt": f"Name a colour for {topics[i % 6]}. ({i})"} for i in range(n)])


def test_grpo_raises_reward_for_saying_blue(tmp_path, tiny_llama):
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        "grpo",
        method="full",
        **{
            "grpo.reward_functions": '[{"name": "contains", "word": "blue"}]',
            "grpo.num_generations": 16,
            "grpo.max_new_tokens": 12,
            "grpo.beta": 0.01,
            "hyperparameters.n_epochs": 4,
            "hyperparameters.batch_size": 4,
            "hyperparameters.learning_rate": 0.02,
        },
    )
    result = run(cfg)
    rows = metrics(result)
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "train_reward") > mean(first, "train_reward") + 0.3
    assert all(0 < r["train_completion_length"] <= 13 and r["train_kl"] >= 0 for r in rows)
    assert "train_reward/contains" in rows[0]


def write_docs(path: Path, n: int = 12) -> Path:
    docs = ["The quick brown fox jumps over the lazy dog. " * (1 + i % 3) + f"Doc {i}." for i in range(n - 1)]
    docs.append("What is the capital of France? Paris. " * 12)  # longer than max_length: split
    return write_jsonl(path, [{"text": d} for d in docs])


def test_pretrain_splits_documents_and_lowers_perplexity(tmp_path, tiny_llama):
    import math

    from tunery.data import load_dataset
    from tunery.models import load_tokenizer
    from tunery.objectives import OBJECTIVES

    data = write_docs(tmp_path / "docs.jsonl")
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        "pretrain",
        **{
            "hyperparameters.max_length": 32,
            "hyperparameters.n_epochs": 6,
            "hyperparameters.batch_size": 8,
            "hyperparameters.learning_rate": 0.01,
        },
    )
    pretrain = OBJECTIVES.get("pretrain")
    tok = load_tokenizer(str(tiny_llama))
    long_doc = load_dataset(data, "text").examples[-1]
    chunks = pretrain.encode(long_doc, tok, cfg)
    assert len(chunks) > 1 and all(len(c["input_ids"]) <= 32 for c in chunks)
    batch = pretrain.collate(chunks, tok.pad_token_id, True)
    # one attention segment per chunk: nothing attends across a chunk or document boundary
    assert batch["cu_seq_lens"].tolist() == [
        0,
        *__import__("itertools").accumulate(len(c["input_ids"]) for c in chunks),
    ]
    rows = metrics(run(cfg))
    assert math.exp(rows[-1]["train_loss"]) < 0.5 * math.exp(rows[0]["train_loss"])


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_preferences_move_their_margin(tmp_path, tiny_llama, objective):
    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        objective,
        **{
            "hyperparameters.n_epochs": 10,
            "hyperparameters.batch_size": 12,
            "hyperparameters.learning_rate": 0.01,
        },
    )
    rows = metrics(run(cfg))
    assert rows[-1]["train_margin"] > rows[0]["train_margin"] + 0.5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_kto_moves_margin_on_unpaired_feedback(tmp_path, tiny_llama):
    rows_in = []
    for i in range(12):
        good = i % 2 == 0
        reply = GOOD[i % len(GOOD)] if good else BAD[i % len(BAD)]
        rows_in.append({"prompt": f"Review {i}: how was it?", "completion": reply, "label": good})
    data = write_jsonl(tmp_path / "kto.jsonl", rows_in)
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        "kto",
        **{
            "hyperparameters.n_epochs": 8,
            "hyperparameters.batch_size": 12,
            "hyperparameters.learning_rate": 0.01,
        },
    )
    rows = metrics(run(cfg))
    assert rows[0]["train_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    assert rows[-1]["train_margin"] > 0.1 and rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_distillation_lowers_kl_to_teacher(tmp_path, tiny_llama):
    from tests.helpers.tiny import make_tiny_model_dir, write_chat_jsonl

    # a sharper random teacher (larger init) so its distributions differ clearly from the student's
    teacher = make_tiny_model_dir(tmp_path / "teacher", seed=1, initializer_range=0.1)
    data = write_chat_jsonl(tmp_path / "chat.jsonl", n=12)
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        "distill",
        method="full",
        **{
            "distill.teacher": str(teacher),
            "hyperparameters.n_epochs": 10,
            "hyperparameters.batch_size": 12,
            "hyperparameters.learning_rate": 0.003,
        },
    )
    rows = metrics(run(cfg))
    assert rows[-1]["train_divergence"] < 0.6 * rows[0]["train_divergence"]


def test_distillation_refuses_teacher_with_other_tokenizer(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from tests.helpers.tiny import tiny_config, tiny_tokenizer, write_chat_jsonl
    from tunery.errors import ConfigError

    tok = tiny_tokenizer(vocab_size=300)
    teacher = tmp_path / "other"
    AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok))).save_pretrained(teacher)
    tok.save_pretrained(teacher)
    data = write_chat_jsonl(tmp_path / "chat.jsonl", n=12)
    cfg = config(tmp_path, tiny_llama, data, "distill", **{"distill.teacher": str(teacher)})
    with pytest.raises(ConfigError, match="different tokenizer"):
        run(cfg)
    status = json.loads((Path(cfg.output) / "run.json").read_text())
    assert status["status"] == "failed" and status["error"]["param"] == "distill.teacher"


def test_grpo_refuses_custom_rewards_when_told(tmp_path, tiny_llama):
    from tunery.errors import ConfigError

    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        "grpo",
        **{"grpo.reward_functions": '[{"name": "os:getcwd"}]', "grpo.allow_custom_rewards": False},
    )
    with pytest.raises(ConfigError, match="only builtin reward functions"):
        run(cfg)


def test_builtin_reward_functions():
    from tunery.objectives.rewards import RewardSpec, bind

    fns = {
        name: fn
        for name, _, fn in bind(
            [
                RewardSpec(name="contains", word="blue"),
                RewardSpec(name="regex", pattern=r"^\d+$", full_match=True),
                RewardSpec(name="exact_answer"),
                RewardSpec(name="json_valid"),
                RewardSpec(name="length", target=4),
            ],
            allow_custom=False,
        )
    }
    assert fns["contains"]("The sky is Blue.", {}) == 1.0 and fns["contains"]("bluest", {}) == 0.0
    assert fns["regex"]("42", {}) == 1.0 and fns["regex"]("42 apples", {}) == 0.0
    assert fns["exact_answer"](" paris.", {"answer": "Paris"}) == 1.0
    assert fns["exact_answer"]("Lyon", {"answer": "Paris"}) == 0.0
    assert fns["json_valid"]('```json\n{"a": 1}\n```', {}) == 1.0 and fns["json_valid"]("{a:", {}) == 0.0
    assert fns["length"]("one two three four", {}) == 1.0 and fns["length"]("one two", {}) == 0.5


def test_openai_method_maps_onto_objectives():
    from tunery.objectives.dpo import openai_method_to_config

    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2, "batch_size": "auto"}}}
    assert openai_method_to_config(dpo) == {
        "objective": "dpo",
        "dpo": {"beta": 0.25},
        "hyperparameters": {"n_epochs": 2},
    }
    assert openai_method_to_config({"type": "supervised"}) == {"objective": "sft"}
    assert openai_method_to_config({"type": "reinforcement"})["grpo"] == {"allow_custom_rewards": False}
    cfg = load_config(overrides=None, sets=["objective=dpo", "dpo.beta=0.25"])
    assert cfg.objective_options.beta == 0.25


JUDGE_SCORES = {"hi": "Score: 3", "hello there": "9/10", "yo": "1", "same a": "5", "same b": "5", "fine": "6"}


def _judge_reply(messages: list[dict]) -> str:
    """The stub judge: the template puts the candidate after "A: "; each known candidate has a fixed
    score, anything else (the tiny policy's random rollouts) scores 7, and "???" gets no number."""
    completion = messages[-1]["content"].split("\nA: ", 1)[1].rsplit("\nScore 0-10:", 1)[0]
    if completion == "???":
        return "no idea"
    return JUDGE_SCORES.get(completion, "7")


def test_rlaif_judge_scores_rollouts_and_labels_pairs(tmp_path, tiny_llama, chat_stub):
    from tunery.objectives.judge import parse_score

    assert parse_score("Score: 7/10", 10) == 0.7 and parse_score("12", 10) == 1.0
    assert parse_score("no idea", 10) is None
    template = tmp_path / "judge.txt"
    template.write_text("Q: {prompt}\nA: {completion}\nScore 0-10:")
    judge = chat_stub(_judge_reply)
    data = write_prompts(tmp_path / "prompts.jsonl")
    cfg = config(
        tmp_path,
        tiny_llama,
        data,
        "rlaif",
        **{
            "rlaif.judge.base_url": judge.base_url,
            "rlaif.judge.model_name": "judge",
            "rlaif.judge.template": str(template),
            "rlaif.num_generations": 2,
            "rlaif.max_new_tokens": 4,
            "hyperparameters.max_steps": 2,
            "hyperparameters.batch_size": 2,
        },
    )
    rows = metrics(run(cfg))
    # every rollout reached the judge (2 steps x 2 prompts x 2 generations) and got its 7/10
    assert len(rows) == 2 and len(judge.requests) == 8
    assert all(r["train_reward/judge"] == pytest.approx(0.7) for r in rows)
    assert all(m[-1]["content"].startswith("Q: user: Name a colour for ") for m in judge.requests)

    # offline labelling through the CLI command: best vs worst candidate by the judge's scores
    from typer.testing import CliRunner

    from tunery.cli.data import data_app as app

    cands = [{"prompt": f"Say hi {i}", "completions": ["hi", "hello there", "yo"]} for i in range(3)]
    cands += [{"prompt": "Tie", "completions": ["same a", "same b"]}]  # no preference: skipped
    cands += [{"prompt": "How are you?", "completions": ["???", "fine"]}]  # "???" is unscored: 0
    candidates = write_jsonl(tmp_path / "cands.jsonl", cands)
    out = tmp_path / "pairs.jsonl"
    args = ["judge", str(candidates), "--output", str(out), "--base-url", judge.base_url]
    res = CliRunner().invoke(app, [*args, "--judge-name", "judge", "--template", str(template)])
    assert res.exit_code == 0, res.output
    output = " ".join(res.output.split())
    assert "Wrote 4 preference pairs" in output and "skipped 1 prompt(s)" in output
    assert "1 judge replies had no score" in output
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    chosen = [(p["preferred_output"][0]["content"], p["non_preferred_output"][0]["content"]) for p in pairs]
    assert chosen == [("hello there", "yo")] * 3 + [("fine", "???")]
    assert [p["scores"] for p in pairs] == [{"preferred": 0.9, "non_preferred": 0.1}] * 3 + [
        {"preferred": 0.6, "non_preferred": 0.0}
    ]
    assert [p["input"]["messages"][0]["content"] for p in pairs] == [
        "Say hi 0",
        "Say hi 1",
        "Say hi 2",
        "How are you?",
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "completions": ["only one"]}])
    res = CliRunner().invoke(app, ["judge", str(bad), "--output", str(out), "--judge-model", str(tiny_llama)])
    assert res.exit_code == 2 and "line 1" in res.output


def test_rlaif_local_judge_scores_its_own_replies(tmp_path, tiny_llama):
    """The local-model judge: each score is the parse of the judge's own (greedy, so repeatable) reply."""
    from tunery.objectives.judge import Judge, JudgeOptions, parse_score

    judge = Judge(JudgeOptions(model=str(tiny_llama), max_tokens=4))
    prompts = [[{"role": "user", "content": f"Say hi {i}"}] for i in range(3)]
    completions = ["hi", "hello there", "yo"]
    scores = judge.score(prompts, completions)
    texts = [
        judge.template.replace("{prompt}", f"user: Say hi {i}").replace("{completion}", c)
        for i, c in enumerate(completions)
    ]
    parsed = [parse_score(r, 10) for r in judge.replies(texts)]
    assert scores == [0.0 if p is None else p for p in parsed]
    assert judge.unparsed == sum(p is None for p in parsed)
