"""`tunery data ...`: the data commands (mounted by the main CLI as a typer sub-app)."""

from __future__ import annotations

import typer
from rich.console import Console

from tunery.errors import TuneryError
from tunery.models import load_tokenizer

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
    from tunery.data.validate import validate_file

    console = Console()
    try:
        tokenizer = load_tokenizer(model) if model else None
        report = validate_file(file, method=method, tokenizer=tokenizer, max_length=max_length)
    except TuneryError as err:
        console.print(f"[bold red]Error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        import json

        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        report.render(console)
    raise typer.Exit(0 if report.ok else 1)
