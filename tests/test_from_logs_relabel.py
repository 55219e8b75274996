"""Relabeling a dataset from the logs through a teacher endpoint or a model the server serves, and the
judge filter (issue 27, section 3: "a judge/teacher the operator registered on the server, optionally
filtered by the existing `tunery data judge`").

Remote teachers and judges are stub OpenAI-compatible servers on loopback (`chat_stub`) whose replies
the test decides, so every count is exact. The server tests use a real `tunery serve` with a judge
endpoint registered by the operator and a model in the model registry."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import pytest
from typer.testing import CliRunner

from tests.helpers.server import running_server
from tunery.cli import app
from tunery.jobs.store import Store
from tunery.serve.completions_store import CompletionLog, StoredCompletion

OWNER = "key_alice"
JUDGE_ASKS = "Rate how helpful"  # a line of judge.DEFAULT_JUDGE_TEMPLATE: the judge's prompt


def _add(logs, n, prompt, reply, t, rating=None, corrected=None):
    logs.add(
        StoredCompletion(
            id=f"chatcmpl-{n}",
            owner=OWNER,
            model="m",
            created_at=t,
            request={"messages": [{"role": "user", "content": prompt}]},
            response={"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]},
            latency_ms=5,
        )
    )
    if rating is not None:
        logs.rate(OWNER, f"chatcmpl-{n}", rating, corrected)


@pytest.fixture
def data_dir(tmp_path):
    """Five examples once de-duplicated: three accepted, one corrected, one unrated; the newest
    ("Translate cat") is the test slice at --test-fraction 0.2."""
    log = CompletionLog(Store(tmp_path / "data"))
    _add(log, 1, "Hello", "hi", 100, "up")
    _add(log, 2, "What is 2+2?", "5", 200, "down", corrected="4")
    _add(log, 3, "Capital of France?", "Paris", 300, 5)
    _add(log, 4, "Tell a joke", "no", 400)  # unrated: dropped at --rating rated
    _add(log, 5, "Colour of the sky?", "blue", 500, "up")
    _add(log, 6, "Translate cat", "gato", 600, "up")
    log.store.close()
    return tmp_path / "data"


def _teacher_and_judge(low: str):
    """One stub as both teacher ("T:" + the prompt) and judge (2 for a reply naming `low`, else 9)."""

    def reply(messages):
        text = messages[-1]["content"]
        if JUDGE_ASKS in text:
            return "2" if low in text else "9"
        return f"T:{text}"

    return reply


def _run(data_dir, out, *extra):
    args = ["data", "from-logs", "--data-dir", str(data_dir), "--key", OWNER, "--test-fraction", "0.2"]
    return CliRunner().invoke(app, [*args, "--output", str(out), *extra])


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_relabels_through_an_endpoint_and_the_judge_drops_low_scores(data_dir, tmp_path, chat_stub):
    stub = chat_stub(_teacher_and_judge(low="Hello"))
    out = tmp_path / "sft.jsonl"
    url = ["--relabel-with", "big", "--relabel-url", stub.base_url]
    got = _run(data_dir, out, *url, "--judge-min-score", "5")
    assert got.exit_code == 0, got.output
    asked = [m[-1]["content"] for m in stub.requests]
    teacher_asks = [a for a in asked if JUDGE_ASKS not in a]
    judge_asks = [a for a in asked if JUDGE_ASKS in a]
    # The three accepted train replies, never the correction nor the test slice.
    assert sorted(teacher_asks) == ["Capital of France?", "Colour of the sky?", "Hello"]
    assert len(judge_asks) == 3 and all("T:" in a for a in judge_asks)
    train = {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in _rows(out)}
    assert train == {
        "What is 2+2?": "4",
        "Capital of France?": "T:Capital of France?",
        "Colour of the sky?": "T:Colour of the sky?",
    }
    assert [r["messages"][-1]["content"] for r in _rows(tmp_path / "sft.test.jsonl")] == ["gato"]
    text = " ".join(got.output.split())
    assert "relabeled 3 train" in text and "the judge dropped 1 relabeled" in text
    assert "dropped 1 judge score below 5" in text and "3 train, 1 test" in text
    assert "kept 3 accepted" in text and "kept 1 corrected" in text  # the test slice's one too


def test_cli_judge_on_its_own_endpoint_and_exact_threshold(data_dir, tmp_path, chat_stub):
    teacher = chat_stub(lambda m: f"T:{m[-1]['content']}")
    judge = chat_stub(lambda m: "5" if "Hello" in m[-1]["content"] else "4.9")
    out = tmp_path / "sft.jsonl"
    got = _run(
        data_dir,
        out,
        *("--relabel-with", "big", "--relabel-url", teacher.base_url),
        *("--judge-min-score", "5", "--judge-url", judge.base_url, "--judge-model", "grader"),
    )
    assert got.exit_code == 0, got.output
    assert len(teacher.requests) == 3 and len(judge.requests) == 3
    # A score equal to the minimum is kept; 4.9 is below it.
    assert {r["messages"][-1]["content"] for r in _rows(out)} == {"4", "T:Hello"}
    text = " ".join(got.output.split())
    assert "the judge dropped 2 relabeled" in text and "kept 0" not in text


def test_cli_relabel_and_judge_errors(data_dir, tmp_path, chat_stub):
    stub = chat_stub(lambda m: "x")
    out = tmp_path / "sft.jsonl"
    remote = ["--relabel-with", "big", "--relabel-url", stub.base_url]
    no_relabel = _run(data_dir, out, "--judge-min-score", "5")
    assert no_relabel.exit_code == 2 and "it needs --relabel-with" in " ".join(no_relabel.output.split())
    too_high = _run(data_dir, out, *remote, "--judge-min-score", "11")
    assert too_high.exit_code == 2 and "between 0 and its top score 10" in " ".join(too_high.output.split())
    dpo = _run(data_dir, out, *remote, "--shape", "dpo")
    assert dpo.exit_code == 2 and "--relabel-with applies to --shape sft only" in dpo.output
    assert stub.requests == [] and not out.exists()  # refused before any request or file
    judge_alone = _run(data_dir, out, "--judge-url", stub.base_url)
    assert judge_alone.exit_code == 2 and "need --judge-min-score" in judge_alone.output


# ---------------------------------------------------------------------------------------------
# On a server: a registered endpoint, a registered model, per-key names


def _merged_teacher(folder, base):
    """A registrable model (a plain HF dir) whose greedy replies are not blank: the tiny base with a
    random LoRA merged in (the bare tiny model answers newlines only)."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.server import make_lora_adapter

    adapter = make_lora_adapter(base, folder / "adapter", seed=3)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    merged.save_pretrained(folder / "teacher")
    AutoTokenizer.from_pretrained(base).save_pretrained(folder / "teacher")
    shutil.copy(base / "generation_config.json", folder / "teacher" / "generation_config.json")
    return folder / "teacher"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama):
    from tests.conftest import _ChatStub
    from tunery.models.registry import inspect_source
    from tunery.serve.model_registry import ModelRegistry

    stub = _ChatStub(_teacher_and_judge(low="Question 1"))
    data = tmp_path_factory.mktemp("relabel") / "data"
    args = ("--judge", f"teach={stub.base_url}", "--judge-key-env", "teach=TEACH_KEY")
    with running_server(data, "test-admin-key", *args, env={"TEACH_KEY": "sekrit"}) as server:
        store = Store(server.data_dir)
        try:
            alice, bob = (store.create_key(name)[1] for name in ("alice", "bob"))
            teacher = _merged_teacher(tmp_path_factory.mktemp("teacher"), tiny_llama)
            ModelRegistry(store).add("reg-teacher", inspect_source(str(teacher)))
        finally:
            store.close()
        client = server.client(alice)
        for i in range(5):  # four accepted replies and one correction
            ask = {"model": str(tiny_llama), "messages": [{"role": "user", "content": f"Question {i}"}]}
            seed = _unblank_seed(client, ask)
            made = client.chat.completions.create(**ask, max_tokens=3, seed=seed, store=True)
            assert made.choices[0].message.content.strip(), "the same seed gave another reply"
            rating = {"rating": "down", "corrected": "Fixed"} if i == 4 else {"rating": "up"}
            got = httpx.post(
                f"{server.base_url}/tunery/feedback",
                json={"completion_id": made.id, **rating},
                headers={"Authorization": f"Bearer {alice}"},
            )
            assert got.status_code == 200, got.text
        yield SimpleNamespace(server=server, alice=alice, bob=bob, stub=stub, client=client)
    stub.close()


