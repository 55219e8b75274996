"""`tunery data ...`: the whole data command group, built here.

validate, synth and stats are defined in this file; `judge` (objectives/cli.py) and `from-logs`
(serve/logs_cli.py) are defined beside the code they drive and mounted here. Nothing heavy is
imported until a command runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tunery.errors import ConfigError, TuneryError
from tunery.models import load_tokenizer
from tunery.objectives.cli import judge_command
from tunery.serve.logs_cli import from_logs_command
from tunery.terminal import console, user_errors

data_app = typer.Typer(help="Check and inspect training data.", no_args_is_help=True)


@data_app.callback()
def _group() -> None:
    """Check and inspect training data."""
    # A callback keeps `data` a command group (`tunery data validate`) even with one command.


@data_app.command("validate")
def validate(
    file: str = typer.Argument(
        ..., help="Training data: .jsonl, .json, .csv, .parquet or a datasets directory."
    ),
    method: str = typer.Option(
        "supervised",
        "--method",
        "-m",
        help="supervised, dpo, reinforcement, or an objective (sft, dpo, kto, ...).",
    ),
    model: str | None = typer.Option(None, "--model", help="Count tokens with this model's tokenizer."),
    max_length: int | None = typer.Option(
        None, "--max-length", help="Count examples longer than this (default: the config's)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check FILE the way OpenAI's service does. Exit code 1 when it has errors."""
    from tunery.config import Hyperparameters
    from tunery.data.validate import validate_file
    from tunery.objectives import validation_kind

    out = Console()
    try:
        tokenizer = load_tokenizer(model) if model else None
        report = validate_file(
            file,
            method=method,
            tokenizer=tokenizer,
            max_length=max_length or Hyperparameters.model_fields["max_length"].default,
            kind=validation_kind(method),
        )
    except TuneryError as err:
        out.print(f"[bold red]Error:[/] {escape(str(err))}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        report.render(out)
    raise typer.Exit(0 if report.ok else 1)


@data_app.command("synth")
@user_errors()
def synth_command(
    seeds: str = typer.Option(..., "--seeds", help="Seed examples: chat, prompt/completion or input/output."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL to write (chat rows + provenance)."),
    task: str | None = typer.Option(None, "--task", help="What the examples should do, in words."),
    task_file: Path | None = typer.Option(None, "--task-file", help="Read the task description from a file."),
    n: int = typer.Option(100, "--n", min=1, help="Examples to keep."),
    teacher_url: str | None = typer.Option(
        None, "--teacher-url", help="OpenAI-compatible base URL (…/v1), e.g. a `tunery serve`."
    ),
    teacher_model: str | None = typer.Option(
        None, "--teacher-model", help="The teacher: a model name at --teacher-url, or a local model spec."
    ),
    adapter: str | None = typer.Option(None, "--adapter", help="Local teacher: an adapter on top."),
    api_key: str | None = typer.Option(None, "--api-key", help="Key for --teacher-url [env OPENAI_API_KEY]."),
    inputs: Path | None = typer.Option(
        None, "--inputs", help="Label mode: one input per line (text) for the teacher to answer."
    ),
    labels: str | None = typer.Option(
        None, "--labels", help="Comma-separated valid outputs (classification)."
    ),
    min_chars: int = typer.Option(1, "--min-chars", help="Drop examples shorter than this (input+output)."),
    max_chars: int = typer.Option(4000, "--max-chars", help="Drop examples longer than this."),
    near_threshold: float = typer.Option(0.8, "--near-threshold", help="Word 3-gram Jaccard for near dups."),
    judge_score: float | None = typer.Option(
        None, "--min-judge-score", help="Ask the teacher to grade 1-10 and keep examples at or above."
    ),
    temperature: float = typer.Option(0.9, "--temperature"),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    max_requests: int | None = typer.Option(None, "--max-requests", help="Stop after this many candidates."),
    system_prompt: str | None = typer.Option(None, "--system-prompt", help="System message of each row."),
    rejected: Path | None = typer.Option(None, "--rejected", help="Also write rejected candidates here."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Generate training examples with a teacher model: dedupe, filter, write JSONL with provenance."""
    from tunery.data import synth
    from tunery.generation.teacher import LocalTeacher

    if task_file is not None:
        task = task_file.read_text().strip()
    if not task:
        raise ConfigError("data synth needs --task or --task-file (what the examples should do).")
    if not teacher_model:
        raise ConfigError("data synth needs --teacher-model (a model at --teacher-url, or a local model).")
    if teacher_url:
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        teacher = synth.OpenAITeacher(teacher_url, teacher_model, key)
    else:
        with console.status(f"Loading {teacher_model}…"):
            teacher = LocalTeacher(teacher_model, adapter, seed=seed)
    input_list = None
    if inputs is not None:
        if not inputs.is_file():
            raise ConfigError(f"--inputs: file not found: {inputs}")
        input_list = [x.strip() for x in inputs.read_text().splitlines() if x.strip()]
    settings = synth.SynthSettings(
        task=task,
        n=n,
        temperature=temperature,
        max_tokens=max_tokens,
        min_chars=min_chars,
        max_chars=max_chars,
        labels=[x.strip() for x in labels.split(",")] if labels else None,
        near_threshold=near_threshold,
        min_judge_score=judge_score,
        max_requests=max_requests,
        seed=seed,
        system_prompt=system_prompt,
    )
    with console.status("Generating…"):
        result = synth.synthesize(teacher, settings, synth.read_seeds(seeds), input_list)
    synth.write_jsonl(result.rows, output)
    if rejected is not None:
        synth.write_jsonl(result.rejected, rejected)
    console.print(
        f"Kept [bold]{result.stats['kept']}[/] of {result.stats['requested']} candidates -> {output}"
    )
    for reason, count in sorted(result.stats.items()):
        if reason not in ("kept", "requested"):
            console.print(f"  rejected {reason}: {count}")


@data_app.command("stats")
@user_errors()
def stats_command(
    file: str = typer.Argument(..., help="Training data file."),
    test: str | None = typer.Option(None, "--test", help="A test/validation file: checks leakage."),
    output: Path | None = typer.Option(None, "--output", help="Write stats.json, lengths.png, lengths.txt."),
    model: str | None = typer.Option(None, "--model", help="Count tokens with this model's tokenizer."),
    threshold: float = typer.Option(0.8, "--threshold", help="Jaccard for near-duplicates and leakage."),
    as_json: bool = typer.Option(False, "--json", help="Print the stats as JSON."),
) -> None:
    """Token lengths (histogram), label balance, duplicates and train/test overlap of a data file."""
    from tunery.data.stats import data_stats

    tokenizer = load_tokenizer(model) if model else None
    s = data_stats(file, test, tokenizer, output, threshold)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    console.print(f"[bold]{escape(str(file))}[/]: {s['examples']} examples ({s['format']}, kind {s['kind']})")
    ln = s["lengths"]
    console.print(
        f"Length ({s['length_unit']}): min {ln['min']}, p50 {ln['p50']}, p95 {ln['p95']}, "
        f"max {ln['max']}, total {ln['total']}",
        highlight=False,
    )
    console.print(s["histogram_text"], highlight=False, markup=False)
    if s["labels"]:
        total = sum(s["labels"].values())
        console.print(
            "Labels: " + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in s["labels"].items()),
            highlight=False,
            markup=False,
        )
    d = s["duplicates"]
    console.print(
        f"Duplicates: {d['n_exact']} exact repeats in {len(d['exact_groups'])} groups, "
        f"{len(d['near_pairs'])} near-duplicate pairs (Jaccard >= {d['threshold']})"
    )
    for group in d["exact_groups"][:5]:
        console.print(f"  exact: lines {group}", highlight=False)
    for a, b, sim in d["near_pairs"][:5]:
        console.print(f"  near: lines {a} and {b} ({sim})", highlight=False)
    if s["test"]:
        t = s["test"]
        msg = t["leakage_message"]
        console.print(f"[bold]{escape(str(t['file']))}[/]: {t['examples']} examples")
        console.print(
            f"[yellow]{msg}[/]" if msg else "[green]No train/test overlap found.[/]", highlight=False
        )
    if output:
        console.print("Wrote " + ", ".join(s["files"]))


data_app.command("judge")(judge_command)
data_app.command("from-logs")(from_logs_command)
