"""`POST /v1/classifications` (a Tunery extension, not part of the OpenAI API): label texts with a
model trained with `objective: classify`.

Request `{"model": name, "input": str | [str]}`; response
`{"object": "list", "model": name, "data": [{"object": "classification", "index", "label",
"probabilities": {label: p}}]}`. Models resolve like the completion endpoints (fine-tuned names,
checkpoints, local dirs); a small LRU keeps the last few classifiers loaded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.concurrency import run_in_threadpool

from tunery.evaluate.classify import is_classifier, load_classifier, predict_proba, prediction_row
from tunery.serve.common import ApiError, Principal, principal
from tunery.serve.resolver import resolve_model_name

router = APIRouter(prefix="/v1")
MAX_LOADED = 2
MAX_INPUTS = 2048
_lock = threading.Lock()


def _inputs(body: dict[str, Any]) -> list[str]:
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "'input' must be a string or a non-empty list of strings.", param="input")
    if len(texts) > MAX_INPUTS:
        raise ApiError(
            400, f"'input' has {len(texts)} texts; at most {MAX_INPUTS} per request.", param="input"
        )
    return texts


def _classifier(state: Any, spec: str | None, adapter: str | None) -> tuple[Any, Any, dict[str, Any]]:
    if adapter is None and is_classifier(spec):  # a local full fine-tune's model dir names itself
        spec, adapter = None, spec
    key = (spec, adapter)
    with _lock:  # one load at a time; requests for a loaded model only touch the LRU
        cache: OrderedDict | None = getattr(state, "classifiers", None)
        if cache is None:
            state.classifiers = cache = OrderedDict()
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        if adapter is not None and not is_classifier(adapter):
            raise ApiError(
                400,
                "This model was not trained with `objective: classify`; use /v1/chat/completions.",
                code="model_not_classifier",
                param="model",
            )
        if adapter is None and not (Path(str(spec)) / "config.json").is_file():
            raise ApiError(400, f"`{spec}` is not a classification model.", param="model")
        cache[key] = load_classifier(spec, adapter)
        while len(cache) > MAX_LOADED:
            cache.popitem(last=False)
        return cache[key]


@router.post("/classifications")
async def classifications(
    request: Request, body: dict[str, Any] = Body(...), who: Principal = Depends(principal)
) -> dict[str, Any]:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model")
    texts = _inputs(body)
    spec, rel = resolve_model_name(request, who, name)
    adapter = str(request.app.state.store.path(rel)) if rel else None
    model, tokenizer, info = await run_in_threadpool(_classifier, request.app.state, spec, adapter)
    probs = await run_in_threadpool(
        predict_proba, model, tokenizer, texts, multi_label=bool(info.get("multi_label"))
    )
    data = [
        {"object": "classification", "index": i, **prediction_row(None, p, info)} for i, p in enumerate(probs)
    ]
    return {"object": "list", "model": name, "data": data}
