"""What every command shows on a terminal: a user error as one red message with its hint (never a
traceback), and a training run's progress bar.

It sits at the bottom with `errors.py` (it needs only rich and typer) because commands are defined
beside the code they drive, in packages of every layer; `tunery.cli` mounts them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column

from tunery.errors import TuneryError

console = Console()
err_console = Console(stderr=True)


def user_errors(exit_code: int = 2) -> Callable:
    """Decorator: a TuneryError prints as one red message with its hint, never a traceback."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except TuneryError as exc:
                # Escaped: a message quoting `[tool]` or a path like `[/data/x]` prints as written
                # (unescaped, rich took the first as a style and raised on the second). Soft-wrapped:
                # the terminal folds long lines, and a path or command in them copies whole (rich's own
                # wrapping put newlines inside them, at a width that depends on the path's length).
                plain = {"highlight": False, "soft_wrap": True}
                err_console.print(f"[bold red]Error:[/] {escape(exc.message)}", **plain)
                if exc.hint:
                    err_console.print(f"[yellow]Hint:[/] {escape(exc.hint)}", **plain)
                raise typer.Exit(exit_code) from None

        return inner

    return wrap


class ProgressPrinter:
    """Subscribes to a run's events: one rich progress bar with steps, ETA, loss, tokens/s and RSS.

    On a terminal it redraws in place; without one (CI logs, pipes) rich prints only its last state
    when the run ends, one plain line. Every column but the bar keeps its width, so on a narrow
    terminal or an 80-column log the bar shrinks (or goes) and ETA, tokens/s and RSS stay whole."""

    def __init__(self, console: Console = console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        def whole() -> Column:
            return Column(no_wrap=True)

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]training", table_column=whole()),
            BarColumn(),
            MofNCompleteColumn(table_column=whole()),
            TimeRemainingColumn(table_column=whole()),  # the ETA
            TextColumn("{task.fields[info]}", table_column=whole()),
            console=console,
            transient=False,
        )
        self.task = None

    def __call__(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event["type"] == "metrics":
            if self.task is None:
                self._start(data.get("total_steps", 0), completed=data["step"] - 1)
            info = f"loss {data['train_loss']:.4f}  {data.get('tokens_per_second', 0):.0f} tok/s"
            if data.get("rss_mb"):
                info += f"  RSS {data['rss_mb'] / 1000:.2f} GB"
            if data.get("valid_loss") is not None:
                info += f"  val {data['valid_loss']:.4f}"
            self.progress.update(self.task, completed=data["step"], info=info)
        elif "total_steps" in data and self.task is None:
            self._start(data["total_steps"])
        elif event["level"] == "error":
            return  # the command prints the error itself, with its hint
        elif event["level"] != "info" or data.get("kind") in ("checkpoint", "model"):
            message = escape(event["message"])
            self.progress.console.print(
                f"[dim]{message}[/]" if event["level"] == "info" else f"[yellow]{message}[/]"
            )
        elif self.task is None:
            self.console.print(f"[dim]{escape(event['message'])}[/]")

    def _start(self, total: int, completed: int = 0) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=completed, info="")

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
