"""A shared server against a hostile key holder: what a request may name, and what a worker may see.

Each test is an attack from issue #21 (holes 1 and 2). Most run in-process (no executor, no model);
one real server trains a tiny RLAIF job against a judge endpoint the operator registered, with a
loopback listener standing in for the judge.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tunery.jobs.worker_env import worker_env
from tunery.serve.app import create_app
from tunery.serve.common import Settings

ADMIN = "admin-key-0123456789"
SECRETS = {
    "HF_TOKEN": "hf-secret-token",
    "AWS_ACCESS_KEY_ID": "AKIA-secret",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
    "GOOGLE_APPLICATION_CREDENTIALS": "/secret/gcp.json",
    "OPENAI_API_KEY": "sk-openai-secret",
}
CHAT = [
    {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
    for i in range(12)
]


class Listener:
    """A tiny OpenAI-compatible judge on loopback that records every request it gets."""

    def __init__(self, on_request=None):
        self.requests: list[dict] = []
        self.on_request = on_request
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append({"path": self.path, "headers": headers, "body": body})
                if outer.on_request is not None:
                    outer.on_request()
                reply = {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": "judge",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "7"},
                            "finish_reason": "stop",
                        }
                    ],
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _app(tmp_path: Path, **kw) -> TestClient:
    settings = Settings(data_dir=tmp_path / "data", api_key=ADMIN, run_executor=False, **kw)
    return TestClient(create_app(settings))


def _h(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _upload(c: TestClient, key: str = ADMIN, rows: list[dict] = CHAT) -> str:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    resp = c.post(
        "/v1/files", headers=_h(key), files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def _bob(c: TestClient) -> str:
    _, key = c.app.state.store.create_key("bob")
    return key


def _model_dir(path: Path) -> Path:
    """A directory that looks like a model to the server (a config.json), without weights."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _job(c: TestClient, file_id: str, key: str = ADMIN, model: str = "smollm2-135m", **tunery):
    body = {"model": model, "training_file": file_id, "hyperparameters": {"n_epochs": 1}}
    if tunery:
        body["tunery"] = tunery
    return c.post("/v1/fine_tuning/jobs", headers=_h(key), json=body)


