"""`/v1/files`: upload (multipart, streamed to disk in chunks), list, retrieve, content, delete, and the
housekeeping of the files folder (expired files, stale temp files).

The multipart body is parsed as it arrives and the file part goes straight to a temp file in the
data dir, so an upload is never held in memory and the size limit stops it as soon as it is passed.
The form may hold a few small fields (`MAX_PARTS`, `MAX_FIELD_BYTES`); anything more is refused while
it streams. The bytes are fsynced and a training file is validated in a worker thread, so a large
upload never stalls the event loop (and with it every other request and SSE stream); the finished
temp file is then renamed into place atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, BinaryIO, cast

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from python_multipart.multipart import MultipartParser, parse_options_header

from tunery.jobs.store import Store
from tunery.jobs.tables import FileRow, new_id, now
from tunery.serve.common import (
    MIB,
    ApiError,
    Principal,
    check_limit,
    check_storage_quota,
    every,
    page,
    principal,
)
from tunery.serve.file_sweep import SWEEP_EVERY_S, sweep
from tunery.serve.validation import upload_error

log = logging.getLogger("tunery.serve")
PURPOSES = {"fine-tune", "batch", "user_data", "evals", "assistants", "vision"}
# The form has four fields (file, purpose, expires_after[anchor], expires_after[seconds]); a few spare.
MAX_PARTS = 8
MAX_FIELD_BYTES = 4096
# Bytes a request may send besides the file: part headers, small fields, boundaries.
FORM_OVERHEAD_BYTES = MAX_PARTS * (MAX_FIELD_BYTES + 8192)
WRITE_BATCH_BYTES = 1 << 20
# Training files this large are validated in a worker process rather than a thread (see
# _check_training_upload); at most this many at once, others wait their turn.
PROCESS_VALIDATION_BYTES = 16 * MIB
VALIDATION_PROCESSES = 2  # file bytes handed to a worker thread per disk write
MAX_EXPIRY_S = 30 * 24 * 3600  # OpenAI's longest expires_after (30 days)


@contextlib.asynccontextmanager
async def _housekeeping(app: Any):
    """Sweep at startup, then every `SWEEP_EVERY_S`, for as long as the server runs."""
    store: Store = app.state.store
    try:
        async with every(SWEEP_EVERY_S, sweep, store):
            yield
    finally:
        pool = getattr(app.state, "validation_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


router = APIRouter(prefix="/v1", lifespan=_housekeeping)

_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": sorted(PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer", "minimum": 1, "maximum": MAX_EXPIRY_S},
                    },
                }
            }
        },
    }
}


def file_object(row: FileRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": row.created_at,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": row.status_details,
        "expires_at": row.expires_at,
    }


class _Upload:
    """Callbacks of python-multipart's streaming parser: small fields kept in memory, the `file` part
    written to `tmp` chunk by chunk. Every limit raises from inside the parser, as the bytes arrive."""

    def __init__(self, tmp: Path, max_bytes: int):
        self.tmp, self.max_bytes = tmp, max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.parts = 0
        self.out: BinaryIO | None = None
        self.file_done = False
        # File bytes parsed but not yet on disk: written by a worker thread, since a write() can
        # block for a long time when the kernel throttles dirty pages, and the event loop must not.
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self._headers: dict[str, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._name: str | None = None
        self._value = b""

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.part_begin,
            "on_header_field": self.header_field,
            "on_header_value": self.header_value,
            "on_header_end": self.header_end,
            "on_headers_finished": self.headers_finished,
            "on_part_data": self.part_data,
            "on_part_end": self.part_end,
        }

    def part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ApiError(
                400,
                f"Too many form fields: an upload has at most {MAX_PARTS} "
                "(file, purpose, expires_after[anchor], expires_after[seconds]).",
                code="too_many_form_fields",
            )
        self._headers, self._name, self._value = {}, None, b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue
        self._hname, self._hvalue = b"", b""

    def headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self.out is not None:
                raise ApiError(400, "An upload holds one 'file' field.", param="file")
            raw = params.get(b"filename", b"upload").decode("utf-8", "replace")
            # Metadata only: keep the base name for display, never use it as a path.
            self.filename = raw.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
            self.out = open(self.tmp, "wb")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file" and self.out is not None:
            self.size += end - start
            if self.size > self.max_bytes:
                raise ApiError(
                    413,
                    f"File is larger than the server's upload limit of {self.max_bytes // MIB} MB.",
                    code="file_too_large",
                    param="file",
                )
            self.pending.append(data[start:end])
            self.pending_bytes += end - start
        elif len(self._value) + end - start > MAX_FIELD_BYTES:
            raise ApiError(
                400,
                f"Form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes.",
                code="form_field_too_large",
                param=self._name,
            )
        else:
            self._value += data[start:end]

    def part_end(self) -> None:
        if self._name == "file" and self.out is not None:
            self.file_done = True
        elif self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def take_pending(self) -> list[bytes]:
        chunks, self.pending, self.pending_bytes = self.pending, [], 0
        return chunks

    def write(self, chunks: list[bytes]) -> None:
        """In a worker thread: append parsed file bytes to the temp file."""
        if self.out is not None:
            self.out.writelines(chunks)

    def close(self) -> None:
        if self.out is not None and not self.out.closed:
            self.out.close()


async def _receive(request: Request, up: _Upload) -> None:
    """Stream the body through the multipart parser into `up`, counting every byte."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(
            400, "Uploads must be multipart/form-data with a 'file' and a 'purpose' field.", param="file"
        )
    parser = MultipartParser(params[b"boundary"], cast(Any, up.callbacks()))
    limit, seen = up.max_bytes + FORM_OVERHEAD_BYTES, 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:  # bytes outside the parts (a preamble or epilogue) count too
            raise ApiError(
                413,
                f"Request body is larger than the server's upload limit of {up.max_bytes // MIB} MB.",
                code="file_too_large",
                param="file",
            )
        parser.write(chunk)
        if up.pending_bytes >= WRITE_BATCH_BYTES:
            await run_in_threadpool(up.write, up.take_pending())
    parser.finalize()
    if up.out is None:
        raise ApiError(400, "Missing the 'file' field.", param="file")
    if not up.file_done:
        raise ApiError(400, "The multipart body ended inside the file part.", param="file")
    await run_in_threadpool(up.write, up.take_pending())
    up.close()


