"""`tunery serve` end to end: a real server process on 127.0.0.1, the official `openai` client, a tiny
model. One module-scoped server trains one job that the later tests reuse, to keep wall time small."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.helpers.server import frozen_at_first_checkpoint, running_server
from tests.helpers.tiny import make_tiny_model_dir
from tunery.jobs.store import Store

TERMINAL = ("succeeded", "failed", "cancelled")


def chat_rows(n: int, start: int = 0) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}"},
            ]
        }
        for i in range(start, start + n)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def follow(client, job_id: str, timeout: float = 240) -> tuple[object, list]:
    """Poll retrieve until the job ends, then read every event (the SDK pages with `after`), oldest first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL:
            events = list(client.fine_tuning.jobs.list_events(job_id, limit=7))  # several pages
            assert len({e.id for e in events}) == len(events)
            return job, events[::-1]
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_model_dir(root / "tiny")
    with running_server(root / "data") as server:
        yield {"root": root, "model": str(model), "server": server, "client": server.client()}


@pytest.fixture(scope="module")
def trained(env):
    """One fine-tuning job through the API, shared by the tests that need a fine-tuned model."""
    client, root = env["client"], env["root"]
    with open(write_jsonl(root / "train.jsonl", chat_rows(12)), "rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=env["model"],
        training_file=upload.id,
        suffix="adder",
        seed=7,
        hyperparameters={"n_epochs": 1},
        metadata={"team": "tests"},
        extra_body={"tunery": {"hyperparameters": {"save_steps": 4}}},
    )
    assert job.status == "queued" and job.user_provided_suffix == "adder"
    job, events = follow(client, job.id)
    assert job.status == "succeeded", (job.error, env["server"].log()[-3000:])
    return {"job": job, "events": events, "file": upload}


def test_upload_train_follow_and_result(env, trained):
    client, job, events = env["client"], trained["job"], trained["events"]
    messages = [e.message for e in events]
    assert messages[0] == f"Created fine-tuning job: {job.id}"
    assert "Files validated, moving job to queued state" in messages
    assert any(m.startswith("Step 12/12: training loss=") for m in messages)
    assert messages[-1] == "The job has successfully completed"
    assert f"New fine-tuned model created: {job.fine_tuned_model}" in messages
    assert (
        job.fine_tuned_model.startswith("ft:tiny:admin:adder:")
        and len(job.fine_tuned_model.split(":")[-1]) == 8
    )
    assert job.trained_tokens > 0 and job.finished_at and job.hyperparameters.n_epochs == 1
    assert job.hyperparameters.batch_size == 1  # "auto" resolved by the trainer

    # Checkpoints: intermediate ones named ...:ckpt-step-N, the final one by the model's own name.
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    names = [c.fine_tuned_model_checkpoint for c in ckpts]
    assert names[0] == job.fine_tuned_model and ckpts[0].step_number == 12
    assert f"{job.fine_tuned_model}:ckpt-step-8" in names
    assert ckpts[0].metrics.train_loss is not None
    assert any("Checkpoint created at step 8 with Snapshot ID" in m for m in messages)

    # Paging: newest first, `after` continues where the last page ended.
    first = client.fine_tuning.jobs.list_events(job.id, limit=3)
    second = client.fine_tuning.jobs.list_events(job.id, limit=3, after=first.data[-1].id)
    assert first.has_more and first.data[0].message == "The job has successfully completed"
    assert not {e.id for e in first.data} & {e.id for e in second.data}

    # The result file: OpenAI's CSV columns, served base64-encoded.
    result = client.files.retrieve(job.result_files[0])
    assert result.purpose == "fine-tune-results"
    csv = base64.b64decode(client.files.content(result.id).content).decode()
    assert csv.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(csv.splitlines()) == 13

    listed = client.fine_tuning.jobs.list(limit=10, extra_query={"metadata[team]": "tests"}).data
    assert [j.id for j in listed] == [job.id]
    assert client.fine_tuning.jobs.list(extra_query={"metadata[team]": "other"}).data == []


def test_event_stream_sse(env, trained):
    import httpx

    server, job = env["server"], trained["job"]
    with httpx.stream(
        "GET",
        f"{server.base_url}/fine_tuning/jobs/{job.id}/events?stream=true",
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=30,
    ) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][6:])
    assert first["object"] == "fine_tuning.job.event" and first["message"].startswith(
        "Created fine-tuning job"
    )


