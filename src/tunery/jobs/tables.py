"""The tables of the job service's database (`store.py` reads and writes them): API keys, files,
jobs, events, checkpoints and fine-tuned models, with the ids and clock they use.

One SQLAlchemy schema for SQLite and PostgreSQL. New columns are nullable, and `add_missing_columns`
adds them to tables an older version created; `normalize_url` picks the PostgreSQL driver.
"""

from __future__ import annotations

import hashlib
import importlib.util
import secrets
import string
import time
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

_ALPHABET = string.ascii_letters + string.digits
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused")
ACTIVE_STATUSES = ("validating_files", "queued", "running")


def new_id(prefix: str, n: int = 24) -> str:
    """A random id (`file-…`, `ftjob-…`): unguessable, so ids never leak other keys' objects."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_key() -> str:
    return "tny-" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def now() -> int:
    return int(time.time())


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings; the key itself is never stored
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # set: the key is dead


class RetiredKey(Base):
    """Hashes of keys replaced by a rotation. A rotated-away key stays dead: `ensure_key` (the
    server's --api-key at start) must not bring it back as a new admin key."""

    __tablename__ = "retired_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40))
    retired_at: Mapped[int] = mapped_column(BigInteger, default=now)


class FileRow(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="processed")
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    path: Mapped[str] = mapped_column(String(200))  # relative to the data dir, built from the id


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    model: Mapped[str] = mapped_column(String(512))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    hyperparameters: Mapped[dict] = mapped_column(JSON, default=dict)
    method: Mapped[dict] = mapped_column(JSON, default=dict)
    tunery: Mapped[dict] = mapped_column(JSON, default=dict)  # extensions: method/objective + options
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict | None] = mapped_column("metadata", JSON, nullable=True)
    output_name: Mapped[str] = mapped_column(String(700))  # the ft: name, reserved at creation
    fine_tuned_model: Mapped[str | None] = mapped_column(String(700), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    run_dir: Mapped[str] = mapped_column(String(200))  # relative to the data dir
    resume: Mapped[bool] = mapped_column(Boolean, default=False)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    events_offset: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes of events.jsonl consumed
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class EventRow(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # total order
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(10), default="message")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    model_name: Mapped[str] = mapped_column(String(720), index=True)
    path: Mapped[str] = mapped_column(String(300))  # the saved model dir, relative to the data dir


class ModelRow(Base):
    __tablename__ = "models"
    name: Mapped[str] = mapped_column(String(700), primary_key=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    base: Mapped[str] = mapped_column(String(512))  # the base model spec training started from
    path: Mapped[str] = mapped_column(String(300))  # relative to the data dir
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, default=now)


def add_missing_columns(engine: Any) -> None:
    """Add columns newer versions declare to tables an older version created (`create_all` makes
    missing tables only). New columns are nullable, so old rows stay valid."""
    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not insp.has_table(table.name):
            continue
        present = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                with engine.begin() as conn:
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def normalize_url(url: str) -> str:
    """`postgresql://` picks psycopg (v3) when it is the driver installed, as SQLAlchemy won't."""
    if url.startswith(("postgresql://", "postgres://")):
        if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg"):
            return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url