def _purpose(fields: dict[str, str]) -> str:
    purpose = fields.get("purpose")
    if purpose not in PURPOSES:
        raise ApiError(
            400,
            f"Invalid value for 'purpose': {purpose!r}. Expected one of {', '.join(sorted(PURPOSES))}.",
            param="purpose",
        )
    return purpose


def _expires_at(fields: dict[str, str]) -> int | None:
    """`expires_after` as OpenAI takes it: anchor `created_at`, and a number of seconds."""
    anchor, seconds = fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    if anchor not in (None, "created_at"):
        raise ApiError(400, "expires_after[anchor] must be 'created_at'.", param="expires_after[anchor]")
    # isascii: "²".isdigit() is True but int() refuses it.
    ok = seconds is not None and seconds.isascii() and seconds.isdigit() and len(seconds) <= 10
    if not ok or not 1 <= int(cast(str, seconds)) <= MAX_EXPIRY_S:
        raise ApiError(
            400,
            f"expires_after[seconds] must be a whole number of seconds from 1 to {MAX_EXPIRY_S} (30 days).",
            param="expires_after[seconds]",
        )
    return now() + int(cast(str, seconds))


def _check_room(request: Request, who: Principal) -> None:
    """The key's file count and storage quotas, after expired files have been let go."""
    state = request.app.state
    limit = state.settings.max_files_per_key
    if state.store.count_files(who.id) >= limit:
        raise ApiError(
            400,
            f"This key already has {limit} files, the server's limit. Delete some first.",
            code="files_limit_exceeded",
        )
    check_storage_quota(request, who)


