"""`tunery`: the command line. Each command is a thin shell over the library's one path."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from tunery.cli_common import ProgressPrinter, console, user_errors

app = typer.Typer(
    help="Tunery: fine-tune, evaluate and serve LLMs on hardware you control.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _config_help() -> str:
    """The config keys, generated from the pydantic fields (the one source of truth)."""
    from tunery import config as c

    blocks = {
        "data": c.DataConfig,
        "hyperparameters": c.Hyperparameters,
        "distributed": c.DistributedConfig,
        "distributed.fsdp": c.FSDPConfig,
        "distributed.deepspeed": c.DeepSpeedConfig,
    }
    lines = ["Config keys (YAML, or --set key=value):\n\n"]
    for name, f in c.TuneryConfig.model_fields.items():
        if name not in blocks:
            lines.append(f"  {name}: {f.description}\n\n")
    for prefix, model in blocks.items():
        for name, f in model.model_fields.items():
            if f"{prefix}.{name}" not in blocks:  # nested blocks list their own keys
                lines.append(f"  {prefix}.{name} (default {f.default!r}): {f.description}\n\n")
    lines.append("  <method>.<option>, <objective>.<option>: see `tunery methods --options`.")
    return "".join(lines)


@app.command(epilog=_config_help())
@user_errors()
def train(
    config: Path | None = typer.Argument(None, help="YAML config file."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key: --set hyperparameters.n_epochs=1"
    ),
    model: str | None = typer.Option(None, "--model", help="Base model: alias, directory, hub id or .gguf."),
    data: str | None = typer.Option(None, "--data", help="Training file."),
    validation_data: str | None = typer.Option(None, "--validation-data", help="Validation file."),
    method: str | None = typer.Option(None, "--method", help="Tuning method (see `tunery methods`)."),
    objective: str | None = typer.Option(None, "--objective", help="Objective (default sft)."),
    output: str | None = typer.Option(None, "--output", help="Run directory."),
    init_from: str | None = typer.Option(
        None, "--init-from", help="Continue training this saved model/adapter."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's last checkpoint."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Training processes on this machine (one per GPU)."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Machines taking part (same command on each)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's index, 0 .. nnodes-1."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Address of the node-rank 0 machine."),
    master_port: int = typer.Option(29500, "--master-port", help="A free TCP port on the master machine."),
) -> None:
    """Fine-tune a model: validate data, train, checkpoint, save the model or adapter.

    --nproc N (and --nnodes/--node-rank/--master-addr/--master-port) runs the same config on N
    processes per machine under torchrun; `distributed.strategy` picks ddp, fsdp or deepspeed."""
    from tunery.config import load_config
    from tunery.train import distributed, run

    cfg = load_config(
        config,
        set_,
        {
            "model": model,
            "data.train": data,
            "data.validation": validation_data,
            "method": method,
            "objective": objective,
            "output": output,
            "init_from": init_from,
        },
    )
    if resume:
        cfg.resume = True
    again = f"tunery train {config or ''} --set output={cfg.output} --resume"
    if (nproc > 1 or nnodes > 1) and not distributed.launched():
        status, model_dir = _launch(cfg, locals()), Path(cfg.output) / "model"
        again += f" --nproc {nproc}" + (f" --nnodes {nnodes} --node-rank {node_rank}" if nnodes > 1 else "")
    else:
        main = distributed.is_main_process()
        printer = ProgressPrinter()
        try:
            result = run(cfg, subscribers=[printer] if main else [])
        finally:
            printer.close()
        status, model_dir = result.status, result.model_dir
        # Ranks report through the `tunery train` that launched them, and exit 0 when interrupted
        # so that torchrun does not take a clean stop for a failed rank.
        if distributed.launched() and (not main or distributed.under_tunery_launcher()):
            return
    if status == "interrupted":
        console.print(f"[yellow]Interrupted.[/] Checkpoint saved; continue with `{again}`")
        raise typer.Exit(130)
    console.print(f"[green]Done.[/] Model saved to [bold]{model_dir}[/]")
    console.print(f"Chat with it:  tunery chat --adapter {model_dir}")


# `train` options that configure torchrun rather than the run; each takes a value.
LAUNCHER_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def rank_args(argv: list[str]) -> list[str]:
    """The ranks' `tunery train` arguments: the user's `argv` (after `train`) minus the launcher flags.

    Forwarding the user's own arguments, not ones rebuilt from the parsed options, means a new `train`
    option reaches the ranks without being listed here."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":  # the rest is positional, even if it looks like a flag
            out += [arg, *it]
        elif arg in LAUNCHER_FLAGS:
            next(it, None)  # its value
        elif arg.split("=", 1)[0] not in LAUNCHER_FLAGS:
            out.append(arg)
    return out


