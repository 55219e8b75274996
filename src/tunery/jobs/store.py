"""The job service's state: API keys, files, jobs, events, checkpoints and fine-tuned models.

One SQLAlchemy schema for SQLite (the default, a file in the data dir, WAL) and PostgreSQL
(`--database-url postgresql://...`). Every write is one transaction. Only the server process
writes; workers read their job row and write nothing here (their run dir is followed instead).
The tables are in `tables.py`, the file methods in `file_records.py`.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.orm import Session, sessionmaker

from tunery.errors import NotFoundError, TuneryError
from tunery.fsutil import write_atomic
from tunery.jobs.file_records import FileRecords
from tunery.jobs.tables import (
    ApiKey,
    Base,
    CheckpointRow,
    EventRow,
    FileRow,
    Job,
    ModelRow,
    RetiredKey,
    add_missing_columns,
    hash_key,
    new_id,
    new_key,
    normalize_url,
    now,
)
from tunery.redact import scrub_paths

KEYS_STAMP = "keys.stamp"  # rewritten on every key revocation or rotation (see Store.keys_stamp)


class Store(FileRecords):
    """The repository. Methods open one short transaction each; rows come back detached."""

    def __init__(self, data_dir: str | Path, database_url: str | None = None):
        self.data_dir = Path(data_dir).resolve()
        (self.data_dir / "files" / ".tmp").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "jobs").mkdir(parents=True, exist_ok=True)
        url = normalize_url(database_url or f"sqlite:///{self.data_dir / 'tunery.db'}")
        self.url = url
        if url.startswith("sqlite"):
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # WAL lets readers proceed while the server writes
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        else:
            try:
                self.engine = create_engine(url, pool_pre_ping=True)
            except Exception as exc:  # unknown dialect or missing driver
                raise TuneryError(
                    f"Cannot use database URL {url!r}: {exc}", code="invalid_database_url"
                ) from None
        try:
            Base.metadata.create_all(self.engine)
            add_missing_columns(self.engine)
        except Exception as exc:
            raise TuneryError(
                f"Cannot open the database {url!r}: {exc}", code="database_unavailable"
            ) from None
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with self._sessions() as session, session.begin():
            yield session

    def path(self, rel: str) -> Path:
        return self.data_dir / rel

    # ---- keys
    def create_key(self, name: str, admin: bool = False, key: str | None = None) -> tuple[ApiKey, str]:
        """Store a new key (hashed) and return it with the plain key, which is shown only once."""
        key = key or new_key()
        row = ApiKey(
            id=new_id("key_", 16),
            name=name,
            key_hash=hash_key(key),
            prefix=key[:8],
            is_admin=admin,
            created_at=now(),
        )
        with self.tx() as s:
            s.add(row)
        return row, key

    def ensure_key(self, key: str, name: str = "admin", admin: bool = True) -> ApiKey | None:
        """Register the server's admin key (from --api-key) if this exact key is not stored yet.
        None when the key was revoked or rotated away: a dead key is never brought back."""
        h = hash_key(key)
        with self.tx() as s:
            found = s.scalar(select(ApiKey).where(ApiKey.key_hash == h))
            if found is not None:
                return found if found.revoked_at is None else None
            if s.get(RetiredKey, h) is not None:
                return None
        return self.create_key(name, admin=admin, key=key)[0]

    def key_for(self, key: str) -> ApiKey | None:
        """The live key with this secret, or None (unknown, revoked or rotated away)."""
        with self.tx() as s:
            return s.scalar(
                select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
            )

    def get_key(self, key_id: str) -> ApiKey | None:
        with self.tx() as s:
            return s.get(ApiKey, key_id)

    def list_keys(self) -> list[ApiKey]:
        with self.tx() as s:
            return list(s.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))

    def revoke_key(self, key_id: str) -> ApiKey:
        """Revoke a key for good; its files, jobs and models stay (an admin can still see them)."""
        with self.tx() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFoundError(f"No such API key: {key_id}", param="key_id", code="key_not_found")
            if row.revoked_at is None:
                row.revoked_at = now()
        self._keys_changed()
        return row

    def rotate_key(self, key_id: str) -> tuple[ApiKey, str]:
        """Give a key a new secret under the same id (so it keeps its files, jobs and models); the
        old secret stops working at once. Returns the row and the new plain key."""
        key = new_key()
        with self.tx() as s:
            row = s.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                raise NotFoundError(f"No such live API key: {key_id}", param="key_id", code="key_not_found")
            s.merge(RetiredKey(key_hash=row.key_hash, key_id=row.id, retired_at=now()))
            row.key_hash, row.prefix = hash_key(key), key[:8]
        self._keys_changed()
        return row, key

    def keys_stamp(self) -> tuple[int, int] | None:
        """Changes whenever a key is revoked or rotated, by any process on this data dir: servers
        compare it on each request and drop their key cache when it moved (one stat call)."""
        try:
            st = os.stat(self.data_dir / KEYS_STAMP)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _keys_changed(self) -> None:
        # A new file (new inode) each time, so two changes within one mtime tick still differ.
        write_atomic(self.data_dir / KEYS_STAMP, secrets.token_hex(8))

    # ---- jobs
    def add_job(self, job: Job, events: Sequence[tuple[str, str]] = ()) -> Job:
        with self.tx() as s:
            s.add(job)
            s.flush()
            for level, message in events:
                s.add(
                    EventRow(
                        id=new_id("ftevent-"),
                        job_id=job.id,
                        created_at=now(),
                        level=level,
                        type="message",
                        message=message,
                    )
                )
        return job

    def get_job(self, owner: str | None, job_id: str) -> Job:
        with self.tx() as s:
            job = s.get(Job, job_id)
        if job is None or (owner is not None and job.owner != owner):
            raise NotFoundError(f"Could not find fine-tune job: {job_id}", param="fine_tuning_job_id")
        return job

    def list_jobs(
        self, owner: str | None = None, statuses: tuple[str, ...] | None = None, oldest_first: bool = False
    ) -> list[Job]:
        q = select(Job)
        if owner is not None:
            q = q.where(Job.owner == owner)
        if statuses:
            q = q.where(Job.status.in_(statuses))
        q = (
            q.order_by(Job.created_at, Job.id)
            if oldest_first
            else q.order_by(Job.created_at.desc(), Job.id.desc())
        )
        with self.tx() as s:
            return list(s.scalars(q))

    def count_jobs(self, owner: str, statuses: tuple[str, ...]) -> int:
        with self.tx() as s:
            q = select(func.count()).select_from(Job).where(Job.owner == owner, Job.status.in_(statuses))
            return s.scalar(q) or 0

    def update_job(
        self,
        job_id: str,
        *,
        expect: tuple[str, ...] | None = None,
        events: Sequence[tuple[str, str]] = (),
        **fields: Any,
    ) -> Job | None:
        """Set fields (and add message events) in one transaction. With `expect`, only when the
        job's current status is one of them (returns None otherwise): a compare-and-set, so a cancel
        racing with completion cannot both win."""
        with self.tx() as s:
            job = s.get(Job, job_id, with_for_update=not self.url.startswith("sqlite"))
            if job is None or (expect is not None and job.status not in expect):
                return None
            for key, value in fields.items():
                setattr(job, key, value)
            for level, message in events:
                s.add(
                    EventRow(
                        id=new_id("ftevent-"),
                        job_id=job_id,
                        created_at=now(),
                        level=level,
                        type="message",
                        message=message,
                    )
                )
        return job

    def record_success(
        self,
        job_id: str,
        model: ModelRow,
        checkpoint: dict[str, Any],
        result_file: FileRow | None,
        events: list[tuple[str, str]],
        **fields: Any,
    ) -> Job | None:
        """Everything a finished job records, in one transaction: its model, its final checkpoint,
        its result file, its fields and closing events. A crash leaves all of it or none, and a
        second call (the server restarted before the first one returned) adds no duplicate. Only
        while the job is running or paused; otherwise (a cancel won the race) nothing is written
        and None comes back."""
        with self.tx() as s:
            job = s.get(Job, job_id, with_for_update=not self.url.startswith("sqlite"))
            if job is None or job.status not in ("running", "paused"):
                return None
            s.merge(model)
            seen = select(CheckpointRow.seq).where(
                CheckpointRow.job_id == job_id,
                CheckpointRow.model_name == checkpoint["model_name"],
                CheckpointRow.path == checkpoint["path"],
            )
            if s.scalar(seen.limit(1)) is None:
                s.add(
                    CheckpointRow(
                        id=new_id("ftckpt_"),
                        job_id=job_id,
                        owner=job.owner,
                        created_at=now(),
                        step=int(checkpoint["step"]),
                        metrics=checkpoint.get("metrics"),
                        model_name=checkpoint["model_name"],
                        path=checkpoint["path"],
                    )
                )
            if result_file is not None:
                s.add(result_file)
            for key, value in fields.items():
                setattr(job, key, value)
            for level, message in events:
                known = select(EventRow.seq).where(EventRow.job_id == job_id, EventRow.message == message)
                if s.scalar(known.limit(1)) is None:
                    s.add(
                        EventRow(
                            id=new_id("ftevent-"),
                            job_id=job_id,
                            created_at=now(),
                            level=level,
                            type="message",
                            message=message,
                        )
                    )
        return job

    # ---- events
    def ingest(
        self,
        job: Job,
        events: list[dict[str, Any]],
        checkpoints: list[dict[str, Any]],
        events_offset: int | None = None,
    ) -> None:
        """Insert events and checkpoints copied from a run dir and advance the job's read offset in
        the same transaction, so a server restart neither loses nor repeats them."""
        with self.tx() as s:
            for r in events:
                s.add(
                    EventRow(
                        id=new_id("ftevent-"),
                        job_id=job.id,
                        created_at=int(r.get("created_at") or now()),
                        level=r.get("level", "info"),
                        type=r.get("type", "message"),
                        message=scrub_paths(str(r.get("message", ""))),  # clients read events
                        data=r.get("data"),
                    )
                )
            for c in checkpoints:
                s.add(
                    CheckpointRow(
                        id=new_id("ftckpt_"),
                        job_id=job.id,
                        owner=job.owner,
                        created_at=now(),
                        step=int(c["step"]),
                        metrics=c.get("metrics"),
                        model_name=c["model_name"],
                        path=c["path"],
                    )
                )
            if events_offset is not None:
                cast(Job, s.get(Job, job.id)).events_offset = events_offset

    def list_events(
        self, job_id: str, after: str | None = None, limit: int = 20
    ) -> tuple[list[EventRow], bool]:
        """Newest first; `after` is the last event id of the previous page."""
        q = select(EventRow).where(EventRow.job_id == job_id)
        with self.tx() as s:
            if after:
                pivot = s.scalar(select(EventRow.seq).where(EventRow.id == after, EventRow.job_id == job_id))
                if pivot is not None:
                    q = q.where(EventRow.seq < pivot)
            rows = list(s.scalars(q.order_by(EventRow.seq.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def events_since(self, job_id: str, seq: int) -> list[EventRow]:
        """Oldest first, after a sequence number: for the SSE stream."""
        with self.tx() as s:
            q = select(EventRow).where(EventRow.job_id == job_id, EventRow.seq > seq).order_by(EventRow.seq)
            return list(s.scalars(q))

    def has_message(self, job_id: str, message: str) -> bool:
        with self.tx() as s:
            q = select(EventRow.seq).where(EventRow.job_id == job_id, EventRow.message == message)
            return s.scalar(q.limit(1)) is not None

    def has_event(self, job_id: str, created_at: int, message: str) -> bool:
        message = scrub_paths(message)  # as `ingest` stored it
        with self.tx() as s:
            q = select(EventRow.seq).where(
                EventRow.job_id == job_id, EventRow.created_at == created_at, EventRow.message == message
            )
            return s.scalar(q.limit(1)) is not None

    # ---- checkpoints and models
    def list_checkpoints(self, job_id: str) -> list[CheckpointRow]:
        """Newest first."""
        with self.tx() as s:
            q = select(CheckpointRow).where(CheckpointRow.job_id == job_id).order_by(CheckpointRow.seq.desc())
            return list(s.scalars(q))

    def owner_checkpoints(self, owner: str) -> list[CheckpointRow]:
        with self.tx() as s:
            q = select(CheckpointRow).where(CheckpointRow.owner == owner).order_by(CheckpointRow.seq)
            return list(s.scalars(q))

    def prune_checkpoints(self, job_id: str) -> None:
        """Drop rows of checkpoints the trainer has rotated away (it keeps the last few)."""
        with self.tx() as s:
            for row in s.scalars(select(CheckpointRow).where(CheckpointRow.job_id == job_id)):
                if not self.path(row.path).exists():
                    s.delete(row)

    def add_model(self, row: ModelRow) -> ModelRow:
        with self.tx() as s:
            s.merge(row)
        return row

    def list_models(self, owner: str) -> list[ModelRow]:
        with self.tx() as s:
            return list(
                s.scalars(select(ModelRow).where(ModelRow.owner == owner).order_by(ModelRow.created_at))
            )

    def find_model(self, owner: str, name: str) -> tuple[str, str] | None:
        """(base spec, model dir) of a fine-tuned model or checkpoint this key owns, else None."""
        with self.tx() as s:
            m = s.get(ModelRow, name)
            if m is not None and m.owner == owner:
                return m.base, m.path
            c = s.scalar(
                select(CheckpointRow)
                .where(CheckpointRow.model_name == name, CheckpointRow.owner == owner)
                .limit(1)
            )
            if c is None:
                return None
            job = cast(Job, s.get(Job, c.job_id))
            base = (job.tunery or {}).get("base_spec") or job.model
            return base, c.path

    def model_owner(self, name: str) -> str | None:
        """The key that owns the fine-tuned model or checkpoint `name` (the operator's view)."""
        with self.tx() as s:
            m = s.get(ModelRow, name)
            where = select(CheckpointRow.owner).where(CheckpointRow.model_name == name).limit(1)
            return m.owner if m is not None else s.scalar(where)

    def delete_model(self, owner: str, name: str) -> None:
        with self.tx() as s:
            m = s.get(ModelRow, name)
            if m is None or m.owner != owner:
                raise NotFoundError(
                    f"The model `{name}` does not exist or you do not have access to it.",
                    code="model_not_found",
                    param="model",
                )
            s.delete(m)
            path = m.path
            for c in s.scalars(select(CheckpointRow).where(CheckpointRow.model_name == name)):
                s.delete(c)
        # The job's run dir keeps its checkpoints; only the final model dir is removed.
        shutil.rmtree(self.path(path), ignore_errors=True)
