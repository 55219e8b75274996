"""`tunery train` (with its torchrun launcher) and `tunery methods`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from tunery.terminal import ProgressPrinter, console, user_errors


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


@user_errors()
def train_command(
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
    from tunery.plugins import load_config
    from tunery.train import launch, run

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
    final: dict = {}  # the last logged metrics (a launched run reports through its ranks)
    if (nproc > 1 or nnodes > 1) and not launch.launched():
        status, model_dir = _launch(cfg, locals()), Path(cfg.output) / "model"
        again += f" --nproc {nproc}" + (f" --nnodes {nnodes} --node-rank {node_rank}" if nnodes > 1 else "")
    else:
        main = launch.is_main_process()
        printer = ProgressPrinter()
        try:
            result = run(cfg, subscribers=[printer] if main else [])
        finally:
            printer.close()
        status, model_dir, final = result.status, result.model_dir, result.final_metrics
        # Ranks report through the `tunery train` that launched them, and exit 0 when interrupted
        # so that torchrun does not take a clean stop for a failed rank.
        if launch.launched() and (not main or launch.under_tunery_launcher()):
            return
    if status == "interrupted":
        console.print(f"[yellow]Interrupted.[/] Checkpoint saved; continue with `{escape(again)}`")
        raise typer.Exit(130)
    console.print(f"[green]Done.[/] Model saved to [bold]{escape(str(model_dir))}[/]")
    _print_per_task(final)
    console.print(f"Chat with it:  tunery chat --adapter {model_dir}")


def _print_per_task(metrics: dict) -> None:
    """A multi-task run's last validation, task by task (`valid_loss/<task>`, `valid_accuracy/<task>`)."""
    from tunery.train.events import per_task_losses

    losses = per_task_losses(metrics)
    if not losses:
        return
    console.print(f"Validation loss {metrics['valid_loss']:.4f}, per task:")
    for task, loss in losses.items():
        acc = metrics.get(f"valid_accuracy/{task}")
        console.print(f"  {task}: loss {loss:.4f}" + (f", accuracy {acc:.1%}" if acc is not None else ""))


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
    from tunery.train import launch
    from tunery.train.run import load_and_validate

    # sys.argv is [<tunery script or .../tunery/cli/__main__.py>, "train", ...] both when run as `tunery` and
    # after main()'s re-exec as `python -m tunery.cli`; anything else (an in-process call such as
    # typer's CliRunner) has no command line to forward.
    if sys.argv[1:2] != ["train"]:
        raise ConfigError("--nproc/--nnodes need the `tunery train` command line to pass on to the ranks.")
    launch.check(cfg)
    load_and_validate(cfg, OBJECTIVES.get(cfg.objective).data_kind, cfg.objective)
    cmd = launch.launch_command(
        rank_args(sys.argv[2:]),
        nproc=params["nproc"],
        nnodes=params["nnodes"],
        node_rank=params["node_rank"],
        master_addr=params["master_addr"],
        master_port=params["master_port"],
    )
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    console.print(f"[dim]Launching {params['nproc']} processes per node on {params['nnodes']} node(s)[/]")
    return launch.launch(cmd, Path(cfg.output), main_node=params["node_rank"] == 0)


def methods_command(options: bool = typer.Option(False, "--options", help="Also list each option.")) -> None:
    """List tuning methods and objectives."""
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


def register(app: typer.Typer) -> None:
    """Mount `tunery train` and `tunery methods`."""
    app.command("train", epilog=_config_help())(train_command)
    app.command("methods")(methods_command)
