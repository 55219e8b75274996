"""The files of the job service (`Store`'s file methods): bytes beside the database under
`files/<id>`, one row each. The id is random; the user's filename is metadata only and never
touches a path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from sqlalchemy import (
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session

from tunery.errors import NotFoundError, TuneryError
from tunery.fsutil import replace_durably
from tunery.jobs.tables import FileRow, new_id, now

if TYPE_CHECKING:
    from contextlib import AbstractContextManager


def _unexpired():
    """Files whose `expires_after` has not passed (the SQL side of `get_file`'s check)."""
    return or_(FileRow.expires_at.is_(None), FileRow.expires_at > now())


class FileRecords:
    """Mixed into `Store`: saving, adopting, listing, expiring and deleting files."""

    data_dir: Path

    if TYPE_CHECKING:

        def tx(self) -> AbstractContextManager[Session]: ...

        def path(self, rel: str) -> Path: ...

    def save_file(
        self,
        owner: str,
        filename: str,
        purpose: str,
        chunks: Iterator[bytes] | BinaryIO,
        max_bytes: int | None = None,
        status: str = "processed",
    ) -> FileRow:
        """Write the bytes to a temp file, rename it into place, then insert the row."""
        file_id = new_id("file-")
        tmp = self.data_dir / "files" / ".tmp" / file_id
        size = 0
        try:
            with open(tmp, "wb") as out:
                it = iter(lambda: chunks.read(1 << 20), b"") if hasattr(chunks, "read") else chunks
                for chunk in it:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise TuneryError(
                            f"File is larger than the {max_bytes // (1 << 20)} MB limit.",
                            code="file_too_large",
                            param="file",
                        )
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            return self.adopt_file(owner, filename, purpose, tmp, file_id=file_id, status=status)
        finally:
            tmp.unlink(missing_ok=True)

    def adopt_file(
        self,
        owner: str,
        filename: str,
        purpose: str,
        tmp: Path,
        file_id: str | None = None,
        status: str = "processed",
        status_details: str | None = None,
        expires_at: int | None = None,
    ) -> FileRow:
        """Move a finished temp file into storage (atomic rename) and record it."""
        row = self.place_file(owner, filename, purpose, tmp, file_id, status, status_details, expires_at)
        try:
            with self.tx() as s:
                s.add(row)
        except Exception:
            self.path(row.path).unlink(missing_ok=True)
            raise
        return row

    def place_file(
        self,
        owner: str,
        filename: str,
        purpose: str,
        tmp: Path,
        file_id: str | None = None,
        status: str = "processed",
        status_details: str | None = None,
        expires_at: int | None = None,
    ) -> FileRow:
        """Move a finished temp file into storage and return its row, not yet recorded: the caller
        adds it in its own transaction (or removes the file if that fails)."""
        file_id = file_id or new_id("file-")
        rel = f"files/{file_id}"
        final = self.data_dir / rel
        replace_durably(tmp, final)
        return FileRow(
            id=file_id,
            owner=owner,
            bytes=final.stat().st_size,
            filename=filename,
            purpose=purpose,
            status=status,
            status_details=status_details,
            created_at=now(),
            expires_at=expires_at,
            path=rel,
        )

    def get_file(self, owner: str, file_id: str) -> FileRow:
        with self.tx() as s:
            row = s.get(FileRow, file_id)
        # An expired file is gone for every caller (API, jobs, workers) even before the sweep deletes it.
        if row is None or row.owner != owner or (row.expires_at is not None and row.expires_at <= now()):
            raise NotFoundError(f"No such File object: {file_id}", param="id")
        return row

    def list_files(self, owner: str, purpose: str | None = None, order: str = "desc") -> list[FileRow]:
        q = select(FileRow).where(FileRow.owner == owner, _unexpired())
        if purpose:
            q = q.where(FileRow.purpose == purpose)
        q = q.order_by(
            FileRow.created_at.desc() if order == "desc" else FileRow.created_at,
            FileRow.id.desc() if order == "desc" else FileRow.id,
        )
        with self.tx() as s:
            return list(s.scalars(q))

    def count_files(self, owner: str) -> int:
        with self.tx() as s:
            q = select(func.count()).select_from(FileRow).where(FileRow.owner == owner, _unexpired())
            return s.scalar(q) or 0

    def delete_expired_files(self) -> int:
        """Remove every file past its `expires_at` (rows and bytes); returns how many."""
        with self.tx() as s:
            rows = list(s.scalars(select(FileRow).where(~_unexpired())))
            for row in rows:
                s.delete(row)
        for row in rows:
            self.path(row.path).unlink(missing_ok=True)
        return len(rows)

    def storage_bytes(self, owner: str) -> int:
        """Bytes of the files a key stores (uploads and result files): its storage quota's measure."""
        with self.tx() as s:
            return int(s.scalar(select(func.sum(FileRow.bytes)).where(FileRow.owner == owner)) or 0)

    def delete_file(self, owner: str, file_id: str) -> None:
        row = self.get_file(owner, file_id)
        with self.tx() as s:
            s.delete(s.get(FileRow, file_id))
        self.path(row.path).unlink(missing_ok=True)
