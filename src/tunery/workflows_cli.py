"""Typer commands of the data and experiment workflows: `tunery data synth`, `tunery data stats`,
`tunery sweep` and `tunery recommend`. `register(app, data_app)` mounts them; nothing heavy is
imported until a command runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from tunery.cli_common import console, user_errors
from tunery.errors import ConfigError


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
            teacher = synth.LocalTeacher(teacher_model, adapter, seed=seed)
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

    tokenizer = None
    if model:
        from tunery.models.load import load_tokenizer

        tokenizer = load_tokenizer(model)
    s = data_stats(file, test, tokenizer, output, threshold)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    console.print(f"[bold]{file}[/]: {s['examples']} examples ({s['format']}, kind {s['kind']})")
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
        console.print(f"[bold]{t['file']}[/]: {t['examples']} examples")
        console.print(
            f"[yellow]{msg}[/]" if msg else "[green]No train/test overlap found.[/]", highlight=False
        )
    if output:
        console.print("Wrote " + ", ".join(s["files"]))


@user_errors()
def sweep_command(
    config: Path = typer.Argument(..., help="Sweep file (YAML); see docs/workflows.md."),
) -> None:
    """Run many trainings of one config (data scaling, grids, Optuna), evaluate each, pick the best."""
    from tunery.sweep import grid_points, load_spec, run_sweep

    spec = load_spec(config)
    n = (
        spec.optuna.get("n_trials", 8)
        if spec.optuna
        else len(grid_points(spec.grid)) * len(spec.data_fractions)
    )
    console.print(f"Sweep: {n} trials, metric {spec.metric}, into {spec.output}")
    result = run_sweep(spec)
    out = Path(result["output"])
    console.print((out / "sweep.md").read_text(), markup=False, highlight=False)
    best = result["best"]
    if best is None:
        console.print("[red]No trial succeeded.[/] See sweep.csv for errors.")
        raise typer.Exit(1)
    console.print(f"Best: trial {best['trial']} ({spec.metric} {best[spec.metric]}) -> {out / 'best.yaml'}")


@user_errors()
def recommend_command(
    model: str = typer.Option(..., "--model", help="Model spec: alias, HF directory, hub id or .gguf."),
    data: str = typer.Option(..., "--data", help="Training data file."),
    memory: str = typer.Option(..., "--memory", help="Memory available for training, e.g. 8GB."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: what is here)."),
    as_json: bool = typer.Option(False, "--json", help="Print the recommendation as JSON."),
) -> None:
    """Recommend method, batch size, precision and sequence length, with estimated memory and time."""
    from tunery.recommend import GB, parse_memory, recommend

    rec = recommend(model, data, parse_memory(memory), device=device)
    if as_json:
        typer.echo(json.dumps(rec.to_dict(), indent=2))
        return
    m, d = rec.model, rec.data
    console.print(
        f"Model {m['spec']}: {m['n_params_m']}M parameters, {m['n_layers']} layers. "
        f"Data: {d['examples']} examples, {d['tokens']} tokens (p50 {d['p50']}, p99 {d['p99']}).",
        highlight=False,
    )
    c = rec.chosen
    if c is None:
        console.print(f"[red]Nothing fits in {rec.memory_bytes / GB:.1f} GB.[/]")
    else:
        console.print(
            f"[bold green]method: {c.method}[/]  batch_size: {c.batch_size}  precision: "
            f"{c.precision}  max_length: {c.max_length}  micro_batch_tokens: {c.micro_batch_tokens}"
        )
        console.print(
            f"Estimated peak memory: {c.peak_bytes / GB:.2f} GB "
            + ", ".join(f"{k} {v / GB:.2f}" for k, v in c.parts.items()),
            highlight=False,
        )
        console.print(
            f"Estimated time per epoch: {c.epoch_seconds:.0f} s ({rec.device}, "
            f"{d['measured_gflops']} GFLOP/s measured)",
            highlight=False,
        )
    for reason in rec.reasons:
        console.print(f"  - {reason}", highlight=False)
    console.print("Assumptions:")
    for line in rec.to_dict()["assumptions"]:
        console.print(f"  - {line}", highlight=False, markup=False)


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    """Mount the commands: `tunery sweep`, `tunery recommend`, `tunery data synth|stats`."""
    app.command("sweep")(sweep_command)
    app.command("recommend")(recommend_command)
    data_app.command("synth")(synth_command)
    data_app.command("stats")(stats_command)
