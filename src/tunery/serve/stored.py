"""Stored chat completions (`store: true`, as OpenAI defines them), their feedback, and retention.

- `POST /v1/chat/completions` (in inference.py) asks `capture_for` whether to keep the exchange;
  `--store off|request|always` decides, with `request` (the client's `store: true`) the default.
- `GET /v1/chat/completions[/{id}[/messages]]`, `POST` and `DELETE /v1/chat/completions/{id}` are
  OpenAI's stored-completion endpoints, so the official SDK's `list / retrieve / update / delete`
  and `messages.list` work unchanged. Each key sees only its own rows: another key's id is a 404.
- `POST /v1/tunery/feedback` rates a stored completion (up/down or 1-5) and may correct its reply;
  a retrieved completion shows its feedback under the `tunery` extension field.
- A sweeper deletes completions older than `--store-max-age-days` and the oldest beyond
  `--store-max-rows`, at start and every `SWEEP_EVERY_S`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from tunery.serve.common import (
    ApiError,
    Principal,
    check_limit,
    check_metadata,
    every,
    metadata_filter,
    principal,
)
from tunery.serve.completions_store import (
    RATINGS,
    CompletionLog,
    Feedback,
    Query,
    StoredCompletion,
    feedback_object,
)

log = logging.getLogger("tunery.serve")
SWEEP_EVERY_S = 300
MAX_CORRECTED_CHARS = 65536  # a corrected reply: as long as any reply a client would train on
MAX_NOTE_CHARS = 4096
# Request fields kept with a stored completion besides messages and tools: enough to replay it.
KEPT_FIELDS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stop",
    "seed",
    "tool_choice",
    "response_format",
    "logprobs",
    "top_logprobs",
    "user",
)
_LOG_LOCK = threading.Lock()


def completion_log(state: Any) -> CompletionLog:
    """The app's `CompletionLog`, made on first use (its tables are created then if missing)."""
    with _LOG_LOCK:
        found = getattr(state, "completion_log", None)
        if found is None:
            found = state.completion_log = CompletionLog(state.store)
        return found


# ---------------------------------------------------------------------------------------------
# Capturing chat completions


@dataclass
class Capture:
    """A chat completion that will be stored once its response is complete."""

    logs: CompletionLog
    owner: str
    request: dict[str, Any]
    metadata: dict[str, str] | None
    started: float = field(default_factory=time.monotonic)

    def save(self, response: dict[str, Any]) -> None:
        """Store the exchange. A database error is logged, not raised: the client has its reply."""
        row = StoredCompletion(
            id=response["id"],
            owner=self.owner,
            model=response["model"],
            created_at=response["created"],
            request=self.request,
            response=response,
            meta=self.metadata,
            latency_ms=round((time.monotonic() - self.started) * 1000),
        )
        try:
            self.logs.add(row)
        except Exception:
            log.exception("could not store chat completion %s", row.id)


def capture_for(request: Request, who: Principal, body: dict[str, Any]) -> Capture | None:
    """Check `store` and `metadata` (always, like OpenAI) and say whether this completion is kept:
    never with `--store off`, always with `--store always`, else when the request says `store: true`."""
    store = body.get("store")
    if store is not None and not isinstance(store, bool):
        raise ApiError(400, "Invalid type for 'store': expected a boolean.", param="store")
    meta = check_metadata(body.get("metadata"))
    mode = request.app.state.settings.store_mode
    if mode == "off" or (mode == "request" and not store):
        return None
    kept = {k: body[k] for k in KEPT_FIELDS if body.get(k) is not None}
    kept["messages"] = body["messages"]
    if body.get("tools") is not None:
        kept["tools"] = body["tools"]
    return Capture(completion_log(request.app.state), who.id, kept, meta)


