"""The model registry: models the operator registered by name (`tunery models add|pull`, or an admin
key's `POST /v1/tunery/models`), which every key may then name in chat, completions,
classifications and jobs, as it names a builtin model.

The table hangs off the job store's `Base`, so it lives in the jobs database (SQLite or PostgreSQL)
like the key aliases (`alias_store.py`). A name follows the alias rules (letters, digits, '.', '_',
'-'; never ':' nor '/'), may not be a builtin model's name, nor a name a key already uses for one of
its aliases: a registered name is resolved before a key's aliases (`serve/resolver.py`), as builtin
names are. What the registry knows of a source's files (sha256, architecture, ...) is read by
`tunery.models.registry`.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, cast

from sqlalchemy import BigInteger, Boolean, Integer, String, Table, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from tunery.errors import NotFoundError, TuneryError
from tunery.jobs.store import Store
from tunery.jobs.tables import Base, now
from tunery.models.aliases import ALIASES
from tunery.models.registry import SourceFacts, inspect_source
from tunery.serve.alias_store import ModelAlias, is_alias_name

_LOCK = threading.Lock()
_READY: weakref.WeakSet[Store] = weakref.WeakSet()  # stores whose database has the table


class RegisteredModel(Base):
    __tablename__ = "registered_models"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(1000))  # an absolute path or a hub id
    kind: Mapped[str] = mapped_column(String(16))  # local, gguf or hub
    sha256: Mapped[str] = mapped_column(String(64))  # of the weights when added
    license: Mapped[str | None] = mapped_column(String(200), nullable=True)
    chat_template: Mapped[bool] = mapped_column(Boolean, default=False)
    architecture: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    model_kind: Mapped[str] = mapped_column(String(16), default="causal-lm")
    parameters: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    context_length: Mapped[int | None] = mapped_column(Integer, nullable=True)
    added_at: Mapped[int] = mapped_column(BigInteger, default=now)


class ModelExists(TuneryError):
    code = "model_exists"
    status = 409


def check_name(name: Any) -> str:
    """A new registered model's name, refused when it breaks the alias rules or shadows a builtin."""
    if not is_alias_name(name):
        raise TuneryError(
            f"Invalid model name {str(name)[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (never ':' or '/').",
            code="invalid_model_name",
            param="name",
        )
    if name in ALIASES:
        raise TuneryError(
            f"`{name}` is a builtin model's name; a registered model may not shadow it. Pick another name.",
            code="invalid_model_name",
            param="name",
        )
    return name


def model_object(row: RegisteredModel) -> dict[str, Any]:
    return {
        "object": "tunery.registered_model",
        "name": row.name,
        "source": row.source,
        "kind": row.kind,
        "sha256": row.sha256,
        "license": row.license,
        "chat_template": bool(row.chat_template),
        "architecture": row.architecture,
        "model_type": row.model_type,
        "model_kind": row.model_kind,
        "parameters": row.parameters,
        "context_length": row.context_length,
        "added_at": row.added_at,
    }


def _not_found(name: str) -> NotFoundError:
    return NotFoundError(f"No registered model named '{name[:80]}'.", code="model_not_found", param="name")


class ModelRegistry:
    """Queries over the registered models of one `Store`."""

    def __init__(self, store: Store):
        self.store = store
        # The job store creates every table of `Base` it knows when it opens; this covers a store
        # opened before this module was imported, once per store.
        with _LOCK:
            if store not in _READY:
                Base.metadata.create_all(store.engine, tables=[cast(Table, RegisteredModel.__table__)])
                _READY.add(store)

    def find(self, name: str) -> RegisteredModel | None:
        if not is_alias_name(name):
            return None
        with self.store.tx() as s:
            return s.get(RegisteredModel, name)

    def get(self, name: str) -> RegisteredModel:
        row = self.find(name)
        if row is None:
            raise _not_found(name)
        return row

    def list(self) -> list[RegisteredModel]:
        with self.store.tx() as s:
            return list(s.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))

    def register(self, name: str, source: str) -> RegisteredModel:
        """Check the name, then the source's files (which may take a while: hashing, a GGUF
        conversion), then record it."""
        self.check_new(name)
        return self.add(name, inspect_source(source))

    def add(self, name: str, facts: SourceFacts) -> RegisteredModel:
        self.check_new(name)
        row = RegisteredModel(
            name=name,
            source=facts.source,
            kind=facts.kind,
            sha256=facts.sha256,
            license=facts.license,
            chat_template=facts.chat_template,
            architecture=facts.architecture,
            model_type=facts.model_type,
            model_kind=facts.model_kind,
            parameters=facts.parameters,
            context_length=facts.context_length,
            added_at=now(),
        )
        try:
            with self.store.tx() as s:
                s.add(row)
        except IntegrityError:  # registered by someone else since the check
            raise _exists(name) from None
        return row

    def remove(self, name: str) -> None:
        """Forget the record; the model's files are never touched."""
        with self.store.tx() as s:
            row = s.get(RegisteredModel, name) if is_alias_name(name) else None
            if row is None:
                raise _not_found(name)
            s.delete(row)

    def check_new(self, name: Any) -> str:
        """`name`, refused unless it is valid and free: not registered, not any key's alias."""
        check_name(name)
        if self.find(name) is not None:
            raise _exists(name)
        with self.store.tx() as s:
            keys = s.scalar(select(func.count()).select_from(ModelAlias).where(ModelAlias.name == name))
        if keys:
            raise TuneryError(
                f"{keys} key(s) have a model alias named `{name}`; a registered model of that name would "
                "hide it from them. Pick another name.",
                code="invalid_model_name",
                param="name",
            )
        return name


def _exists(name: str) -> ModelExists:
    return ModelExists(
        f"A model named `{name}` is registered already.",
        hint=f"Remove it first (tunery models rm {name}) or pick another name.",
        param="name",
    )
