"""Errors a user can cause. The CLI and the API render these; tracebacks are for bugs only."""

from __future__ import annotations


class TuneryError(Exception):
    """A mistake the user can fix: a message, an optional hint, and an OpenAI-style code/param."""

    code = "tunery_error"
    status = 400

    def __init__(
        self, message: str, hint: str | None = None, *, code: str | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code:
            self.code = code
        self.param = param

    def __str__(self) -> str:
        return self.message + (f"\nHint: {self.hint}" if self.hint else "")


class ConfigError(TuneryError):
    code = "invalid_config"


class DataError(TuneryError):
    """Bad training data, located by file, line (1-based) and field where known."""

    code = "invalid_training_file"

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ):
        where = ", ".join(
            p for p in (file, f"line {line}" if line else None, f"field '{field}'" if field else None) if p
        )
        super().__init__(f"{where}: {message}" if where else message, hint, code=code, param=param)
        self.file, self.line, self.field = file, line, field


class ModelError(TuneryError):
    code = "model_not_found"
    status = 404


class NotFoundError(TuneryError):
    code = "not_found"
    status = 404


class ExecutorError(TuneryError):
    """Where jobs run cannot be used: Ray is not installed, its cluster is unreachable, or it
    refused a job."""

    code = "executor_unavailable"