def _unblank_seed(client, ask: dict) -> int:
    """The first seed whose sampled reply is not blank. The random tiny model samples its end of
    sequence first now and then, and a blank reply never becomes training data: unseeded, the
    datasets' counts below changed from run to run (3 accepted replies instead of 4, once in CI)."""
    for seed in range(20):
        made = client.chat.completions.create(**ask, max_tokens=3, seed=seed, store=False)
        if made.choices[0].message.content.strip():
            return seed
    raise AssertionError(f"20 seeds gave blank replies to {ask['messages']}")


def _dataset(env, key, body):
    return httpx.post(
        f"{env.server.base_url}/tunery/datasets",
        json={"shape": "sft", "test_fraction": 0, **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )


def test_api_relabels_with_a_registered_endpoint_and_judge(served):
    served.stub.requests.clear()
    teach = {"endpoint": "teach", "model_name": "big"}
    got = _dataset(served, served.alice, {"relabel": teach, "judge": {**teach, "min_score": 5}})
    assert got.status_code == 200, got.text
    report = got.json()["tunery"]["report"]
    assert (report["relabeled"], report["judge_dropped"], report["train"]) == (4, 1, 4)
    assert report["dropped"] == {"judge score below 5": 1}
    assert report["kept"] == {"accepted": 3, "corrected": 1}
    assert len(served.stub.requests) == 8  # four rewrites, four judgements
    rows = [json.loads(x) for x in served.client.files.content(got.json()["id"]).text.splitlines()]
    assert sorted(r["messages"][-1]["content"] for r in rows) == [
        "Fixed",
        "T:Question 0",
        "T:Question 2",
        "T:Question 3",
    ]
    # The judge defaults to the relabeler.
    same = _dataset(served, served.alice, {"relabel": teach, "judge": {"min_score": 5}})
    assert same.status_code == 200 and same.json()["tunery"]["report"]["judge_dropped"] == 1


def test_api_relabels_and_judges_with_a_registered_model_through_the_engine(served):
    """The registered model rewrites and judges; each rewrite and each score is what the server
    itself answers that model, greedily, for the same messages (one engine, deterministic)."""
    from tunery.objectives.judge import DEFAULT_JUDGE_TEMPLATE, parse_score, render_prompt

    relabel, judge = {"model": "reg-teacher", "max_tokens": 4}, {"model": "reg-teacher", "min_score": 5}
    got = _dataset(served, served.alice, {"relabel": relabel, "judge": judge})
    assert got.status_code == 200, got.text
    rows = [json.loads(x) for x in served.client.files.content(got.json()["id"]).text.splitlines()]

    def ask(messages, max_tokens):
        said = served.client.chat.completions.create(
            model="reg-teacher", messages=messages, max_tokens=max_tokens, temperature=0
        )
        return said.choices[0].message.content

    expected, relabeled, dropped = ["Fixed"], 0, 0
    for i in range(4):
        prompt = [{"role": "user", "content": f"Question {i}"}]
        said = ask(prompt, 4)
        if not said.strip():  # a blank rewrite keeps the accepted reply, and is not judged
            continue
        relabeled += 1
        text = DEFAULT_JUDGE_TEMPLATE.replace("{prompt}", render_prompt(prompt)).replace("{completion}", said)
        score = parse_score(ask([{"role": "user", "content": text}], 16), 10.0) or 0.0
        if score * 10 < 5:
            dropped += 1
        else:
            expected.append(said)
    report = got.json()["tunery"]["report"]
    assert (report["relabeled"], report["judge_dropped"]) == (relabeled, dropped)
    assert relabeled > 0
    assert sorted(
        r["messages"][-1]["content"] for r in rows if r["messages"][-1]["content"] in expected
    ) == sorted(expected)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"relabel": {"endpoint": "nope", "model_name": "x"}}, 400, "relabel.endpoint"),
        ({"relabel": {"model": "ft:tiny:acme::nope"}}, 404, "relabel.model"),
        ({"relabel": {"model": "reg-teacher", "base_url": "http://x"}}, 400, "relabel.base_url"),
        ({"relabel": {"endpoint": "teach"}}, 400, "relabel.model_name"),
        ({"judge": {"min_score": 5}}, 400, "judge"),
        ({"relabel": "reg-teacher", "judge": {"model": "reg-teacher"}}, 400, "judge.min_score"),
        ({"relabel": "reg-teacher", "judge": {"min_score": 11}}, 400, "judge.min_score"),
        ({"relabel": "reg-teacher", "shape": "dpo"}, 400, "relabel"),
    ],
)
def test_api_relabel_errors(served, body, status, param):
    got = _dataset(served, served.alice, body)
    assert got.status_code == status, got.text
    assert got.json()["error"]["param"] == param
