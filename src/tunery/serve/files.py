"""`/v1/files`: upload (multipart, streamed to disk in chunks), list, retrieve, content, delete.

The multipart body is parsed as it arrives and the file part goes straight to a temp file in the
data dir, so an upload is never held in memory and the size limit stops it as soon as it is passed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse

from tunery.jobs.store import FileRow, new_id
from tunery.serve.common import ApiError, Principal, check_limit, page, principal

router = APIRouter(prefix="/v1")
PURPOSES = {"fine-tune", "batch", "user_data", "evals", "assistants", "vision"}

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
                        "expires_after[seconds]": {"type": "integer"},
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
    """Callbacks of python-multipart's streaming parser: fields kept in memory (they are small),
    the `file` part written to `tmp` chunk by chunk."""

    MAX_FIELD = 4096

    def __init__(self, tmp: Path, max_bytes: int):
        self.tmp, self.max_bytes = tmp, max_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.out = None
        self._headers: dict[str, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._name: str | None = None
        self._value = b""
        self.too_big = False

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
        self._headers, self._name, self._value = {}, None, b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue
        self._hname, self._hvalue = b"", b""

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            raw = params.get(b"filename", b"upload").decode("utf-8", "replace")
            # Metadata only: keep the base name for display, never use it as a path.
            self.filename = raw.replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
            self.out = open(self.tmp, "wb")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file" and self.out is not None:
            self.size += end - start
            if self.size > self.max_bytes:
                self.too_big = True
                return
            self.out.write(data[start:end])
        elif len(self._value) < self.MAX_FIELD:
            self._value += data[start:end]

    def part_end(self) -> None:
        if self._name == "file" and self.out is not None:
            self.out.flush()
            os.fsync(self.out.fileno())
            self.out.close()
        elif self._name:
            self.fields[self._name] = self._value.decode("utf-8", "replace")


@router.post("/files", openapi_extra=_UPLOAD_SCHEMA)
async def upload_file(request: Request, who: Principal = Depends(principal)) -> dict[str, Any]:
    from python_multipart.multipart import MultipartParser, parse_options_header

    state = request.app.state
    settings = state.settings
    if state.store.count_files(who.id) >= settings.max_files_per_key:
        raise ApiError(
            400,
            f"This key already has {settings.max_files_per_key} files, the server's limit. "
            "Delete some first.",
            code="files_limit_exceeded",
        )
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(
            400, "Uploads must be multipart/form-data with a 'file' and a 'purpose' field.", param="file"
        )
    max_bytes = settings.max_upload_mb * (1 << 20)
    tmp = state.store.data_dir / "files" / ".tmp" / new_id("upload-")
    up = _Upload(tmp, max_bytes)
    parser = MultipartParser(params[b"boundary"], up.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if up.too_big:
                raise ApiError(
                    413,
                    f"File is larger than the server's upload limit of {settings.max_upload_mb} MB.",
                    code="file_too_large",
                    param="file",
                )
        parser.finalize()
        if up.out is None:
            raise ApiError(400, "Missing the 'file' field.", param="file")
        if not up.out.closed:
            raise ApiError(400, "The multipart body ended inside the file part.", param="file")
        purpose = up.fields.get("purpose")
        if purpose not in PURPOSES:
            raise ApiError(
                400,
                f"Invalid value for 'purpose': {purpose!r}. Expected one of {', '.join(sorted(PURPOSES))}.",
                param="purpose",
            )
        status_details = None
        if purpose == "fine-tune":
            status_details = _check_training_upload(tmp, up.filename or "upload")
        expires = up.fields.get("expires_after[seconds]")
        if expires is not None and not expires.isdigit():
            raise ApiError(
                400,
                "expires_after[seconds] must be a whole number of seconds.",
                param="expires_after[seconds]",
            )
        row = state.store.adopt_file(
            who.id,
            up.filename or "upload",
            purpose,
            tmp,
            status_details=status_details,
            expires_at=int(time.time()) + int(expires) if expires else None,
        )
        return file_object(row)
    finally:
        if up.out is not None and not up.out.closed:
            up.out.close()
        tmp.unlink(missing_ok=True)


def _check_training_upload(path: Path, filename: str) -> str | None:
    """Refuse what can never train (not .jsonl, malformed lines); file-level checks such as the
    number of examples wait for the job, since a small file may be a validation file."""
    from tunery.serve.validation import upload_error

    if not filename.lower().endswith(".jsonl"):
        raise ApiError(
            400,
            "Invalid file format for Fine-Tuning API. Must be .jsonl",
            code="invalid_file_format",
            param="file",
        )
    err = upload_error(path, filename)
    if err is not None:
        raise ApiError(400, err["message"], code=err["code"], param="file")
    return None


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
