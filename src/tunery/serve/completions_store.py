"""Stored chat completions and their feedback: tables and queries, in the jobs database.

The tables hang off the job store's `Base`, so they live in the same SQLite file or PostgreSQL
database and are created by the same `create_all`. Every query takes the owning key's id; only the
operator CLI (`tunery logs`) passes `owner=None` to see every key's rows. Metadata pairs are kept in
a side table as well as on the row: a `metadata[k]=v` filter is then a plain indexed comparison on
both databases, whatever characters the key holds (JSON-path filters differ between SQLite and
PostgreSQL and break on quotes and non-ASCII keys).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    delete,
    exists,
    func,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column

from tunery.errors import NotFoundError, TuneryError
from tunery.jobs.store import Store
from tunery.jobs.tables import Base, now

RATINGS = ("up", "down", 1, 2, 3, 4, 5)


class StoredCompletion(Base):
    __tablename__ = "chat_completions"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # list order, cursor
    id: Mapped[str] = mapped_column(String(64), unique=True)
    owner: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(700))
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)  # the age sweep's column
    request: Mapped[dict] = mapped_column(JSON)  # messages, tools and sampling fields as sent
    response: Mapped[dict] = mapped_column(JSON)  # the chat.completion object as returned
    meta: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    latency_ms: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        Index("ix_chat_completions_owner_seq", "owner", "seq"),
        Index("ix_chat_completions_owner_model", "owner", "model"),
    )


class CompletionMetadata(Base):
    """One row per metadata pair, for filtering (see the module docstring)."""

    __tablename__ = "chat_completion_metadata"
    completion_id: Mapped[str] = mapped_column(
        ForeignKey("chat_completions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(512))

    __table_args__ = (Index("ix_chat_completion_metadata_kv", "key", "value"),)


class Feedback(Base):
    """The latest rating of a stored completion (rating again replaces it)."""

    __tablename__ = "chat_completion_feedback"
    completion_id: Mapped[str] = mapped_column(
        ForeignKey("chat_completions.id", ondelete="CASCADE"), primary_key=True
    )
    owner: Mapped[str] = mapped_column(String(40), index=True)
    rating: Mapped[str] = mapped_column(String(8))  # "up", "down" or "1".."5"
    corrected: Mapped[str | None] = mapped_column(Text, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


TABLES = cast("list[Table]", [StoredCompletion.__table__, CompletionMetadata.__table__, Feedback.__table__])


@dataclass(frozen=True)
class Query:
    """Which stored completions a list or export wants; `owner=None` is the operator's view."""

    owner: str | None
    model: str | None = None
    metadata: dict[str, str] | None = None
    rated: bool | None = None  # True: only rated ones; False: only unrated ones
    since: int | None = None  # created at or after (unix seconds)
    until: int | None = None  # created before (unix seconds)


def rating_value(stored: str) -> str | int:
    """A rating as the API takes and shows it: "up"/"down", or the 1-5 score as an integer."""
    return int(stored) if stored.isdigit() else stored


def feedback_object(row: Feedback) -> dict[str, Any]:
    return {
        "object": "tunery.feedback",
        "completion_id": row.completion_id,
        "rating": rating_value(row.rating),
        "corrected": row.corrected,
        "note": row.note,
        "created_at": row.created_at,
    }