@router.post("/files", openapi_extra=_UPLOAD_SCHEMA)
async def upload_file(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    store: Store = request.app.state.store
    await run_in_threadpool(store.delete_expired_files)  # they no longer count against the quotas
    await run_in_threadpool(_check_room, request, who)
    tmp = store.data_dir / "files" / ".tmp" / new_id("upload-")
    up = _Upload(tmp, request.app.state.settings.max_upload_mb * MIB)
    try:
        await _receive(request, up)
        purpose, expires_at = _purpose(up.fields), _expires_at(up.fields)
        filename = up.filename or "upload"
        if purpose == "fine-tune" and not filename.lower().endswith(".jsonl"):
            raise ApiError(
                400,
                "Invalid file format for Fine-Tuning API. Must be .jsonl",
                code="invalid_file_format",
                param="file",
            )
        await run_in_threadpool(_fsync, tmp)
        if purpose == "fine-tune":
            await _check_training_upload(request.app.state, tmp, filename)
        row = await run_in_threadpool(store.adopt_file, who.id, filename, purpose, tmp, expires_at=expires_at)
        return file_object(row)
    finally:
        up.close()
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _check_training_upload(state: Any, path: Path, filename: str) -> None:
    """Refuse what can never train (malformed lines, unknown roles or format); file-level checks
    such as the number of examples wait for the job, since a small file may be a validation file.

    Never on the event loop. A small file is checked in a worker thread; a large one in a worker
    process, since the records of a large file are millions of Python objects, and the garbage
    collector pauses the thread that walks them while holding the GIL: measured on a 100 MB file,
    `/healthz` waited up to 0.6 s in the thread and under 0.2 s with the process."""
    if path.stat().st_size < PROCESS_VALIDATION_BYTES:
        err = await run_in_threadpool(upload_error, path, filename)
    else:
        try:
            err = await asyncio.wrap_future(_validation_pool(state).submit(upload_error, path, filename))
        except BrokenProcessPool:  # the worker died (out of memory, killed): a fresh pool next time
            state.validation_pool = None
            raise ApiError(
                503,
                "The server could not validate this file: its validation process stopped. "
                "Try again, or upload a smaller file.",
                code="validation_unavailable",
                type="server_error",
            ) from None
    if err is not None:
        raise ApiError(400, err["message"], code=err["code"], param="file")


def _validation_pool(state: Any) -> ProcessPoolExecutor:
    """The app's validation processes, started on first use. Spawned, never forked: the server has
    threads. One task per process, so the memory a large file took goes back to the system."""
    pool = getattr(state, "validation_pool", None)
    if pool is None:
        pool = state.validation_pool = ProcessPoolExecutor(
            max_workers=VALIDATION_PROCESSES,
            mp_context=multiprocessing.get_context("spawn"),
            max_tasks_per_child=1,
        )
    return pool


# ---------------------------------------------------------------------------------------------
# List, retrieve, content, delete


@router.get("/files")
def list_files(
    request: Request,
    purpose: str | None = None,
    limit: int = 10000,
    order: str = "desc",
    after: str | None = None,
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    check_limit(limit, 10000)
    if order not in ("asc", "desc"):
        raise ApiError(400, "Invalid value for 'order': expected asc or desc.", param="order")
    rows = request.app.state.store.list_files(who.id, purpose=purpose, order=order)
    return page([file_object(r) for r in rows], after, limit, ids=True)


@router.get("/files/{file_id}")
def retrieve_file(file_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    return file_object(request.app.state.store.get_file(who.id, file_id))


@router.get("/files/{file_id}/content")
def file_content(file_id: str, request: Request, who: Principal = Depends(principal)) -> FileResponse:
    store = request.app.state.store
    row = store.get_file(who.id, file_id)
    return FileResponse(store.path(row.path), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(file_id: str, request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    request.app.state.store.delete_file(who.id, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
