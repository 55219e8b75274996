"""`evaluate`: generate the assistant reply for every test conversation and score it.

The prompt of an example is every message before its last assistant message; that message is the
reference. Replies are generated greedily in length-sorted batches (`generate_batch`), the loss and
perplexity of the references are computed teacher-forced on the reference tokens only, and the
metrics depend on the references: classification metrics when they form a small label set, chrF
and ROUGE-L otherwise. `compare` runs several models (base zero-shot, base few-shot, fine-tuned) over
the same data; `classification_eval` is the hook the training loop calls on the validation set.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tunery.data import encode_chat, encode_prompt, load_dataset
from tunery.data.types import Conversation, Message
from tunery.errors import DataError
from tunery.evaluate import metrics as M
from tunery.evaluate.benchmark import primary, run_benchmark
from tunery.evaluate.scoring import Example, per_task
from tunery.generation.generate import generate_batch
from tunery.generation.sequence import GenerationParams

DEFAULT_REFERENCE_TEXT = Path("datasets/reference/general_english.txt")


def split_example(conv: Conversation) -> tuple[list[Message], str]:
    """(prompt messages, reference reply): the reference is the last assistant message."""
    for i in range(len(conv.messages) - 1, -1, -1):
        if conv.messages[i].get("role") == "assistant":
            return conv.messages[:i], str(conv.messages[i].get("content") or "")
    raise DataError(
        "the example has no assistant message to evaluate against", line=conv.line, field="messages"
    )


def load_conversations(data: str | Path | Sequence[Conversation]) -> list[Conversation]:
    if isinstance(data, str | Path):
        return list(load_dataset(data, kind="chat").examples)
    return list(data)


def build_few_shot(train_examples: Sequence[Conversation], k: int, seed: int = 0) -> list[Conversation]:
    """Pick k training examples as demonstrations, deterministically for a seed.

    When the training replies form a label set, labels take turns so every class is shown (a prompt
    with only "positive" demonstrations teaches the model to answer "positive").
    """
    if k <= 0:
        return []
    pool = [c for c in train_examples if any(m.get("role") == "assistant" for m in c.messages)]
    random.Random(seed).shuffle(pool)
    refs = [split_example(c)[1] for c in pool]
    if not M.is_label_set(refs):
        return pool[:k]
    by_label: dict[str, list[Conversation]] = {}
    for conv, ref in zip(pool, refs, strict=True):
        by_label.setdefault(M.normalize(ref), []).append(conv)
    picked: list[Conversation] = []
    while len(picked) < min(k, len(pool)):
        for label in sorted(by_label):
            if by_label[label] and len(picked) < k:
                picked.append(by_label[label].pop(0))
    random.Random(seed + 1).shuffle(picked)  # no fixed label order for the model to copy
    return picked


def with_few_shot(
    prompt: list[Message], shots: Sequence[Conversation] | None, mute_shots: bool = False
) -> list[Message]:
    """The test prompt with demonstrations as earlier user/assistant turns; its system message stays first.

    Demonstrations lose their own system messages. With `mute_shots`, their replies get weight 0 so a
    teacher-forced loss scores only the test reply.
    """
    if not shots:
        return list(prompt)
    system = [m for m in prompt[:1] if m.get("role") == "system"]
    turns: list[Message] = []
    for shot in shots:
        shot_prompt, reply = split_example(shot)
        turns.extend(dict(m) for m in shot_prompt if m.get("role") != "system")
        turns.append({"role": "assistant", "content": reply, **({"weight": 0} if mute_shots else {})})
    return [*system, *turns, *prompt[len(system) :]]


def _reference_conversation(conv: Conversation, shots: Sequence[Conversation] | None) -> Conversation:
    """The example with earlier assistant turns (and shots) muted, so the loss covers the reference only."""
    prompt, reference = split_example(conv)
    muted = [{**m, "weight": 0} if m.get("role") == "assistant" else m for m in prompt]
    messages = [*with_few_shot(muted, shots, mute_shots=True), {"role": "assistant", "content": reference}]
    return Conversation(messages=messages, tools=conv.tools, line=conv.line)


def _default_max_new_tokens(tokenizer: Any, references: list[str], label_set: bool) -> int:
    # Derived from the data: enough for the longest reference plus slack, so a model that rambles
    # past a label is cut early instead of costing hundreds of tokens per example.
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=16)
    return min(1024, longest + 8) if label_set else min(1024, int(longest * 1.5) + 16)


def _progress(enabled: bool, total: int, description: str):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    progress.add_task(description, total=total)
    return progress


def _scores(
    predictions: list[str],
    references: list[str],
    label_set: bool,
    labels: list[str] | None,
    positive_class: str | None,
    betas: list[float] | None,
) -> dict[str, Any]:
    """The metrics of `evaluate`'s result: classification ones for label replies, chrF and ROUGE-L
    otherwise (loss and perplexity are filled in by the caller)."""
    out: dict[str, Any] = {
        "n": len(predictions),
        "task": "classification" if label_set else "generation",
        "exact_match": M.exact_match(predictions, references),
        "accuracy": None,
        "invalid": None,
        "per_class": None,
        "confusion_matrix": None,
        "labels": None,
        "macro_f1": None,
        "weighted_f1": None,
        "loss": None,
        "perplexity": None,
        "chrf": None,
        "rouge_l": None,
    }
    if label_set:
        out.update(M.classification_metrics(predictions, references, labels, positive_class, betas))
    else:
        out["chrf"] = M.chrf(predictions, references)
        out["rouge_l"] = M.rouge_l(predictions, references)
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset_path: str | Path | Sequence[Conversation],
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    labels: list[str] | None = None,
    positive_class: str | None = None,
    betas: list[float] | None = None,
    few_shot: list[Conversation] | None = None,
    progress: bool = True,
    compute_loss: bool = True,
    max_length: int | None = None,
    n_shown: int = 20,
    description: str = "Evaluating",
) -> dict:
    """Generate a reply for each chat example and score it; the dict is what `eval.json` holds."""
    convs = load_conversations(dataset_path)
    if not convs:
        raise DataError("the evaluation file has no examples", file=str(dataset_path))
    pairs = [split_example(c) for c in convs]
    references = [ref for _, ref in pairs]
    label_set = bool(labels) or M.is_label_set(references)
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(tokenizer, references, label_set)
    prompts = [
        encode_prompt(with_few_shot(p, few_shot), tokenizer, c.tools)
        for (p, _), c in zip(pairs, convs, strict=True)
    ]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        with _progress(progress, len(prompts), description) as bar:
            step = (lambda k: bar.advance(bar.task_ids[0], k)) if bar is not None else None
            results = generate_batch(
                model,
                tokenizer,
                prompts,
                GenerationParams(max_new_tokens=max_new_tokens),
                batch_size=batch_size,
                on_done=step,
            )
        seconds = time.perf_counter() - t0
        loss = ppl = None
        if compute_loss:
            limit = max_length or getattr(model.config, "max_position_embeddings", None)
            feats = [encode_chat(_reference_conversation(c, few_shot), tokenizer, limit) for c in convs]
            nll, count = M.sequence_nll(model, feats, batch_size=batch_size)
            loss, ppl = (nll / count, M.perplexity(nll, count)) if count else (None, None)
    finally:
        model.train(was_training)
    predictions = [r.text for r in results]
    out = _scores(predictions, references, label_set, labels, positive_class, betas)
    out.update(n=len(convs), loss=loss, perplexity=ppl)
    generated = sum(r.completion_tokens for r in results)
    out["generation"] = {
        "max_new_tokens": max_new_tokens,
        "seconds": round(seconds, 3),
        "completion_tokens": generated,
        "tokens_per_second": round(generated / seconds, 2) if seconds else None,
        "few_shot": len(few_shot or []),
    }
    out["predictions"] = predictions
    out["examples"] = [
        {
            "line": c.line,
            "prompt": _last_user(p),
            "reference": ref,
            "prediction": pred,
            "correct": M.normalize(pred) == M.normalize(ref),
        }
        for c, (p, ref), pred in list(zip(convs, pairs, predictions, strict=True))[:n_shown]
    ]
    return out


def _last_user(prompt: list[Message]) -> str:
    for m in reversed(prompt):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def classification_eval(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Conversation],
    *,
    labels: list[str] | None = None,
    positive_class: str | None = None,
    betas: list[float] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    tasks: list[str] | None = None,
) -> dict[str, float]:
    """The training loop's `compute_classification_metrics` hook: flat metrics for metrics.jsonl.

    Keys are prefixed `valid_` (accuracy, exact_match, macro_f1, weighted_f1, invalid, and for binary
    tasks precision/recall/f1/f-beta of the positive class). With `tasks` (each conversation's task,
    several of them), each task whose references form a label set adds `valid_accuracy/<task>`.
    The model's train/eval mode is restored; results.csv names these columns (train/events.py).
    """
    res = evaluate(
        model,
        tokenizer,
        conversations,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        labels=labels,
        positive_class=positive_class,
        betas=betas,
        progress=False,
        compute_loss=False,
        n_shown=0,
    )
    flat = {"valid_exact_match": res["exact_match"]}
    for key in ("accuracy", "macro_f1", "weighted_f1", "invalid"):
        if res.get(key) is not None:
            flat[f"valid_{key}"] = res[key]
    for key, value in (res.get("binary") or {}).items():
        if key != "positive_class":
            flat[f"valid_{key}"] = value
    if tasks and len(set(tasks)) > 1:
        flat.update(_task_accuracies(conversations, res["predictions"], tasks, labels))
    return flat


def _task_accuracies(
    conversations: Sequence[Conversation], predictions: list[str], tasks: list[str], labels: list[str] | None
) -> dict[str, float]:
    """`valid_accuracy/<task>` of each classification task, scored as `compare` scores tasks."""
    pairs = [split_example(c) for c in conversations]
    examples = [
        Example(p, c.tools, ref, t) for c, (p, ref), t in zip(conversations, pairs, tasks, strict=True)
    ]
    scored = per_task(examples, {"model": predictions}, labels) or {}
    return {
        f"valid_accuracy/{name}": t["models"][0]["accuracy"]
        for name, t in scored.items()
        if t["task"] == "classification"
    }


def find_reference_text(path: str | Path | None = None) -> Path:
    """The general-English text for forgetting checks: the given path, else the bundled one."""
    candidates = (
        [Path(path)]
        if path
        else [DEFAULT_REFERENCE_TEXT, Path(__file__).resolve().parents[3] / DEFAULT_REFERENCE_TEXT]
    )
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(
        f"reference text not found: {candidates[0]}",
        file=str(candidates[0]),
        hint="Pass --forgetting-text PATH to a plain-text file.",
    )


def forgetting(
    model: Any, tokenizer: Any, text_path: str | Path | None = None, max_tokens: int = 8192
) -> dict[str, float]:
    """Perplexity on general English text; compare it before and after fine-tuning."""
    path = find_reference_text(text_path)
    return M.text_perplexity(model, tokenizer, path.read_text(encoding="utf-8"), max_tokens=max_tokens)


def forgetting_on_benchmark(
    model: Any, tokenizer: Any, tasks: str, *, limit: int | None = None, batch_size: int = 8
) -> dict[str, float]:
    """General knowledge as lm-eval measures it: {"task metric": value} (accuracy where the task has
    one) on `tasks`, e.g. the bundled `tunery_general_knowledge`; compare before and after."""
    return primary(run_benchmark(model, tokenizer, tasks, limit=limit, batch_size=batch_size))


def compare(
    rows: Sequence[tuple[str, Any, Any, list[Conversation] | None]],
    data: str | Path | Sequence[Conversation],
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    labels: list[str] | None = None,
    positive_class: str | None = None,
    forgetting_text: str | Path | None = None,
    check_forgetting: bool = False,
    forgetting_benchmark: str | None = None,
    benchmark_limit: int | None = None,
    progress: bool = True,
    max_disagreements: int = 10,
) -> dict:
    """Evaluate every (label, model, tokenizer, few-shot demonstrations) row on the same data.

    Returns {"rows": [{"label", **metrics}], "disagreements": [examples where the rows' replies differ]}.
    With `check_forgetting`, each row also gets its perplexity on the general-English reference text;
    with `forgetting_benchmark` (lm-eval tasks, `evaluate/benchmark.py`), its scores on them too.
    """
    convs = load_conversations(data)
    results = []
    probed: dict[int, dict[str, Any]] = {}  # a base model's zero- and few-shot rows share one probe
    for label, model, tok, shots in rows:
        res = evaluate(
            model,
            tok,
            convs,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            labels=labels,
            positive_class=positive_class,
            few_shot=shots,
            progress=progress,
            n_shown=0,
            description=f"Evaluating {label}",
        )
        res["label"] = label
        if check_forgetting or forgetting_benchmark:
            if id(model) not in probed:
                probed[id(model)] = forgetting(model, tok, forgetting_text)
                if forgetting_benchmark:
                    probed[id(model)]["benchmark"] = forgetting_on_benchmark(
                        model, tok, forgetting_benchmark, limit=benchmark_limit, batch_size=batch_size
                    )
            res["forgetting"] = probed[id(model)]
        results.append(res)
    disagreements = []
    for i, conv in enumerate(convs):
        preds = [r["predictions"][i] for r in results]
        if len({M.normalize(p) for p in preds}) > 1:
            prompt, ref = split_example(conv)
            disagreements.append(
                {
                    "line": conv.line,
                    "prompt": _last_user(prompt),
                    "reference": ref,
                    "predictions": {r["label"]: p for r, p in zip(results, preds, strict=True)},
                }
            )
    return {
        "rows": results,
        "n": len(convs),
        "disagreements": disagreements[:max_disagreements],
        "n_disagreements": len(disagreements),
    }
