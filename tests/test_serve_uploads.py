"""Uploads, file expiry and the bounded evaluate/export endpoints (issue 21): limits enforced while
the body streams, training files validated once and off the event loop, `expires_after` enforced and
swept, one heavy call per key, model size caps, and temp directories that never pile up."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers.server import make_lora_adapter, register_model, running_server
from tests.helpers.tiny import chat_row
from tunery.jobs.tables import FileRow
from tunery.serve.app import create_app
from tunery.serve.common import Settings

KEY = "k"
H = {"Authorization": f"Bearer {KEY}"}
BOUNDARY = "tunery-test-boundary"
MULTIPART = {**H, "content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def _app(tmp_path: Path, **kw):
    return create_app(Settings(data_dir=tmp_path / "data", api_key=KEY, run_executor=False, **kw))


def _error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


END = f"--{BOUNDARY}--\r\n".encode()


def _stream_upload(app, chunks) -> tuple[httpx.Response, int, int]:
    """POST /v1/files with a body the app pulls chunk by chunk (httpx's ASGI transport reads the
    request lazily): returns the response, the bytes the app pulled and the bytes offered."""
    pulled = 0
    chunks = list(chunks)

    async def body():
        nonlocal pulled
        for chunk in chunks:
            pulled += len(chunk)
            yield chunk

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post("/v1/files", content=body(), headers=MULTIPART)

    resp = asyncio.run(go())
    return resp, pulled, sum(map(len, chunks))


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _upload(client, name: str, data: bytes, purpose: str = "fine-tune", headers=H, **fields):
    return client.post(
        "/v1/files", headers=headers, files={"file": (name, data)}, data={"purpose": purpose, **fields}
    )


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "data" / "files" / ".tmp").iterdir())


# ---------------------------------------------------------------------------------------------
# Limits while streaming


def test_file_size_limit_stops_the_stream(tmp_path):
    app = _app(tmp_path, max_upload_mb=1)
    chunk = b"x" * 65536
    head = _part("purpose", b"user_data") + (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'.encode()
    )
    resp, pulled, offered = _stream_upload(app, [head, *[chunk] * 320, b"\r\n", END])  # 20 MB
    _error(resp, 413, "file_too_large")
    # Refused as the limit was passed, not after reading the 20 MB the client offered.
    assert pulled <= (1 << 20) + 3 * len(chunk) and offered > 19 * (1 << 20)
    assert not list((tmp_path / "data" / "files").glob("file-*"))
    assert _leftovers(tmp_path) == []


def test_twenty_thousand_form_fields_are_refused_at_once(tmp_path):
    app = _app(tmp_path)
    fields = [_part(f"f{i}", b"v") for i in range(20_000)]
    resp, pulled, offered = _stream_upload(app, [*fields, _part("file", b"hi", "a.txt"), END])
    err = _error(resp, 400, "too_many_form_fields")
    assert "at most 8" in err["message"]
    assert pulled < offered / 100  # the tenth part was never read
    assert _leftovers(tmp_path) == []


def test_malformed_forms_get_400_in_openai_shape(tmp_path):
    with TestClient(_app(tmp_path)) as c:
        huge = _part("purpose", b"p" * 100_000) + _part("file", b"hi", "a.txt") + END
        _error(c.post("/v1/files", headers=MULTIPART, content=huge), 400, "form_field_too_large")
        two = _part("purpose", b"user_data") + _part("file", b"a", "a.txt") + _part("file", b"b", "b.txt")
        err = _error(c.post("/v1/files", headers=MULTIPART, content=two + END), 400)
        assert err["param"] == "file"
        cut = _part("purpose", b"user_data") + f"--{BOUNDARY}\r\nContent-Disposition: form-data; ".encode()
        cut += b'name="file"; filename="a.txt"\r\n\r\nno end'
        _error(c.post("/v1/files", headers=MULTIPART, content=cut), 400)
        garbage = f"--{BOUNDARY}\r\n\x00\x01 not a header\r\n\r\nbody\r\n".encode() + END
        _error(c.post("/v1/files", headers=MULTIPART, content=garbage), 400)
        for seconds in ("0", "-5", "abc", "\u00b2", "99999999999", "2592001"):
            err = _error(_upload(c, "a.txt", b"hi", "user_data", **{"expires_after[seconds]": seconds}), 400)
            assert err["param"] == "expires_after[seconds]"
        bad_anchor = {"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"}
        assert _error(_upload(c, "a.txt", b"hi", "user_data", **bad_anchor), 400)["param"] == (
            "expires_after[anchor]"
        )
        assert _leftovers(tmp_path) == []
        assert c.get("/v1/files", headers=H).json()["data"] == []


# ---------------------------------------------------------------------------------------------
# Validation of training files


def test_training_file_is_parsed_once(tmp_path, monkeypatch):
    import tunery.data.readers as readers

    reads = []
    real = readers._read_jsonl

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(readers, "_read_jsonl", counted)
    with TestClient(_app(tmp_path)) as c:
        rows = [chat_row(f"q{i}", f"a{i}") for i in range(12)]
        assert _upload(c, "train.jsonl", _jsonl(rows)).status_code == 200
        assert len(reads) == 1
        rows[4] = {"messages": [{"role": "user", "content": "no reply"}, {"content": "no role"}]}
        err = _error(_upload(c, "bad.jsonl", _jsonl(rows)), 400, "invalid_training_file")
        assert "Example 5" in err["message"]  # the line at fault
        assert len(reads) == 2


def _big_training_file(path: Path, mb: int) -> Path:
    pad = "x" * 900  # ~1 KB examples: 100k records, as a real 100 MB chat file has
    with open(path, "w") as fh:
        i = 0
        while fh.tell() < mb << 20:
            fh.write(json.dumps(chat_row(f"q{i} {pad}", f"a{i}")) + "\n")
            i += 1
    return path


@pytest.mark.slow  # heavy for the developer loop: a 100 MB upload validated
def test_healthz_answers_fast_while_100mb_validates(tmp_path):
    big = _big_training_file(tmp_path / "big.jsonl", 100)
    with running_server(tmp_path / "data", KEY) as server:
        base = f"http://127.0.0.1:{server.port}"
        result: dict = {}

        def upload():
            with open(big, "rb") as fh:
                result["resp"] = httpx.post(
                    base + "/v1/files",
                    headers=H,
                    files={"file": ("big.jsonl", fh)},
                    data={"purpose": "fine-tune"},
                    timeout=600,
                )

        thread = threading.Thread(target=upload)
        thread.start()
        latencies = []
        with httpx.Client(base_url=base, timeout=30) as client:
            while thread.is_alive():
                t0 = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.05)
        thread.join()
    assert result["resp"].status_code == 200, result["resp"].text
    assert result["resp"].json()["bytes"] == big.stat().st_size
    assert len(latencies) >= 10  # polled all along the upload and its validation
    assert max(latencies) < 0.2, sorted(latencies)[-5:]


# ---------------------------------------------------------------------------------------------
# expires_after


def test_expired_files_are_gone_and_swept(tmp_path):
    rows = _jsonl([chat_row(f"q{i}", f"a{i}") for i in range(12)])
    with TestClient(_app(tmp_path, max_files_per_key=2)) as c:
        short = _upload(
            c, "s.jsonl", rows, **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "1"}
        )
        keep = _upload(c, "k.jsonl", rows)
        short, keep = short.json(), keep.json()
        assert short["expires_at"] == short["created_at"] + 1 and keep["expires_at"] is None
        assert (tmp_path / "data" / "files" / short["id"]).exists()
        time.sleep(1.1)
        assert [f["id"] for f in c.get("/v1/files", headers=H).json()["data"]] == [keep["id"]]
        _error(c.get(f"/v1/files/{short['id']}", headers=H), 404)
        _error(c.get(f"/v1/files/{short['id']}/content", headers=H), 404)
        job = {"model": "any-model", "training_file": short["id"]}
        err = _error(c.post("/v1/fine_tuning/jobs", headers=H, json=job), 400, "invalid_training_file")
        assert err["param"] == "training_file"
        # Expired files leave the key's quota: a second file fits beside `keep` (the limit is 2).
        assert _upload(c, "n.jsonl", rows).status_code == 200
        assert not (tmp_path / "data" / "files" / short["id"]).exists()  # swept on upload

    with TestClient(_app(tmp_path)) as c:  # the startup sweep
        gone = _upload(c, "g.jsonl", rows, **{"expires_after[seconds]": "1"}).json()
    time.sleep(1.1)
    app = _app(tmp_path)
    with TestClient(app):
        with app.state.store.tx() as s:
            assert s.get(FileRow, gone["id"]) is None
        assert not (tmp_path / "data" / "files" / gone["id"]).exists()


def test_stale_temp_entries_are_removed_at_startup(tmp_path):
    tmp = tmp_path / "data" / "files" / ".tmp"
    old_export = tmp / "export-crashed" / "ft-model"
    old_export.mkdir(parents=True)
    (old_export / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp / "upload-crashed").write_bytes(b"half an upload")
    two_hours_ago = time.time() - 7200
    for path in (old_export / "model.safetensors", old_export, old_export.parent, tmp / "upload-crashed"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    (tmp / "export-running").mkdir()  # written just now: another process's export in progress
    with TestClient(_app(tmp_path)):
        assert _leftovers(tmp_path) == ["export-running"]


# ---------------------------------------------------------------------------------------------
# Bounded evaluate and export


@pytest.fixture
def two_keys(tmp_path, tiny_llama):
    """An app with two keys, each owning a fine-tuned (LoRA) model of the tiny base, and an
    uploaded evaluation file each."""
    app = _app(tmp_path)
    store = app.state.store
    _, other = store.create_key("other")
    data = tmp_path / "data"
    for key, name, seed in ((KEY, "ft:tiny:mine", 1), (other, "ft:tiny:theirs", 2)):
        adapter = make_lora_adapter(tiny_llama, tmp_path / f"adapter-{seed}", seed=seed)
        register_model(data, key, name, tiny_llama, adapter)
    return app, {"Authorization": f"Bearer {other}"}


def _eval_file(client, headers, n: int) -> str:
    rows = _jsonl([chat_row(f"What is {i} plus {i}?", str(2 * i)) for i in range(n)])
    resp = _upload(client, "eval.jsonl", rows, purpose="evals", headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


@pytest.mark.usefixtures("one_thread")
def test_evaluate_and_export_run_one_at_a_time_per_key(two_keys, tmp_path):
    app, other = two_keys
    owner = app.state.store.key_for(KEY).id

    def busy() -> bool:
        slots = getattr(app.state, "heavy_slots", None)
        return slots is not None and slots.busy(owner)

    async def scenario() -> dict:
        # One event loop, as in the server: the heavy work runs in worker threads meanwhile.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=600) as c:
            files = {}
            for name, headers, n in (("mine", H, 48), ("theirs", other, 2)):
                rows = _jsonl([chat_row(f"What is {i} plus {i}?", str(2 * i)) for i in range(n)])
                up = await c.post(
                    "/v1/files", headers=headers, files={"file": ("e.jsonl", rows)}, data={"purpose": "evals"}
                )
                files[name] = up.json()["id"]
            # Seconds of work on this CPU; the calls below come milliseconds after it started.
            body = {"file": files["mine"], "models": ["ft:tiny:mine"], "max_new_tokens": 16}
            first = asyncio.create_task(c.post("/v1/tunery/evaluate", headers=H, json=body))
            while not busy():
                assert not first.done(), first.result().text
                await asyncio.sleep(0.01)
            out = {
                "again": await c.post("/v1/tunery/evaluate", headers=H, json=body),
                "export": await c.post("/v1/tunery/export", headers=H, json={"model": "ft:tiny:mine"}),
                "theirs": await c.post(
                    "/v1/tunery/evaluate",
                    headers=other,
                    json={"file": files["theirs"], "models": ["ft:tiny:theirs"], "max_new_tokens": 4},
                ),
            }
            out["first"] = await first
            out["after"] = await c.post("/v1/tunery/export", headers=H, json={"model": "ft:tiny:mine"})
            return out

    out = asyncio.run(scenario())
    err = _error(out["again"], 429, "concurrent_requests_exceeded")
    assert err["type"] == "rate_limit_error" and "one evaluate or export per key" in err["message"]
    _error(out["export"], 429, "concurrent_requests_exceeded")  # evaluate and export share the slot
    assert out["theirs"].status_code == 200, out["theirs"].text  # another key is not held up
    assert out["first"].status_code == 200, out["first"].text
    assert [row["label"] for row in out["first"].json()["rows"]] == ["ft:tiny:mine"]
    # The slot is free again once the call has finished.
    assert out["after"].status_code == 200 and out["after"].headers["content-type"] == "application/zip"
    assert not busy()


def test_size_caps_refuse_big_models_and_long_evaluations(two_keys, tmp_path):
    app, _ = two_keys
    app.state.settings.max_eval_export_params = 1000  # the tiny model has ~100k parameters
    with TestClient(app) as c:
        file_id = _eval_file(c, H, 2)
        body = {"file": file_id, "models": ["ft:tiny:mine"]}
        err = _error(c.post("/v1/tunery/evaluate", headers=H, json=body), 400, "model_too_large")
        assert err["param"] == "models" and "1,000" in err["message"]
        _error(c.post("/v1/tunery/export", headers=H, json={"model": "ft:tiny:mine"}), 400, "model_too_large")
        err = _error(c.post("/v1/tunery/evaluate", headers=H, json={**body, "max_new_tokens": 10**6}), 400)
        assert err["param"] == "max_new_tokens"
        app.state.settings.max_eval_export_params = 0  # 0: no cap
        many = _eval_file(c, H, 2001)
        err = _error(
            c.post("/v1/tunery/evaluate", headers=H, json={**body, "file": many}), 400, "file_too_large"
        )
        assert "2001 examples" in err["message"]
    assert _leftovers(tmp_path) == []


def test_failed_export_leaves_no_temp_dir(two_keys, tmp_path):
    from tunery.jobs.tables import ModelRow

    app, _ = two_keys
    store = app.state.store
    (tmp_path / "data" / "adapters" / "broken").mkdir(parents=True)
    owner = store.key_for(KEY).id
    base = store.find_model(owner, "ft:tiny:mine")[0]
    store.add_model(
        ModelRow(name="ft:tiny:broken", owner=owner, base=base, path="adapters/broken", created_at=0)
    )
    with TestClient(app) as c:
        resp = c.post("/v1/tunery/export", headers=H, json={"model": "ft:tiny:broken", "format": "hf"})
        assert 400 <= resp.status_code < 500, resp.text
        assert _leftovers(tmp_path) == []
        # The failure released the key's slot.
        assert c.post("/v1/tunery/export", headers=H, json={"model": "ft:tiny:mine"}).status_code == 200