def tee_stream(
    chunks: Iterator[dict[str, Any]], done: Callable[[list[dict[str, Any]], dict[str, Any] | None], None]
) -> Iterator[dict[str, Any]]:
    """Pass streamed chunks through unchanged; once the last one is out, call `done(choices, usage)`
    with the choices assembled as a non-streamed response has them. A stream cut short (the client
    went away, generation failed) never calls it: only complete replies are stored."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for chunk in chunks:
        yield chunk
        usage = chunk.get("usage") or usage
        for c in chunk["choices"]:
            acc = choices.setdefault(
                c["index"],
                {
                    "index": c["index"],
                    "message": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                },
            )
            acc["message"]["content"] += c["delta"].get("content") or ""
            if c.get("logprobs"):
                acc["logprobs"] = acc["logprobs"] or {"content": [], "refusal": None}
                acc["logprobs"]["content"] += c["logprobs"].get("content") or []
            acc["finish_reason"] = c.get("finish_reason") or acc["finish_reason"]
    done([choices[i] for i in sorted(choices)], usage)


# ---------------------------------------------------------------------------------------------
# Retention


def sweep(logs: CompletionLog, max_age_days: int, max_rows: int) -> None:
    """Apply the retention limits. Never raises: a failed sweep waits for the next."""
    try:
        deleted = logs.sweep(max_age_days * 86400, max_rows)
        if deleted:
            log.info("retention: deleted %d stored chat completion(s)", deleted)
    except Exception:  # a database hiccup must not kill the server's housekeeping
        log.exception("stored completions sweep failed")


@contextlib.asynccontextmanager
async def _retention(app: Any):
    """Sweep at startup, then every `SWEEP_EVERY_S`, for as long as the server runs."""
    settings = app.state.settings
    logs = completion_log(app.state)
    async with every(SWEEP_EVERY_S, sweep, logs, settings.store_max_age_days, settings.store_max_rows):
        yield


router = APIRouter(prefix="/v1", lifespan=_retention)


# ---------------------------------------------------------------------------------------------
# The stored-completion endpoints


def completion_object(row: StoredCompletion, feedback: Feedback | None) -> dict[str, Any]:
    """A stored completion as OpenAI returns it (the response plus its `metadata`), with Tunery's
    extension field `tunery`: the latency and the feedback, if any."""
    return {
        **row.response,
        "metadata": row.meta or {},
        "tunery": {
            "latency_ms": row.latency_ms,
            "feedback": feedback_object(feedback) if feedback is not None else None,
        },
    }


def _order(order: str) -> str:
    if order not in ("asc", "desc"):
        raise ApiError(400, "Invalid value for 'order': expected asc or desc.", param="order")
    return order


def _cursor_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@router.get("/chat/completions", summary="List stored chat completions")
def list_completions(
    request: Request,
    model: str | None = None,
    after: str | None = None,
    limit: int = 20,
    order: str = "asc",
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    check_limit(limit, 100)
    wanted = metadata_filter(request)
    logs = completion_log(request.app.state)
    rows, more = logs.page(Query(who.id, model=model, metadata=wanted), after, limit, _order(order))
    feedback = logs.feedback([r.id for r in rows])
    return _cursor_page([completion_object(r, feedback.get(r.id)) for r in rows], more)


@router.get("/chat/completions/{completion_id}", summary="Retrieve a stored chat completion")
def retrieve_completion(
    completion_id: str, request: Request, who: Principal = Depends(principal)
) -> dict[str, Any]:
    logs = completion_log(request.app.state)
    row = logs.get(who.id, completion_id)
    return completion_object(row, logs.feedback([row.id]).get(row.id))


@router.post("/chat/completions/{completion_id}", summary="Update a stored chat completion's metadata")
def update_completion(
    completion_id: str,
    request: Request,
    body: dict[str, Any] = Body(...),
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    if "metadata" not in body:
        raise ApiError(400, "Missing required parameter: 'metadata'.", param="metadata")
    logs = completion_log(request.app.state)
    row = logs.set_metadata(who.id, completion_id, check_metadata(body["metadata"]))
    return completion_object(row, logs.feedback([row.id]).get(row.id))


@router.delete("/chat/completions/{completion_id}", summary="Delete a stored chat completion")
def delete_completion(
    completion_id: str, request: Request, who: Principal = Depends(principal)
) -> dict[str, Any]:
    completion_log(request.app.state).delete(who.id, completion_id)
    return {"id": completion_id, "object": "chat.completion.deleted", "deleted": True}


def message_object(completion_id: str, index: int, message: dict[str, Any]) -> dict[str, Any]:
    """A request message as OpenAI lists it: an id, and content parts kept beside their text."""
    content = message.get("content")
    parts = content if isinstance(content, list) else None
    if parts is not None:
        content = "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict))
    out = {"id": f"{completion_id}-{index}", "role": message.get("role"), "content": content}
    out.update({k: message[k] for k in ("name", "tool_calls", "tool_call_id") if k in message})
    out["content_parts"] = parts
    return out


@router.get("/chat/completions/{completion_id}/messages", summary="The messages of a stored chat completion")
def list_messages(
    completion_id: str,
    request: Request,
    after: str | None = None,
    limit: int = 20,
    order: str = "asc",
    who: Principal = Depends(principal),
) -> dict[str, Any]:
    check_limit(limit, 100)
    row = completion_log(request.app.state).get(who.id, completion_id)
    items = [message_object(row.id, i, m) for i, m in enumerate(row.request.get("messages") or [])]
    if _order(order) == "desc":
        items.reverse()
    ids = [m["id"] for m in items]
    start = ids.index(after) + 1 if after in ids else 0
    return _cursor_page(items[start : start + limit], len(items) > start + limit)


# ---------------------------------------------------------------------------------------------
# Feedback


def _rating(value: Any) -> str | int:
    if (isinstance(value, str) or type(value) is int) and value in RATINGS:
        return value
    raise ApiError(
        400,
        'Invalid value for \'rating\': expected "up", "down" or an integer score from 1 to 5.',
        param="rating",
    )


def _text(body: dict[str, Any], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise ApiError(
            400,
            f"Invalid value for '{name}': expected a string of at most {limit} characters, without NUL.",
            param=name,
        )
    return value


@router.post("/tunery/feedback", summary="Rate a stored chat completion, optionally correcting its reply")
def add_feedback(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    completion_id = body.get("completion_id")
    if not isinstance(completion_id, str) or not completion_id:
        raise ApiError(400, "Missing required parameter: 'completion_id'.", param="completion_id")
    rating = _rating(body.get("rating"))
    corrected = _text(body, "corrected", MAX_CORRECTED_CHARS)
    note = _text(body, "note", MAX_NOTE_CHARS)
    row = completion_log(request.app.state).rate(who.id, completion_id, rating, corrected, note)
    return feedback_object(row)