def test_chat_with_fine_tuned_model_plain_and_streaming(env, trained):
    client, name = env["client"], trained["job"].fine_tuned_model
    messages = [{"role": "user", "content": "What is 3 plus 3?"}]
    plain = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 0 and plain.usage.total_tokens == (
        plain.usage.prompt_tokens + plain.usage.completion_tokens
    )

    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == choice.finish_reason

    # A checkpoint is a model too; n, logprobs and the legacy completions endpoint work on it.
    ckpt = f"{name}:ckpt-step-8"
    out = client.chat.completions.create(
        model=ckpt,
        messages=messages,
        max_tokens=4,
        temperature=0.8,
        seed=1,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert len(out.choices[0].logprobs.content[0].top_logprobs) == 2
    legacy = client.completions.create(model=name, prompt="What is 2", max_tokens=5, temperature=0)
    assert legacy.object == "text_completion" and legacy.usage.completion_tokens >= 1


def test_inference_errors(env, trained):
    client = env["client"]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="ft:tiny:admin::nothere1", messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.code == "model_not_found" and "does not exist" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=trained["job"].fine_tuned_model, messages=[{"role": "user", "content": "word " * 600}]
        )
    assert err.value.code == "context_length_exceeded"


@pytest.mark.slow  # heavy for the developer loop: a training job paused and resumed
def test_pause_resume_then_cancel_mid_run(env, tmp_path):
    client = env["client"]
    with open(write_jsonl(tmp_path / "long.jsonl", chat_rows(40)), "rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=env["model"],
        training_file=upload.id,
        hyperparameters={"n_epochs": 3},
        extra_body={"tunery": {"hyperparameters": {"save_steps": 2}}},
    )
    run_dir = env["root"] / "data" / "jobs" / job.id

    def messages() -> list[str]:
        return [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]

    store = Store(env["root"] / "data")
    try:
        wait_for(lambda: store.get_job(None, job.id).pid, 120, "the worker")
        # the pause lands mid-job: the worker is frozen at its first checkpoint while it is asked to stop
        with frozen_at_first_checkpoint(store.get_job(None, job.id).pid, run_dir):
            assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    finally:
        store.close()
    wait_for(lambda: "Fine-tuning job paused" in messages(), 60, "the worker to stop on pause")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"

    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    wait_for(
        lambda: any(m.startswith("Worker started; resuming from checkpoint step-") for m in messages()),
        60,
        "the job to resume from its checkpoint",
    )
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", 30, "running again")
    t0 = time.time()
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    wait_for(
        lambda: "Fine-tuning job cancelled; its last checkpoint is kept." in messages(),
        60,
        "the worker to stop on cancel",
    )
    assert time.time() - t0 < 45
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert list((run_dir / "checkpoints").glob("step-*")), "the last checkpoint is kept"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.resume(job.id)


def test_crashing_worker_fails_job_not_server(env, tmp_path):
    """An OOM kill looks like SIGKILL from outside: the job fails with the reason, the server lives."""
    client = env["client"]
    with open(write_jsonl(tmp_path / "c.jsonl", chat_rows(40)), "rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=env["model"], training_file=upload.id, hyperparameters={"n_epochs": 3}
    )
    wait_for(lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running", 60, "the job to run")
    worker = wait_for(lambda: _worker_pid(job.id), 30, "the worker process")
    os.kill(worker, signal.SIGKILL)
    job, _ = follow(client, job.id, timeout=60)
    assert job.status == "failed" and job.error.code == "worker_crashed"
    assert "SIGKILL" in job.error.message and "out of memory" in job.error.message
    assert client.models.list().data  # still serving


def _worker_pid(job_id: str) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"tunery.jobs.worker .*{job_id}"], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    return pids[0] if pids else None


def test_keys_cli_and_per_key_isolation(env, trained):
    server, admin = env["server"], env["client"]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tunery.serve.cli import keys_app; keys_app()",
            "create",
            "--name",
            "bob",
            "--data-dir",
            str(server.data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    bob_key = out.stdout.strip().splitlines()[-1]
    bob = server.client(api_key=bob_key)
    job, upload = trained["job"], trained["file"]
    assert [f.id for f in bob.files.list().data] == []
    assert bob.fine_tuning.jobs.list().data == []
    for call in (
        lambda: bob.files.retrieve(upload.id),
        lambda: bob.files.content(upload.id),
        lambda: bob.files.delete(upload.id),
        lambda: bob.fine_tuning.jobs.retrieve(job.id),
        lambda: bob.fine_tuning.jobs.cancel(job.id),
        lambda: bob.fine_tuning.jobs.list_events(job.id),
        lambda: bob.fine_tuning.jobs.checkpoints.list(job.id),
        lambda: bob.models.retrieve(job.fine_tuned_model),
        lambda: bob.models.delete(job.fine_tuned_model),
        lambda: bob.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]
        ),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.BadRequestError):  # someone else's file cannot train bob's job
        bob.fine_tuning.jobs.create(model=env["model"], training_file=upload.id)
    assert job.fine_tuned_model not in [m.id for m in bob.models.list().data]
    assert admin.files.retrieve(upload.id).id == upload.id  # the owner still sees it
    with pytest.raises(openai.AuthenticationError) as err:
        server.client(api_key="not-a-key").models.list()
    assert err.value.code == "invalid_api_key"


