"""`python -m tunery.serve [options]`: the same as `tunery serve`, without the rest of the CLI."""

import typer

from tunery.serve.cli import serve_command

if __name__ == "__main__":
    typer.run(serve_command)
