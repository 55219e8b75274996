"""Typer commands for evaluation and inference: eval, compare, chat, generate.

`tunery/cli/__init__.py` mounts them with `register(app)`. Each command is a thin shell over
`tunery.evaluate.run` / `tunery.generation.generate`; models load through `load_for_inference`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from tunery.errors import DataError, TuneryError
from tunery.terminal import console, user_errors


def _load(model: str | None, adapter: str | None) -> tuple[Any, Any]:
    from tunery.generation.loading import load_for_inference

    with console.status(f"Loading {adapter or model}…"):
        return load_for_inference(model, adapter)


def _labels(labels: str | None) -> list[str] | None:
    return [x.strip() for x in labels.split(",") if x.strip()] if labels else None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@user_errors()
def eval_command(
    model: str | None = typer.Option(None, "--model", help="Base model (default: the adapter's base)."),
    adapter: str | None = typer.Option(None, "--adapter", help="Saved model/adapter dir or run dir."),
    data: Path | None = typer.Option(None, "--data", help="Test file (chat JSONL or any supported format)."),
    benchmark: str | None = typer.Option(
        None,
        "--benchmark",
        help="lm-eval tasks instead of --data: TASK[,TASK...], a task YAML or a folder of them "
        "(needs `pip install 'tunery[bench]'`); tunery_general_knowledge is bundled.",
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="--benchmark: at most N items per task."),
    output: Path = typer.Option(Path("eval"), "--output", help="Directory for eval.json / benchmark.json."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts generated together."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Default: from the references."),
    labels: str | None = typer.Option(
        None, "--labels", help="Comma-separated label set (default: detected)."
    ),
    positive_class: str | None = typer.Option(
        None, "--positive-class", help="Positive label (binary tasks)."
    ),
    beta: list[float] = typer.Option([], "--beta", help="Also report F-beta (binary tasks); repeatable."),
    train: Path | None = typer.Option(None, "--train", help="Training file for few-shot demonstrations."),
    shots: int = typer.Option(
        0, "--shots", min=0, help="Few-shot demonstrations from --train (--benchmark: the task's own)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for picking demonstrations."),
) -> None:
    """Evaluate a model by generation: exact match, classification metrics, chrF/ROUGE-L, perplexity;
    or on standard benchmarks with EleutherAI's lm-eval harness (--benchmark)."""
    from tunery.evaluate.report import render_eval
    from tunery.evaluate.run import build_few_shot, evaluate, load_conversations

    if model is None and adapter is None:
        raise TuneryError("Pass --model, --adapter, or both.")
    if benchmark is not None and data is not None:
        raise TuneryError("Pass --data (a test set) or --benchmark (lm-eval tasks), not both.")
    if benchmark is not None:
        _benchmark(model, adapter, benchmark, output, batch_size, limit, shots or None, seed)
        return
    if data is None:
        raise TuneryError("Pass --data FILE (a test set) or --benchmark TASK (lm-eval tasks).", param="data")
    if shots and train is None:
        raise TuneryError("--shots needs --train (the file demonstrations are taken from).")
    from tunery.evaluate.classify import eval_classifier_command, is_classifier

    if is_classifier(adapter):  # a classification head: probabilities, not generated labels
        eval_classifier_command(model, adapter, data, output, positive_class, beta or None)
        return
    few = build_few_shot(load_conversations(train), shots, seed) if shots and train else None
    mdl, tok = _load(model, adapter)
    res = evaluate(
        mdl,
        tok,
        data,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        labels=_labels(labels),
        positive_class=positive_class,
        betas=beta or None,
        few_shot=few,
    )
    predictions = res.pop("predictions")
    res.update({"model": model, "adapter": adapter, "data": str(data)})
    _write_json(output / "eval.json", res)
    with (output / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps({"prediction": p}, ensure_ascii=False) + "\n")
    console.print(render_eval(res, title=f"Evaluation of {adapter or model} on {data}"))
    console.print(f"Wrote [bold]{output / 'eval.json'}[/]")