def _launch(cfg, params: dict) -> str:
    """Validate here (a config or data error costs no launch), then re-run this command under torchrun
    with the same arguments minus the launcher flags."""
    from tunery.errors import ConfigError
    from tunery.objectives import OBJECTIVES
    from tunery.train import distributed
    from tunery.train.run import load_and_validate

    # sys.argv is [<tunery script or .../tunery/cli.py>, "train", ...] both when run as `tunery` and
    # after main()'s re-exec as `python -m tunery.cli`; anything else (an in-process call such as
    # typer's CliRunner) has no command line to forward.
    if sys.argv[1:2] != ["train"]:
        raise ConfigError("--nproc/--nnodes need the `tunery train` command line to pass on to the ranks.")
    distributed.check(cfg)
    load_and_validate(cfg, OBJECTIVES.get(cfg.objective).data_kind, cfg.objective)
    cmd = distributed.launch_command(
        rank_args(sys.argv[2:]),
        nproc=params["nproc"],
        nnodes=params["nnodes"],
        node_rank=params["node_rank"],
        master_addr=params["master_addr"],
        master_port=params["master_port"],
    )
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    console.print(f"[dim]Launching {params['nproc']} processes per node on {params['nnodes']} node(s)[/]")
    return distributed.launch(cmd, Path(cfg.output), main_node=params["node_rank"] == 0)


@app.command()
def methods(options: bool = typer.Option(False, "--options", help="Also list each option.")) -> None:
    """List tuning methods and objectives."""
    from rich.table import Table

    from tunery.methods import METHODS
    from tunery.objectives import OBJECTIVES

    table = Table(title="Methods")
    for col in ("method", "description", "trainable", "merges"):
        table.add_column(col)
    for name, m in METHODS.items():
        table.add_row(name, m.description, m.scale, "yes" if m.can_merge else "no")
    console.print(table)
    otable = Table(title="Objectives")
    otable.add_column("objective")
    otable.add_column("description")
    otable.add_column("data")
    for name, o in OBJECTIVES.items():
        otable.add_row(name, o.description, o.data_kind)
    console.print(otable)
    if options:
        for name, item in [*METHODS.items(), *OBJECTIVES.items()]:
            for field, f in item.options.model_fields.items():
                console.print(f"  {name}.{field} (default {f.default!r}): {f.description}")


@app.command()
@user_errors()
def quickstart(
    output: str = typer.Option("runs/quickstart", "--output", help="Where the run and results go."),
    shots: int = typer.Option(3, "--shots", help="Demonstrations in the few-shot baseline."),
    n_epochs: int = typer.Option(2, "--epochs", help="Training epochs."),
    max_train: int | None = typer.Option(None, "--max-train", help="Use only this many training examples."),
    max_test: int | None = typer.Option(None, "--max-test", help="Use only this many test examples."),
    task: str = typer.Option("sentiment", "--task", help="The bundled task (sentiment)."),
    head: bool = typer.Option(
        False, "--head", help="Also train classification heads (minilm-l6, smollm2-135m)."
    ),
) -> None:
    """The main job, offline: evaluate smollm2-135m on sentiment, fine-tune LoRA, evaluate again."""
    from tunery.errors import ConfigError
    from tunery.quickstart import QuickstartSettings, generative_row, run_quickstart

    if task != "sentiment":
        raise ConfigError(f"Unknown quickstart task {task!r}.", hint="Available: sentiment")
    settings = QuickstartSettings(
        output=output, shots=shots, n_epochs=n_epochs, max_train=max_train, max_test=max_test
    )
    summary = run_quickstart(settings, console)
    if head:
        from tunery.evaluate.classify import run_head_quickstart

        run_head_quickstart(
            console,
            output=f"{output}/heads",
            generative=generative_row(summary),
            max_train=max_train,
            max_test=max_test,
        )


def _mount() -> None:
    """Sub-commands that live with their packages (their modules import nothing heavy)."""
    from tunery import workflows_cli
    from tunery.data.cli import data_app
    from tunery.evaluate import cli as evaluate_cli
    from tunery.export import cli as export_cli
    from tunery.objectives import cli as objectives_cli
    from tunery.serve.aliases_cli import aliases_app
    from tunery.serve.cli import jobs_app, serve_command
    from tunery.serve.keys_cli import keys_app
    from tunery.serve.logs_cli import from_logs_command, logs_app
    from tunery.serve.models_cli import models_app

    evaluate_cli.register(app)
    workflows_cli.register(app, data_app)
    from tunery.evaluate import classify as classify_eval

    classify_eval.register(app)
    objectives_cli.register(app)
    objectives_cli.register_data(data_app)
    data_app.command("from-logs")(from_logs_command)
    export_cli.register(app)
    app.command("serve")(serve_command)
    app.add_typer(keys_app, name="keys")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(logs_app, name="logs")
    app.add_typer(aliases_app, name="aliases")
    app.add_typer(models_app, name="models")
    app.add_typer(data_app, name="data", help="Validate, inspect and judge training data.")


_mount()


# Commands that train in this process; they re-execute on jemalloc first (tunery/train/memory.py).
TRAINING_COMMANDS = ("train", "quickstart", "sweep")


def main() -> None:
    from tunery.quiet import quiet_libraries

    quiet_libraries()
    if len(sys.argv) > 1 and sys.argv[1] in TRAINING_COMMANDS and "--help" not in sys.argv:
        from tunery.train.memory import maybe_reexec

        maybe_reexec(sys.argv[1:])
    app(prog_name="tunery")  # also after a re-exec as `python -m tunery.cli`


if __name__ == "__main__":
    main()