def test_malformed_uploads_give_openai_errors(env, tmp_path):
    client = env["client"]

    def upload(name: str, text: str):
        (tmp_path / name).write_text(text)
        with open(tmp_path / name, "rb") as f:
            return client.files.create(file=f, purpose="fine-tune")

    with pytest.raises(openai.BadRequestError) as err:  # not .jsonl
        upload("data.txt", "hello")
    assert err.value.code == "invalid_file_format" and "Must be .jsonl" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # not JSON lines
        upload("bad.jsonl", "".join(json.dumps(r) + "\n" for r in chat_rows(3)) + "this is not json\n")
    assert err.value.code == "invalid_training_file" and "4" in err.value.message
    rows = chat_rows(12)
    rows[5]["messages"][0]["role"] = "wizard"
    with pytest.raises(openai.BadRequestError) as err:  # unknown role, at line 6
        upload("roles.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert err.value.code == "invalid_training_file" and "6" in err.value.message
    assert err.value.param == "file"

    few = upload("few.jsonl", "".join(json.dumps(r) + "\n" for r in chat_rows(7)))
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model=env["model"], training_file=few.id)
    assert err.value.code == "invalid_n_examples" and err.value.param == "training_file"
    assert "has 7 example(s), but must have at least 10 examples" in err.value.message

    pref = [
        {
            "input": {"messages": [{"role": "user", "content": f"q{i}"}]},
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}],
        }
        for i in range(12)
    ]
    pref_file = upload("pref.jsonl", "".join(json.dumps(r) + "\n" for r in pref))
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(
            model=env["model"], training_file=pref_file.id, method={"type": "supervised"}
        )
    assert err.value.code == "invalid_training_file" and err.value.param == "training_file"

    with pytest.raises(openai.BadRequestError) as err:  # OpenAI's hyperparameter ranges
        client.fine_tuning.jobs.create(
            model=env["model"], training_file=few.id, hyperparameters={"n_epochs": 99}
        )
    assert err.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as err:  # a method not in the registry
        client.fine_tuning.jobs.create(
            model=env["model"], training_file=few.id, extra_body={"tunery": {"method": "magic"}}
        )
    assert err.value.param == "tunery.method"
    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.create(model="no-such-model", training_file=few.id)
    assert err.value.code == "model_not_found"
    # Nothing malformed was kept, and no job was created.
    assert {f.filename for f in client.files.list().data} >= {"few.jsonl", "pref.jsonl"}
    assert not {f.filename for f in client.files.list().data} & {"data.txt", "bad.jsonl", "roles.jsonl"}


def _jobs_cli(*args: str) -> subprocess.CompletedProcess:
    code = "from tunery.serve.cli import jobs_app; jobs_app()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # heavy for the developer loop: the jobs CLI in subprocesses, with a training job
def test_jobs_cli_create_list_follow_cancel(env, trained, tmp_path):
    server, job = env["server"], trained["job"]
    conn = ["--base-url", server.base_url, "--api-key", server.api_key]
    listed = _jobs_cli("list", *conn)
    assert listed.returncode == 0 and f"{job.id}\tsucceeded" in listed.stdout
    followed = _jobs_cli("follow", job.id, *conn)
    assert followed.returncode == 0, followed.stderr
    assert "The job has successfully completed" in followed.stdout
    assert followed.stdout.strip().endswith(f"Fine-tuned model: {job.fine_tuned_model}")

    data = write_jsonl(tmp_path / "cli.jsonl", chat_rows(10))
    # 50 epochs (500 steps): a 1-epoch job on the tiny model can finish before the cancel below arrives.
    created = _jobs_cli("create", "-m", env["model"], "-t", str(data), "--n-epochs", "50", *conn)
    assert created.returncode == 0, created.stderr
    new_id = created.stdout.strip().splitlines()[-1]
    assert new_id.startswith("ftjob-") and "Uploaded cli.jsonl as file-" in created.stderr
    cancelled = _jobs_cli("cancel", new_id, *conn)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"{new_id}\tcancelled"
    again = _jobs_cli("cancel", new_id, *conn)
    assert again.returncode == 2 and "cannot be cancelled" in again.stderr and "Traceback" not in again.stderr
    bad = _jobs_cli("list", "--base-url", server.base_url, "--api-key", "wrong")
    assert bad.returncode == 2 and "401" in bad.stderr


@pytest.mark.slow
def test_chat_with_builtin_smollm2(env):
    """The embedded real model answers through the same endpoint (base alias, no adapter)."""
    reply = env["client"].chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.content.strip() and reply.usage.prompt_tokens > 5


def test_models_list_retrieve_delete(env, trained):
    """Last in the module: it deletes the shared fine-tuned model."""
    client, job = env["client"], trained["job"]
    ids = [m.id for m in client.models.list().data]
    assert "smollm2-135m" in ids and job.fine_tuned_model in ids
    assert f"{job.fine_tuned_model}:ckpt-step-8" in ids
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "admin"
    assert client.models.delete(job.fine_tuned_model).deleted is True
    assert job.fine_tuned_model not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete("smollm2-135m")
    assert not (env["root"] / "data" / "jobs" / job.id / "model").exists()
