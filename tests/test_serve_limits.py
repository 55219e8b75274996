"""Limits, auth rules and error shapes of the API, in-process (no training, no model)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tunery.errors import TuneryError
from tunery.serve.app import create_app
from tunery.serve.common import Settings

H = {"Authorization": "Bearer k"}


def _client(tmp_path, **kw) -> TestClient:
    settings = Settings(data_dir=tmp_path / "data", api_key="k", run_executor=False, **kw)
    return TestClient(create_app(settings))


def _shape(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def test_upload_size_files_per_key_and_body_limits(tmp_path):
    with _client(tmp_path, max_upload_mb=1, max_files_per_key=2, max_body_mb=1) as c:
        big = b"x" * (1024 * 1024 + 10)
        _shape(
            c.post("/v1/files", headers=H, files={"file": ("a.bin", big)}, data={"purpose": "user_data"}),
            413,
            "file_too_large",
        )
        assert list((tmp_path / "data" / "files").glob("file-*")) == []  # nothing half-written is kept
        assert not list((tmp_path / "data" / "files" / ".tmp").iterdir())
        err = _shape(
            c.post("/v1/files", headers=H, files={"file": ("x.txt", b"hi")}, data={"purpose": "nope"}), 400
        )
        assert err["param"] == "purpose"
        for i in range(2):
            ok = c.post(
                "/v1/files", headers=H, files={"file": (f"{i}.txt", b"hi")}, data={"purpose": "user_data"}
            )
            assert ok.status_code == 200
        _shape(
            c.post("/v1/files", headers=H, files={"file": ("3.txt", b"hi")}, data={"purpose": "user_data"}),
            400,
            "files_limit_exceeded",
        )
        _shape(
            c.post(
                "/v1/chat/completions", headers=H, content=b"{" + b" " * (1024 * 1024 + 1) + b"}", params={}
            ),
            413,
            "request_too_large",
        )


def test_auth_errors_and_shapes(tmp_path):
    with _client(tmp_path) as c:
        err = _shape(c.get("/v1/models"), 401, "invalid_api_key")
        assert "didn't provide an API key" in err["message"]
        _shape(c.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
        _shape(c.get("/v1/files/file-missing", headers=H), 404)
        _shape(c.post("/v1/fine_tuning/jobs", headers=H, content=b"{not json", params={}), 400)
        _shape(c.post("/v1/fine_tuning/jobs", headers=H, json={"training_file": "file-x"}), 400)
        _shape(
            c.post(
                "/v1/chat/completions",
                headers=H,
                json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            ),
            404,
            "model_not_found",
        )
        _shape(
            c.post(
                "/v1/chat/completions",
                headers=H,
                json={"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "hi"}]},
            ),
            400,
        )
        assert c.get("/healthz").json()["status"] == "ok"
        _shape(c.get("/openapi.json"), 401, "invalid_api_key")  # the schema needs a key too
        schema = c.get("/openapi.json", headers=H).json()
        for path in (
            "/v1/files",
            "/v1/fine_tuning/jobs",
            "/v1/fine_tuning/jobs/{job_id}/events",
            "/v1/models",
            "/v1/chat/completions",
            "/v1/completions",
        ):
            assert path in schema["paths"]
        assert "multipart/form-data" in schema["paths"]["/v1/files"]["post"]["requestBody"]["content"]


def test_no_auth_only_on_loopback(tmp_path):
    with pytest.raises(TuneryError, match="only allowed when bound to loopback"):
        Settings(data_dir=tmp_path, host="0.0.0.0", no_auth=True)
    with TestClient(
        create_app(Settings(data_dir=tmp_path / "d", host="127.0.0.1", no_auth=True, run_executor=False)),
        base_url="http://127.0.0.1",  # --no-auth answers loopback Host names only
    ) as c:
        assert c.get("/v1/models").status_code == 200
