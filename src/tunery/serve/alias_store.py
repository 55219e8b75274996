"""Model aliases: a stable model name a key's apps call (`support-router`), pointing at one of the
key's models, which an operator switches from the old model to the new one without touching the apps.

The table hangs off the job store's `Base`, so it lives in the jobs database (SQLite or PostgreSQL)
next to the models it points at. An alias belongs to one key: its primary key is (owner, name), so
two keys may each have a `support-router` and neither sees, switches nor calls the other's. The
target is kept as the name the key gave (`ft:…`, a builtin model) and resolved on every request, so
an alias can never reach further than its key could by naming the target itself.
"""

from __future__ import annotations

import re
import threading
from typing import Any, cast

from sqlalchemy import BigInteger, String, Table, select
from sqlalchemy.orm import Mapped, mapped_column

from tunery.errors import NotFoundError, TuneryError
from tunery.jobs.store import Store
from tunery.jobs.tables import Base, now

# Letters, digits, '.', '_' and '-': never ':' (every fine-tuned model id has one) nor '/' (paths).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LOCK = threading.Lock()


class ModelAlias(Base):
    __tablename__ = "model_aliases"
    owner: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(700))  # the target, as the key named it
    previous_model: Mapped[str | None] = mapped_column(String(700), nullable=True)  # to switch back
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    updated_at: Mapped[int] = mapped_column(BigInteger, default=now)


def is_alias_name(name: Any) -> bool:
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def check_name(name: Any) -> str:
    if not is_alias_name(name):
        raise TuneryError(
            f"Invalid alias name {str(name)[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            code="invalid_alias",
            param="name",
        )
    return name


def alias_object(row: ModelAlias) -> dict[str, Any]:
    return {
        "object": "tunery.alias",
        "name": row.name,
        "model": row.model,
        "previous_model": row.previous_model,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
    }


def _not_found(name: str) -> NotFoundError:
    # The same answer for a name never set and another key's: it tells nothing about other keys.
    return NotFoundError(f"No alias named '{name[:80]}'.", code="alias_not_found", param="name")


class AliasTable:
    """Queries over the aliases of one `Store`; every one takes the owning key's id."""

    def __init__(self, store: Store):
        self.store = store
        # The job store creates every table of `Base` it knows when it opens; this covers a store
        # opened before this module was imported.
        Base.metadata.create_all(store.engine, tables=[cast(Table, ModelAlias.__table__)])

    def find(self, owner: str, name: str) -> ModelAlias | None:
        with self.store.tx() as s:
            return s.get(ModelAlias, (owner, name))

    def get(self, owner: str, name: str) -> ModelAlias:
        row = self.find(owner, name)
        if row is None:
            raise _not_found(name)
        return row

    def list(self, owner: str | None) -> list[ModelAlias]:
        """A key's aliases by name; `owner=None` is the operator's view of every key's."""
        q = select(ModelAlias).order_by(ModelAlias.owner, ModelAlias.name)
        if owner is not None:
            q = q.where(ModelAlias.owner == owner)
        with self.store.tx() as s:
            return list(s.scalars(q))

    def set(self, owner: str, name: str, model: str) -> ModelAlias:
        """Point `name` at `model` (checked by the caller), keeping the target it had as `previous_model`."""
        with self.store.tx() as s:
            row = s.get(ModelAlias, (owner, check_name(name)))
            if row is None:
                row = ModelAlias(owner=owner, name=name, model=model, created_at=now(), updated_at=now())
                s.add(row)
            elif row.model != model:  # setting the same target again keeps the one to switch back to
                row.previous_model, row.model, row.updated_at = row.model, model, now()
        return row

    def delete(self, owner: str, name: str) -> None:
        with self.store.tx() as s:
            row = s.get(ModelAlias, (owner, name))
            if row is None:
                raise _not_found(name)
            s.delete(row)


def alias_table(state: Any) -> AliasTable:
    """The app's `AliasTable`, made on first use (its table is created then if missing)."""
    with _LOCK:
        found = getattr(state, "alias_table", None)
        if found is None:
            found = state.alias_table = AliasTable(state.store)
        return found