def _refused(resp, status: int, code: str, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---------------------------------------------------------------------------------------------
# Local models: off by default once keys share the server


def test_local_models_default_off_with_keys_on_for_no_auth(tmp_path):
    assert Settings(data_dir=tmp_path, api_key=ADMIN).allow_local_models is False
    assert Settings(data_dir=tmp_path, no_auth=True).allow_local_models is True
    assert Settings(data_dir=tmp_path, api_key=ADMIN, allow_local_models=True).allow_local_models is True


def test_absolute_model_paths_refused_everywhere_when_local_models_are_off(tmp_path):
    model = str(_model_dir(tmp_path / "some-model"))
    with _app(tmp_path) as c:
        file_id = _upload(c)
        _refused(_job(c, file_id, model=model), 404, "model_not_found", "model")
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        _refused(c.post("/v1/chat/completions", headers=_h(), json=chat), 404, "model_not_found")
        _refused(
            c.post("/v1/completions", headers=_h(), json={"model": model, "prompt": "hi"}),
            404,
            "model_not_found",
        )
        _refused(
            c.post("/v1/classifications", headers=_h(), json={"model": model, "input": "hi"}),
            404,
            "model_not_found",
        )
        est = {"model": model, "n_examples": 10}
        _refused(c.post("/v1/tunery/estimate", headers=_h(), json=est), 404, "model_not_found")
        ev = {"models": [model], "file": file_id}
        _refused(c.post("/v1/tunery/evaluate", headers=_h(), json=ev), 404, "model_not_found")
        assert c.get("/v1/fine_tuning/jobs", headers=_h()).json()["data"] == []


def test_not_found_does_not_reveal_which_paths_exist(tmp_path):
    # Same last component: error messages may shorten paths to it (`…/model`).
    existing = _model_dir(tmp_path / "real" / "model")
    missing = tmp_path / "missing" / "model"
    with _app(tmp_path) as c:
        file_id = _upload(c)

        def answers(name: str) -> list[str]:
            chat = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            out = [c.post("/v1/chat/completions", headers=_h(), json=chat)]
            out.append(_job(c, file_id, distill={"teacher": name}, objective="distill"))
            for resp in out:
                assert resp.status_code == 404, resp.text
            # Messages may shorten a path to its last component; either way it stands for NAME.
            short = "…/" + name.rsplit("/", 1)[-1]
            return [r.json()["error"]["message"].replace(short, "NAME").replace(name, "NAME") for r in out]

        assert answers(str(existing)) == answers(str(missing))
        assert answers("/etc") == answers(str(tmp_path / "nothing" / "etc"))  # a directory, not a model
        for text in answers(str(existing)):
            assert str(tmp_path / "data") not in text


# ---------------------------------------------------------------------------------------------
# Every name in a job's option blocks goes through the resolver


@pytest.mark.parametrize(
    ("tunery", "param"),
    [
        ({"objective": "distill", "distill": {"teacher": "/srv/any-dir"}}, "tunery.distill.teacher"),
        (
            {
                "objective": "distill",
                "distill": {"teacher": "smollm2-135m", "teacher_adapter": "../../../../../etc"},
            },
            "tunery.distill.teacher_adapter",
        ),
        (
            {"objective": "distill", "distill": {"teacher": "HuggingFaceTB/SmolLM2-135M"}},
            "tunery.distill.teacher",
        ),
        ({"objective": "grpo", "grpo": {"reward_model": "/etc"}}, "tunery.grpo.reward_model"),
        (
            {"objective": "rlaif", "rlaif": {"reward_model": "jobs/ftjob-x/model"}},
            "tunery.rlaif.reward_model",
        ),
        ({"objective": "rlaif", "rlaif": {"judge": {"model": "/srv/judge"}}}, "tunery.rlaif.judge.model"),
        (
            {"objective": "rlaif", "rlaif": {"judge": {"model": "smollm2-135m", "adapter": "/tmp"}}},
            "tunery.rlaif.judge.adapter",
        ),
    ],
)
def test_job_fields_naming_server_paths_are_refused(tmp_path, tunery, param):
    with _app(tmp_path) as c:
        file_id = _upload(c)
        _refused(_job(c, file_id, **tunery), 404, "model_not_found", param)
        assert c.get("/v1/fine_tuning/jobs", headers=_h()).json()["data"] == []


def test_judge_template_must_be_an_owned_file(tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text("{prompt} {completion}")
    with _app(tmp_path) as c:
        file_id = _upload(c)
        judge = {"model": "smollm2-135m", "template": str(template)}
        _refused(_job(c, file_id, objective="rlaif", rlaif={"judge": judge}), 404, "file_not_found")
        bob = _bob(c)
        theirs = {"model": "smollm2-135m", "template": file_id}  # the admin's file, named by bob
        _refused(
            _job(c, _upload(c, bob), bob, objective="rlaif", rlaif={"judge": theirs}), 404, "file_not_found"
        )
        ours = {"model": "smollm2-135m", "template": file_id}
        assert _job(c, file_id, objective="rlaif", rlaif={"judge": ours}).status_code == 200


def test_another_tenants_job_dir_is_refused_even_with_local_models_on(tmp_path):
    with _app(tmp_path, allow_local_models=True) as c:
        store = c.app.state.store
        theirs = _model_dir(store.data_dir / "jobs" / "ftjob-admin" / "model")
        bob = _bob(c)
        file_id = _upload(c, bob)
        for name in (str(theirs), str(theirs / ".." / "model"), "jobs/ftjob-admin/model"):
            _refused(_job(c, file_id, bob, model=name), 404, "model_not_found", "model")
            distill = {"teacher": "smollm2-135m", "teacher_adapter": name}
            _refused(_job(c, file_id, bob, objective="distill", distill=distill), 404, "model_not_found")
            chat = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            _refused(c.post("/v1/chat/completions", headers=_h(bob), json=chat), 404, "model_not_found")
        # A path the operator allowed, outside the data dir, is still accepted.
        outside = _model_dir(tmp_path / "operator-model")
        assert _job(c, file_id, bob, model=str(outside)).status_code == 200


def test_ft_model_as_teacher_resolves_to_its_owners_dir_only(tmp_path):
    from tunery.jobs.tables import ModelRow

    with _app(tmp_path) as c:
        store = c.app.state.store
        admin_id = store.key_for(ADMIN).id
        store.add_model(
            ModelRow(
                name="ft:tiny:admin::abc",
                owner=admin_id,
                base="smollm2-135m",
                path="jobs/a/model",
                created_at=0,
            )
        )
        file_id = _upload(c)
        resp = _job(c, file_id, objective="distill", distill={"teacher": "ft:tiny:admin::abc"})
        assert resp.status_code == 200, resp.text
        job = resp.json()
        assert job["tunery"]["options"]["distill"] == {"teacher": "ft:tiny:admin::abc"}  # no server path
        row = store.get_job(admin_id, job["id"])
        assert row.tunery["resolved"] == {
            "distill.teacher": ["spec", "smollm2-135m"],
            "distill.teacher_adapter": ["data", "jobs/a/model"],
        }
        bob = _bob(c)
        _refused(
            _job(c, _upload(c, bob), bob, objective="distill", distill={"teacher": "ft:tiny:admin::abc"}),
            404,
            "model_not_found",
            "tunery.distill.teacher",
        )


# ---------------------------------------------------------------------------------------------
# Requests never carry URLs or environment-variable names


@pytest.mark.parametrize(
    ("judge", "param"),
    [
        ({"base_url": "LISTENER", "model_name": "j"}, "tunery.rlaif.judge.base_url"),
        ({"model": "smollm2-135m", "api_key_env": "TUNERY_API_KEY"}, "tunery.rlaif.judge.api_key_env"),
        ({"endpoint": "grader", "api_key_env": "HF_TOKEN"}, "tunery.rlaif.judge.api_key_env"),
    ],
)
def test_urls_and_env_names_in_requests_are_refused(tmp_path, judge, param):
    with Listener() as listener, _app(tmp_path, judges={"grader": listener.url}) as c:
        judge = {k: (listener.url if v == "LISTENER" else v) for k, v in judge.items()}
        file_id = _upload(c)
        err = _refused(
            _job(c, file_id, objective="rlaif", rlaif={"judge": judge}), 400, "field_not_allowed", param
        )
        assert listener.url not in err["message"]
        assert c.get("/v1/fine_tuning/jobs", headers=_h()).json()["data"] == []
    assert listener.requests == []


def test_registered_judge_by_name_and_unknown_names(tmp_path):
    judges, keys = {"grader": "http://127.0.0.1:9/v1"}, {"grader": "GRADER_KEY"}
    with _app(tmp_path, judges=judges, judge_key_envs=keys) as c:
        file_id = _upload(c)
        judge = {"endpoint": "grader", "model_name": "judge-model"}
        resp = _job(c, file_id, objective="rlaif", rlaif={"judge": judge})
        assert resp.status_code == 200, resp.text
        assert "127.0.0.1:9" not in resp.text  # the URL is the operator's, not echoed to the key
        from tunery.jobs.spec import build_config

        store = c.app.state.store
        row = store.get_job(None, resp.json()["id"])
        cfg = build_config(row, store.data_dir, tmp_path / "train.jsonl", None)
        assert cfg.objective_options.judge.base_url == "http://127.0.0.1:9/v1"
        assert cfg.objective_options.judge.api_key_env == "GRADER_KEY"
        err = _refused(
            _job(c, file_id, objective="rlaif", rlaif={"judge": {"endpoint": "other"}}),
            400,
            "unknown_endpoint",
        )
        assert "grader" in err["message"] and "127.0.0.1:9" not in err["message"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--judge", "grader=file:///etc/passwd"], "not an http(s) URL"),
        (["--judge", "grader"], "expects NAME=VALUE"),
        (["--judge", "a=http://h/v1", "--judge-key-env", "b=KEY"], "not registered with --judge: b"),
        (["--judge", "a=http://h/v1", "--judge-key-env", "a=not a name"], "not an environment variable name"),
        (["--worker-env", "TUNERY_API_KEY"], "never passed to workers"),
    ],
)
def test_serve_refuses_bad_judge_and_worker_env_flags(tmp_path, flags, message):
    import typer
    from typer.testing import CliRunner

    from tunery.serve.cli import serve_command

    app = typer.Typer()
    app.command()(serve_command)
    result = CliRunner().invoke(app, ["--data-dir", str(tmp_path), "--api-key", ADMIN, *flags])
    assert result.exit_code == 2 and message in result.output, result.output


def test_local_runs_keep_base_url_and_api_key_env(monkeypatch):
    """`tunery train` is the trusted local user: its config still names an endpoint and a key variable."""
    from tunery.errors import ConfigError
    from tunery.objectives.judge import Judge, JudgeOptions

    monkeypatch.setenv("MY_JUDGE_KEY", "local-key")
    with Listener() as listener:
        judge = Judge(JudgeOptions(base_url=listener.url, model_name="j", api_key_env="MY_JUDGE_KEY"))
        assert judge.score([[{"role": "user", "content": "hi"}]], ["hello"]) == [0.7]
    assert [r["headers"]["authorization"] for r in listener.requests] == ["Bearer local-key"]
    with pytest.raises(ConfigError, match="registered on a Tunery server"):
        Judge(JudgeOptions(endpoint="grader", model_name="j"))


# ---------------------------------------------------------------------------------------------
# Workers get a clean environment


def test_worker_env_is_an_allowlist():
    base = {
        **SECRETS,
        "TUNERY_API_KEY": ADMIN,
        "TUNERY_DATABASE_URL": "postgresql://u:pw@db/tunery",
        "PATH": "/usr/bin",
        "HOME": "/home/u",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "2",
        "CUDA_VISIBLE_DEVICES": "0",
        "HF_HOME": "/cache/hf",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_CACHE": "/cache/tf",
        "TUNERY_CACHE": "/cache/tunery",
        "TUNERY_ALLOCATOR": "system",
        "JUDGE_KEY": "judge-secret",
    }
    env = worker_env(None, (), base)
    for name in ("PATH", "HOME", "LANG", "LC_ALL", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "HF_HOME"):
        assert env[name] == base[name]
    assert env["TRANSFORMERS_CACHE"] == "/cache/tf" and env["TUNERY_CACHE"] == "/cache/tunery"
    for name in (*SECRETS, "TUNERY_API_KEY", "TUNERY_DATABASE_URL", "JUDGE_KEY"):
        assert name not in env
    # The registered judges' keys and the operator's --worker-env are let through; the admin key never.
    env = worker_env("sqlite:///x.db", ("JUDGE_KEY", "HF_TOKEN", "TUNERY_API_KEY"), base)
    assert env["JUDGE_KEY"] == "judge-secret" and env["HF_TOKEN"] == SECRETS["HF_TOKEN"]
    assert "TUNERY_API_KEY" not in env and env["TUNERY_DATABASE_URL"] == "sqlite:///x.db"
    assert not any(v in json.dumps(env) for v in (ADMIN, "aws-secret-value", "AKIA-secret"))


def _worker_environ(job_id: str) -> dict[str, str] | None:
    out = subprocess.run(["pgrep", "-f", f"tunery.jobs.worker .*{job_id}"], capture_output=True, text=True)
    for pid in out.stdout.split():
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
    return None


@pytest.mark.slow  # heavy for the developer loop: a real worker process and a judge
def test_real_worker_reaches_only_the_registered_judge_with_only_its_key(tmp_path):
    """A real server with secrets in its environment: a job naming a URL and a secret's variable is
    refused and the listener hears nothing; a job naming the registered judge trains, the judge gets
    the judge's key only, and the worker process holds none of the server's secrets."""
    from openai import BadRequestError

    from tests.helpers.server import running_server
    from tests.helpers.tiny import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "tiny")
    prompts = "".join(json.dumps({"prompt": f"Name a colour ({i})"}) + "\n" for i in range(12))
    (tmp_path / "p.jsonl").write_text(prompts)
    seen: dict[str, Any] = {}

    def snapshot() -> None:  # the worker waits on this reply, so it is alive to be looked at
        if "env" not in seen and "job" in seen:
            seen["env"] = _worker_environ(seen["job"])

    with Listener(on_request=snapshot) as listener:
        env = {**SECRETS, "TUNERY_API_KEY": ADMIN, "JUDGE_KEY": "judge-secret"}
        args = ("--judge", f"grader={listener.url}", "--judge-key-env", "grader=JUDGE_KEY")
        with running_server(tmp_path / "data", ADMIN, *args, env=env) as server:
            client = server.client()
            with open(tmp_path / "p.jsonl", "rb") as f:
                upload = client.files.create(file=f, purpose="fine-tune")
            rlaif = {"num_generations": 2, "max_new_tokens": 4}
            for judge in (
                {"base_url": listener.url, "model_name": "j", "api_key_env": "TUNERY_API_KEY"},
                {"endpoint": "grader", "model_name": "j", "api_key_env": "AWS_SECRET_ACCESS_KEY"},
            ):
                with pytest.raises(BadRequestError) as err:
                    client.fine_tuning.jobs.create(
                        model=str(model),
                        training_file=upload.id,
                        extra_body={"tunery": {"objective": "rlaif", "rlaif": {**rlaif, "judge": judge}}},
                    )
                assert err.value.code == "field_not_allowed"
            time.sleep(1)
            assert listener.requests == []

            ext = {
                "objective": "rlaif",
                "hyperparameters": {"max_steps": 1, "batch_size": 2},
                "rlaif": {**rlaif, "judge": {"endpoint": "grader", "model_name": "j"}},
            }
            job = client.fine_tuning.jobs.create(
                model=str(model), training_file=upload.id, extra_body={"tunery": ext}
            )
            seen["job"] = job.id
            deadline = time.time() + 240
            while time.time() < deadline:
                job = client.fine_tuning.jobs.retrieve(job.id)
                if job.status in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(1)
            assert job.status == "succeeded", (job.error, server.log()[-3000:])
    assert listener.requests, "the registered judge was never called"
    assert {r["headers"].get("authorization") for r in listener.requests} == {"Bearer judge-secret"}
    leaked = [v for v in (ADMIN, *SECRETS.values()) for r in listener.requests if v.encode() in r["body"]]
    assert leaked == []
    worker = seen.get("env")
    assert worker is not None, "the worker's environment could not be read while it waited on the judge"
    assert worker.get("JUDGE_KEY") == "judge-secret"
    for name in (*SECRETS, "TUNERY_API_KEY"):
        assert name not in worker, name
    assert os.environ.get("PATH") == worker.get("PATH")
