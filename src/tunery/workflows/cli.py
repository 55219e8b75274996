"""Typer commands of the workflows: `tunery quickstart`, `tunery sweep` and `tunery recommend`.
`register(app)` mounts them; nothing heavy is imported until a command runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunery.errors import ConfigError
from tunery.terminal import console, user_errors


@user_errors()
def quickstart_command(
    output: str = typer.Option("runs/quickstart", "--output", help="Where the run and results go."),
    shots: int = typer.Option(3, "--shots", help="Demonstrations in the few-shot baseline."),
    n_epochs: int = typer.Option(2, "--epochs", help="Training epochs."),
    max_train: int | None = typer.Option(None, "--max-train", help="Use only this many training examples."),
    max_test: int | None = typer.Option(None, "--max-test", help="Use only this many test examples."),
    task: str = typer.Option("sentiment", "--task", help="The bundled task: sentiment or routing."),
    model: str = typer.Option(
        "smollm2-135m", "--model", help="The base model: an alias (smollm2-135m, gemma3-270m) or a model dir."
    ),
    head: bool = typer.Option(
        False, "--head", help="Also train classification heads (minilm-l6, smollm2-135m) on sentiment."
    ),
) -> None:
    """The main job, offline: evaluate a model on a bundled task, fine-tune LoRA, evaluate again."""
    from tunery.workflows.quickstart import (
        TASKS,
        QuickstartSettings,
        generative_row,
        run_head_quickstart,
        run_quickstart,
    )

    if task not in TASKS:
        raise ConfigError(f"Unknown quickstart task {task!r}.", hint=f"Available: {', '.join(TASKS)}.")
    if head and task != "sentiment":
        raise ConfigError(
            "--head trains on the sentiment task only.", hint="Drop --head or use --task sentiment."
        )
    settings = QuickstartSettings(
        model=model,
        task=task,
        output=output,
        shots=shots,
        n_epochs=n_epochs,
        max_train=max_train,
        max_test=max_test,
    )
    summary = run_quickstart(settings, console)
    if head:
        run_head_quickstart(
            console,
            output=f"{output}/heads",
            generative=generative_row(summary),
            max_train=max_train,
            max_test=max_test,
        )


@user_errors()
def sweep_command(
    config: Path = typer.Argument(..., help="Sweep file (YAML); see docs/workflows.md."),
) -> None:
    """Run many trainings of one config (data scaling, grids, Optuna), evaluate each, pick the best."""
    from tunery.workflows.sweep import grid_points, load_spec, run_sweep

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
    from tunery.workflows.recommend import GB, parse_memory, recommend

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
            f"[bold green]method: {c.method}[/]  batch_size: {c.batch_size}  learning_rate_multiplier: "
            f"{rec.learning_rate_multiplier:g}  precision: "
            f"{c.precision}  max_length: {c.max_length}  micro_batch_tokens: {c.micro_batch_tokens}"
        )
        console.print(
            f"Estimated peak memory: {c.peak_bytes / GB:.2f} GB "
            + (f"({c.device_bytes / GB:.2f} GB on the GPU) " if rec.device == "cuda" else "")
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


def register(app: typer.Typer) -> None:
    """Mount the commands: `tunery quickstart`, `tunery sweep`, `tunery recommend`."""
    app.command("quickstart")(quickstart_command)
    app.command("sweep")(sweep_command)
    app.command("recommend")(recommend_command)