def _benchmark(
    model: str | None,
    adapter: str | None,
    tasks: str,
    output: Path,
    batch_size: int,
    limit: int | None,
    shots: int | None,
    seed: int,
) -> None:
    from tunery.evaluate.benchmark import render_benchmark, require_lm_eval, resolve_tasks, split_tasks

    require_lm_eval()
    resolve_tasks(split_tasks(tasks))  # a bad path or YAML fails before the model loads
    from tunery.evaluate.benchmark import run_benchmark

    mdl, tok = _load(model, adapter)
    console.print(f"Running lm-eval on {tasks}")
    res = run_benchmark(mdl, tok, tasks, batch_size=batch_size, limit=limit, num_fewshot=shots, seed=seed)
    res.update({"model": model, "adapter": adapter, "tasks": tasks})
    _write_json(output / "benchmark.json", res)
    console.print(render_benchmark(res, title=f"lm-eval on {adapter or model}"))
    console.print(f"Wrote [bold]{output / 'benchmark.json'}[/]")


def _parse_model_arg(arg: str) -> tuple[str | None, str | None]:
    """`M`, `M:adapter_dir` or a bare saved-model dir -> (model spec, adapter dir)."""
    from tunery.generation.loading import adapter_base

    if Path(arg).is_dir() and adapter_base(arg) is not None:
        return None, arg  # a run's model dir, adapter or checkpoint: its base comes from its files
    head, sep, tail = arg.rpartition(":")
    if sep and head and Path(tail).exists():
        return head, tail
    return arg, None


@user_errors()
def compare_command(
    models: list[str] = typer.Argument(..., help="Models: M, M:ADAPTER_DIR, or a saved model dir."),
    data: Path = typer.Option(..., "--data", help="Test file."),
    train: Path | None = typer.Option(None, "--train", help="Training file: few-shot demonstrations."),
    shots: int = typer.Option(
        5, "--shots", min=0, help="Demonstrations in the few-shot baseline (0 = none)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for picking demonstrations."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens"),
    labels: str | None = typer.Option(
        None, "--labels", help="Comma-separated label set (default: detected)."
    ),
    positive_class: str | None = typer.Option(None, "--positive-class"),
    forgetting: bool = typer.Option(False, "--forgetting", help="Also report general-English perplexity."),
    forgetting_text: Path | None = typer.Option(None, "--forgetting-text", help="Plain-text reference file."),
    forgetting_benchmark: str | None = typer.Option(
        None,
        "--forgetting-benchmark",
        help="Also score each model on lm-eval tasks (names or task YAMLs; implies --forgetting), "
        "e.g. tunery_general_knowledge.",
    ),
    benchmark_limit: int | None = typer.Option(
        None, "--benchmark-limit", min=1, help="--forgetting-benchmark: at most N items per task."
    ),
    output: Path | None = typer.Option(None, "--output", help="Directory for compare.json."),
) -> None:
    """Side by side: base zero-shot, base few-shot (k examples from --train), and fine-tuned models."""
    from tunery.evaluate.report import render_compare
    from tunery.evaluate.run import build_few_shot, compare, load_conversations

    if forgetting_benchmark:  # a missing lm-eval or a bad task fails before any model loads
        from tunery.evaluate.benchmark import require_lm_eval, resolve_tasks, split_tasks

        require_lm_eval()
        resolve_tasks(split_tasks(forgetting_benchmark))
    few = build_few_shot(load_conversations(train), shots, seed) if (train and shots) else None
    rows: list[tuple[str, Any, Any, Any]] = []
    for arg in models:
        spec, adapter = _parse_model_arg(arg)
        mdl, tok = _load(spec, adapter)
        label = Path(adapter).name if adapter else str(spec)
        if adapter and label in {"model", "final"}:
            label = f"{Path(adapter).parent.name}/{label}"
        if adapter is None:
            rows.append((f"{label} zero-shot", mdl, tok, None))
            if few:
                rows.append((f"{label} {len(few)}-shot", mdl, tok, few))
        else:
            rows.append((label, mdl, tok, None))
    seen: dict[str, int] = {}
    for i, (label, *rest) in enumerate(rows):  # labels key the disagreement columns: keep them unique
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            rows[i] = (f"{label} #{seen[label]}", *rest)
    result = compare(
        rows,
        data,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        labels=_labels(labels),
        positive_class=positive_class,
        forgetting_text=forgetting_text,
        check_forgetting=forgetting,
        forgetting_benchmark=forgetting_benchmark,
        benchmark_limit=benchmark_limit,
    )
    console.print(render_compare(result))
    if output is not None:
        for r in result["rows"]:
            r.pop("predictions", None)
        _write_json(output / "compare.json", result)
        console.print(f"Wrote [bold]{output / 'compare.json'}[/]")


@user_errors()
def chat_command(
    model: str | None = typer.Option(None, "--model", help="Base model (default: the adapter's base)."),
    adapter: str | None = typer.Option(None, "--adapter", help="Saved model/adapter dir or run dir."),
    system: str | None = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, max=2.0),
    top_p: float = typer.Option(0.95, "--top-p"),
) -> None:
    """Chat in the terminal; replies stream as they are generated. /reset clears, /exit quits."""
    from tunery.generation.generate import chat_prompt, stream
    from tunery.generation.sequence import GenerationParams

    if model is None and adapter is None:
        raise TuneryError("Pass --model, --adapter, or both.")
    mdl, tok = _load(model, adapter)
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    console.print("[dim]Type a message. /reset starts over, /exit quits.[/]")
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = list(start)
            console.print("[dim]Conversation cleared.[/]")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        console.print("[bold green]assistant>[/] ", end="")
        reply = []
        try:
            for delta in stream(mdl, tok, chat_prompt(tok, messages), params):
                reply.append(delta)
                console.print(delta, end="", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            pass  # stop this reply, keep the conversation
        console.print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _read_inputs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError("input file not found", file=str(path))
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg}", file=str(path), line=line_no) from None
        if not isinstance(row, dict) or not (
            isinstance(row.get("messages"), list) or isinstance(row.get("prompt"), str)
        ):
            raise DataError(
                "each line needs 'messages' (a chat) or 'prompt' (plain text)",
                file=str(path),
                line=line_no,
                field="messages",
            )
        rows.append(row)
    return rows