class CompletionLog:
    """Queries over the stored completions of one `Store`. Each opens one short transaction."""

    def __init__(self, store: Store):
        self.store = store
        # The job store creates every table of `Base` it knows when it opens; this covers a store
        # opened before this module was imported.
        Base.metadata.create_all(store.engine, tables=TABLES)

    def add(self, row: StoredCompletion) -> StoredCompletion:
        with self.store.tx() as s:
            s.add(row)
            s.flush()  # the metadata rows reference the completion's id
            s.add_all(
                CompletionMetadata(completion_id=row.id, key=k, value=v) for k, v in (row.meta or {}).items()
            )
        return row

    def get(self, owner: str | None, completion_id: str) -> StoredCompletion:
        """One stored completion of `owner`; another key's is as missing as one never stored."""
        with self.store.tx() as s:
            return _owned(s, owner, completion_id)

    def page(
        self, query: Query, after: str | None = None, limit: int = 20, order: str = "asc"
    ) -> tuple[list[StoredCompletion], bool]:
        """A page of stored completions in creation order; `after` is the last id of the previous page."""
        q = self._select(query)
        with self.store.tx() as s:
            if after:
                at = self._select(query, StoredCompletion.seq).where(StoredCompletion.id == after)
                pivot = s.scalar(at)
                if pivot is not None:  # an unknown cursor (deleted, or another key's) starts from the top
                    q = q.where(
                        StoredCompletion.seq > pivot if order == "asc" else StoredCompletion.seq < pivot
                    )
            by = StoredCompletion.seq if order == "asc" else StoredCompletion.seq.desc()
            rows = list(s.scalars(q.order_by(by).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def iterate(self, query: Query, batch: int = 500) -> Iterator[tuple[StoredCompletion, Feedback | None]]:
        """Every matching row with its feedback, oldest first, read `batch` at a time (exports of
        any size hold one batch in memory)."""
        after = None
        while True:
            rows, more = self.page(query, after=after, limit=batch)
            feedback = self.feedback([r.id for r in rows])
            yield from ((r, feedback.get(r.id)) for r in rows)
            if not more:
                return
            after = rows[-1].id

    def records(self, query: Query, max_rows: int) -> list[dict[str, Any]]:
        """Every matching row as a plain `record`, oldest first, for building datasets; more than
        `max_rows` is refused rather than read into memory."""
        out: list[dict[str, Any]] = []
        for row, fb in self.iterate(query):
            if len(out) >= max_rows:
                raise TuneryError(
                    f"More than {max_rows} stored completions match; narrow the selection "
                    "(model, metadata, since/until).",
                    code="too_many_completions",
                )
            out.append(record(row, fb))
        return out

    def count(self, owner: str | None = None) -> int:
        with self.store.tx() as s:
            q = select(func.count()).select_from(StoredCompletion).where(*_filters(Query(owner)))
            return s.scalar(q) or 0

    def _select(self, query: Query, what: Any = StoredCompletion):
        return select(what).where(*_filters(query))

    def set_metadata(self, owner: str, completion_id: str, meta: dict[str, str] | None) -> StoredCompletion:
        """Replace a completion's metadata (the only thing a stored completion lets change)."""
        with self.store.tx() as s:
            row = _owned(s, owner, completion_id)
            row.meta = meta
            s.execute(delete(CompletionMetadata).where(CompletionMetadata.completion_id == completion_id))
            s.add_all(
                CompletionMetadata(completion_id=completion_id, key=k, value=v)
                for k, v in (meta or {}).items()
            )
        return row

    def delete(self, owner: str, completion_id: str) -> None:
        with self.store.tx() as s:
            _owned(s, owner, completion_id)
            _delete_where(s, StoredCompletion.id == completion_id)

    def rate(
        self,
        owner: str | None,
        completion_id: str,
        rating: str | int,
        corrected: str | None = None,
        note: str | None = None,
    ) -> Feedback:
        """Record (or replace) the feedback on a stored completion of `owner`."""
        with self.store.tx() as s:
            row = _owned(s, owner, completion_id)
            fb = Feedback(
                completion_id=completion_id,
                owner=row.owner,
                rating=str(rating),
                corrected=corrected,
                note=note,
                created_at=now(),
            )
            s.merge(fb)
        return fb

    def feedback(self, completion_ids: list[str]) -> dict[str, Feedback]:
        if not completion_ids:
            return {}
        with self.store.tx() as s:
            rows = s.scalars(select(Feedback).where(Feedback.completion_id.in_(completion_ids)))
            return {r.completion_id: r for r in rows}

    def sweep(self, max_age_s: int | None, max_rows: int | None) -> int:
        """Delete completions older than `max_age_s`, then the oldest beyond `max_rows` (None or 0:
        no such limit), with their metadata and feedback; returns how many were deleted."""
        deleted = 0
        with self.store.tx() as s:
            if max_age_s:
                deleted += _delete_where(s, StoredCompletion.created_at < int(time.time()) - max_age_s)
            if max_rows:
                newest_dropped = s.scalar(
                    select(StoredCompletion.seq)
                    .order_by(StoredCompletion.seq.desc())
                    .offset(max_rows)
                    .limit(1)
                )
                if newest_dropped is not None:
                    deleted += _delete_where(s, StoredCompletion.seq <= newest_dropped)
        return deleted


def _owned(s: Any, owner: str | None, completion_id: str) -> StoredCompletion:
    """The completion, read in the caller's transaction, if `owner` made it (None: any key)."""
    row = s.scalar(select(StoredCompletion).where(StoredCompletion.id == completion_id))
    if row is None or (owner is not None and row.owner != owner):
        raise NotFoundError(
            f"No stored chat completion found with id '{completion_id}'.", param="completion_id"
        )
    return row


def _delete_where(s: Any, condition: Any) -> int:
    """Delete completions (and their metadata and feedback rows) matching `condition`. The children
    are deleted explicitly rather than left to ON DELETE CASCADE, which SQLite applies only with
    its foreign-keys pragma on."""
    ids = select(StoredCompletion.id).where(condition)
    s.execute(delete(CompletionMetadata).where(CompletionMetadata.completion_id.in_(ids)))
    s.execute(delete(Feedback).where(Feedback.completion_id.in_(ids)))
    return s.execute(delete(StoredCompletion).where(condition)).rowcount or 0


def _filters(query: Query) -> list[Any]:
    """The WHERE conditions of a `Query`."""
    where: list[Any] = []
    if query.owner is not None:
        where.append(StoredCompletion.owner == query.owner)
    if query.model is not None:
        where.append(StoredCompletion.model == query.model)
    for key, value in (query.metadata or {}).items():
        where.append(
            exists().where(
                CompletionMetadata.completion_id == StoredCompletion.id,
                CompletionMetadata.key == key,
                CompletionMetadata.value == value,
            )
        )
    if query.since is not None:
        where.append(StoredCompletion.created_at >= query.since)
    if query.until is not None:
        where.append(StoredCompletion.created_at < query.until)
    if query.rated is not None:
        rated = exists().where(Feedback.completion_id == StoredCompletion.id)
        where.append(rated if query.rated else ~rated)
    return where


def record(row: StoredCompletion, feedback: Feedback | None) -> dict[str, Any]:
    """One stored completion as `tunery logs show/export` write it (a JSONL line of an export)."""
    return {
        "id": row.id,
        "created_at": row.created_at,
        "model": row.model,
        "key_id": row.owner,
        "request": row.request,
        "response": row.response,
        "metadata": row.meta or {},
        "latency_ms": row.latency_ms,
        "feedback": feedback_object(feedback) if feedback is not None else None,
    }
