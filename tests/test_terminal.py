"""What a command prints: a user error exactly as written, whatever brackets it quotes. Rich reads
`[...]` as markup, so unescaped, `[tool]` vanished as a style and `[/data/x]` raised MarkupError, a
traceback in place of the message."""

from __future__ import annotations

import io

import pytest
import typer
from rich.console import Console

from tunery import terminal
from tunery.errors import DataError

MESSAGE = "train.jsonl line 3: role [tool] is not allowed in messages[2]; see [/data/x] and [bold]"
HINT = "Use one of [system, user, assistant]."


def _printed_error(monkeypatch, message: str, hint: str, width: int) -> list[str]:
    """The lines a command prints for a DataError(message, hint) on a console `width` columns wide."""
    out = io.StringIO()
    monkeypatch.setattr(terminal, "err_console", Console(file=out, width=width))

    @terminal.user_errors()
    def command() -> None:
        raise DataError(message, hint=hint)

    with pytest.raises(typer.Exit):
        command()
    return out.getvalue().splitlines()


def test_a_user_error_prints_its_brackets_as_written(monkeypatch):
    assert _printed_error(monkeypatch, MESSAGE, HINT, 200) == [f"Error: {MESSAGE}", f"Hint: {HINT}"]


def test_a_user_error_never_breaks_a_long_path_across_lines(monkeypatch):
    """The terminal folds a long message; rich's own wrapping put newlines inside paths and commands
    (where depended on the path's length), so a copied path or a grep for a phrase broke."""
    path = "/tmp/pytest-of-someone/pytest-29/popen-gw0/a-rather-long-folder/prompt-tuning"
    message = f"Cannot export {path} as hf: there is nothing to merge into the base."
    hint = f"tunery export --adapter {path} --format adapter"
    assert _printed_error(monkeypatch, message, hint, 60) == [f"Error: {message}", f"Hint: {hint}"]


def test_a_run_event_prints_its_brackets_as_written():
    out = io.StringIO()
    printer = terminal.ProgressPrinter(Console(file=out, width=200))
    printer({"type": "status", "level": "info", "message": MESSAGE, "data": {}})
    printer({"type": "status", "level": "warning", "message": HINT, "data": {}})
    assert out.getvalue().splitlines() == [MESSAGE, HINT]


def test_data_validate_prints_a_bracketed_value_as_written(tmp_path):
    """The report's table and summary quote the user's own values: a role written `[/x]` came back as
    a MarkupError traceback."""
    from typer.testing import CliRunner

    from tunery.cli import app

    bad = tmp_path / "bad.jsonl"
    rows = ['{"messages": [{"role": "[/x]", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'] * 10
    bad.write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(app, ["data", "validate", str(bad)], terminal_width=200)
    assert res.exit_code != 0, res.output  # the file is invalid
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "[/x]" in res.output and "Traceback" not in res.output, res.output