@user_errors()
def generate_command(
    model: str | None = typer.Option(None, "--model", help="Base model (default: the adapter's base)."),
    adapter: str | None = typer.Option(None, "--adapter", help="Saved model/adapter dir or run dir."),
    input: Path = typer.Option(
        ..., "--input", help="JSONL: {'messages': [...]} or {'prompt': '...'} a line."
    ),
    output: Path = typer.Option(..., "--output", help="JSONL: each input row plus its completion."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=2.0),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int | None = typer.Option(None, "--seed"),
) -> None:
    """Generate completions for a file of prompts, batched (greedy by default)."""
    from rich.progress import Progress

    from tunery.generation.generate import chat_prompt, generate_batch
    from tunery.generation.sequence import GenerationParams

    if model is None and adapter is None:
        raise TuneryError("Pass --model, --adapter, or both.")
    rows = _read_inputs(input)
    mdl, tok = _load(model, adapter)
    prompts = []
    for row in rows:
        if "messages" in row:
            prompts.append(chat_prompt(tok, row["messages"], row.get("tools")))
        else:
            prompts.append(tok(row["prompt"], add_special_tokens=True)["input_ids"])
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("Generating", total=len(prompts))
        results = generate_batch(
            mdl, tok, prompts, params, batch_size=batch_size, on_done=lambda k: bar.advance(task, k)
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as f:
        for row, res in zip(rows, results, strict=True):
            out = {
                **row,
                "completion": res.text,
                "finish_reason": res.finish_reason,
                "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens},
            }
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    console.print(f"Wrote {len(results)} completions to [bold]{output}[/]")


def register(app: typer.Typer) -> None:
    """Mount the commands on the main `tunery` app."""
    app.command("eval")(eval_command)
    app.command("compare")(compare_command)
    app.command("chat")(chat_command)
    app.command("generate")(generate_command)
