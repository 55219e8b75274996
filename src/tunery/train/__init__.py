"""The training loop and the one `run(config)` entry point."""

from tunery.train.run import RunResult, run

__all__ = ["RunResult", "run"]
