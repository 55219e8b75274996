"""`tunery`: the command line. Each command is a thin shell over the library's one path.

    __init__.py  the app, and where every command group is mounted
    train.py     `tunery train` (and its torchrun launcher), `tunery methods`
    data.py      the `tunery data` group
    export.py    `tunery export` (importing `tunery.export` imports torch)

The other commands live beside the code they drive (`register(app)` in evaluate/, objectives/, serve/
and workflows/); their modules import nothing heavy, and they render user errors and progress
with `tunery/terminal.py`.
"""

from __future__ import annotations

import sys

import typer

from tunery.cli import export as export_cli
from tunery.cli import train as train_cli
from tunery.cli.data import data_app
from tunery.evaluate import classify_cli
from tunery.evaluate import cli as evaluate_cli
from tunery.objectives import cli as objectives_cli
from tunery.serve.aliases_cli import aliases_app
from tunery.serve.cli import jobs_app, serve_command
from tunery.serve.keys_cli import keys_app
from tunery.serve.logs_cli import logs_app
from tunery.serve.models_cli import models_app
from tunery.workflows import cli as workflows_cli

app = typer.Typer(
    help="Tunery: fine-tune, evaluate and serve LLMs on hardware you control.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Every command group, mounted in the order `tunery --help` lists them.
train_cli.register(app)
workflows_cli.register(app)
evaluate_cli.register(app)
classify_cli.register(app)
objectives_cli.register(app)
export_cli.register(app)
app.command("serve")(serve_command)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.add_typer(logs_app, name="logs")
app.add_typer(aliases_app, name="aliases")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data", help="Validate, inspect and judge training data.")


# Commands that train in this process; they re-execute on jemalloc first (tunery/train/memory.py).
TRAINING_COMMANDS = ("train", "quickstart", "sweep")


def main() -> None:
    from tunery.quiet import quiet_libraries

    quiet_libraries()
    if len(sys.argv) > 1 and sys.argv[1] in TRAINING_COMMANDS and "--help" not in sys.argv:
        from tunery.train.memory import maybe_reexec

        maybe_reexec(sys.argv[1:])
    app(prog_name="tunery")  # also after a re-exec as `python -m tunery.cli`
