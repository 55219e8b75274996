"""Standard benchmarks: EleutherAI's lm-eval on a tiny random model, through the Python API
(`tunery eval --benchmark`, HFLM) and through `tunery serve` (`local-completions`, which scores with
`echo` + `logprobs` on /v1/completions). The invariant: both paths give the same log-likelihoods."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import typer
from typer.testing import CliRunner

from tests.helpers.server import make_lora_adapter, register_model, running_server
from tests.helpers.tiny import chat_row, write_jsonl
from tunery.errors import TuneryError
from tunery.evaluate.benchmark import BUNDLED, run_benchmark

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

TASK = "tunery_general_knowledge"
FT_NAME = "ft:tiny:admin:bench::aaaaaaaa"


@pytest.fixture(scope="module")
def app():
    from tunery.evaluate.cli import register

    app = typer.Typer()
    register(app)
    return app


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from tunery.generation.loading import load_for_inference

    return load_for_inference(str(tiny_llama))


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    """One real `tunery serve` (engine auto: llama.cpp where installed, so echo requests exercise the
    router's switch to torch) with a LoRA adapter registered as a fine-tuned model."""
    root = tmp_path_factory.mktemp("bench-serve")
    adapter = make_lora_adapter(tiny_llama, root / "lora", seed=3)
    with running_server(root / "data") as srv:
        served = register_model(srv.data_dir, srv.api_key, FT_NAME, tiny_llama, adapter)
        yield srv, served


def _requests(n_docs: int):
    """The shipped task's first documents as lm-eval loglikelihood requests (every choice)."""
    from lm_eval.api.instance import Instance

    rows = [json.loads(line) for line in (BUNDLED[TASK].parent / "general_knowledge.jsonl").open()][:n_docs]
    args = [(f"Question: {r['question']}\nAnswer:", f" {c}") for r in rows for c in r["choices"]]
    return [Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _api(srv, model: str, tokenizer: str, monkeypatch):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    monkeypatch.setenv("OPENAI_API_KEY", srv.api_key)
    return LocalCompletionsAPI(
        base_url=srv.base_url + "/completions",
        model=model,
        tokenizer=tokenizer,
        tokenizer_backend="huggingface",
        max_length=512,
    )


# ----- the Python API: HFLM on Tunery's loaded model -----
def test_shipped_task_through_the_python_api(loaded):
    model, tok = loaded
    res = run_benchmark(model, tok, TASK, limit=6, batch_size=8)
    metrics = {r["metric"]: r for r in res["rows"]}
    assert set(metrics) == {"acc", "acc_norm"}
    assert all(0.0 <= r["value"] <= 1.0 and r["n"] == 6 and r["task"] == TASK for r in res["rows"])
    assert metrics["acc"]["stderr"] is not None and res["versions"] == {TASK: 1.0}
    json.dumps(res)  # the summary is what benchmark.json holds


def test_eval_cli_local_yaml_from_another_folder(app, tiny_llama, tmp_path, monkeypatch):
    """A copied task folder: its relative data_files resolve against the YAML, not the cwd; with an
    adapter (a run's model dir), the adapter's base is loaded under it."""
    tasks = tmp_path / "tasks"
    shutil.copytree(BUNDLED[TASK].parent, tasks)
    adapter = make_lora_adapter(tiny_llama, tmp_path / "lora", seed=1)
    monkeypatch.chdir(tmp_path / "lora")
    out = tmp_path / "out"
    argv = [
        "eval",
        "--adapter",
        str(adapter),
        "--benchmark",
        str(tasks),
        "--limit",
        "4",
        "--output",
        str(out),
    ]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "benchmark.json").read_text())
    assert saved["adapter"] == str(adapter) and {r["metric"] for r in saved["rows"]} == {"acc", "acc_norm"}
    assert saved["n-samples"][TASK]["effective"] == 4
    assert TASK in res.output and "acc_norm" in res.output


@pytest.mark.parametrize(
    "content, message",
    [
        ("task: [unclosed\n", "not valid YAML"),
        ("dataset_path: json\n", "needs a 'task' key"),
        (None, "task file not found"),
    ],
)
def test_eval_cli_refuses_bad_task_files(app, tiny_llama, tmp_path, content, message):
    path = tmp_path / "task.yaml"
    if content is not None:
        path.write_text(content)
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama), "--benchmark", str(path)])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output


def test_eval_cli_wants_data_or_benchmark(app, tiny_llama, tmp_path):
    model = ["eval", "--model", str(tiny_llama)]
    both = CliRunner().invoke(app, [*model, "--data", str(tmp_path / "t.jsonl"), "--benchmark", TASK])
    neither = CliRunner().invoke(app, model)
    assert "not both" in both.output and "--data FILE" in neither.output
    assert both.exit_code != 0 and neither.exit_code != 0


def test_missing_lm_eval_says_how_to_install(app, tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama), "--benchmark", TASK])
    assert res.exit_code != 0 and "pip install 'lm-eval==0.4.13'" in res.output


def test_unknown_task_name_suggests_close_ones(monkeypatch):
    """The name check, on a stub registry (lm-eval's real index of 14k tasks takes ~10 s to build;
    the slow test below uses it)."""
    import lm_eval.tasks as lm_tasks

    from tunery.evaluate.benchmark import resolve_tasks, task_manager

    class Stub:
        def __init__(self, **_kw):
            self.all_tasks = ["hellaswag", "arc_easy", "arc_challenge"]

    monkeypatch.setattr(lm_tasks, "TaskManager", Stub)
    with pytest.raises(TuneryError, match=r"Unknown benchmark task 'arc_esay'\. Did you mean arc_easy"):
        task_manager(resolve_tasks(["arc_esay"]))


@pytest.mark.slow
def test_named_tasks_offline_fail_clearly(loaded, monkeypatch):
    import lm_eval.tasks

    from tunery.evaluate import benchmark

    indexed = []

    class CountedManager(lm_eval.tasks.TaskManager):
        def __init__(self, *args, **kwargs):
            indexed.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", CountedManager)
    benchmark._registry.cache_clear()
    model, tok = loaded
    with pytest.raises(TuneryError, match="Unknown benchmark task 'no_such_task_xyz'"):
        run_benchmark(model, tok, "no_such_task_xyz")
    with pytest.raises(TuneryError, match="Could not load the benchmark task"):
        run_benchmark(model, tok, "arc_easy", limit=2)  # its data is on the hub; tests run offline
    assert indexed == [{"include_defaults": True}]  # lm-eval's registry (18 s) is indexed once


def test_forgetting_probe_uses_the_benchmark(loaded, tmp_path):
    from tunery.evaluate.report import render_compare
    from tunery.evaluate.run import compare

    model, tok = loaded
    data = write_jsonl(tmp_path / "test.jsonl", [chat_row(f"q{i}", "yes") for i in range(2)])
    text = tmp_path / "ref.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    rows = [("base", model, tok, None), ("base again", model, tok, None)]
    res = compare(
        rows, data, max_new_tokens=2, forgetting_text=text, forgetting_benchmark=TASK, benchmark_limit=4
    )
    probe = res["rows"][0]["forgetting"]
    assert set(probe["benchmark"]) == {f"{TASK} acc"} and probe["perplexity"] > 1
    assert res["rows"][1]["forgetting"] is probe  # one model, probed once
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(render_compare(res))
    assert f"{TASK} acc" in console.export_text()


def test_check_echo_bounds():
    from tunery.generation.sequence import GenerationParams
    from tunery.serve.common import ApiError
    from tunery.serve.echo import MAX_ECHO_TOKENS, check_echo

    params = GenerationParams(max_new_tokens=1, logprobs=True, top_logprobs=1)
    check_echo([[1] * (MAX_ECHO_TOKENS // 2)] * 2, params)
    with pytest.raises(ApiError, match="at most 32768 prompt tokens"):
        check_echo([[1] * (MAX_ECHO_TOKENS // 2 + 1)] * 2, params)
    with pytest.raises(ApiError, match="at most 5 with echo"):
        check_echo([[1]], GenerationParams(max_new_tokens=1, logprobs=True, top_logprobs=6))


# ----- the server: echo + logprobs on /v1/completions, and lm-eval as its client -----
def test_echo_logprobs_shape_with_the_openai_sdk(server, tiny_llama):
    srv, _ = server
    client, model = srv.client(), str(tiny_llama)
    prompt = "Question: What is the capital of France?\nAnswer: Paris"
    r = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice, lp, n = r.choices[0], r.choices[0].logprobs, r.usage.prompt_tokens
    assert choice.text == prompt and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == prompt
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first
    assert all(x < 0 for x in lp.token_logprobs[1:]) and all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert all(
        max(t.values()) >= x - 1e-6 for t, x in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True)
    )

    # with a completion: the prompt's tokens, then the completion's, offsets into prompt + completion
    g = client.completions.create(
        model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=3, temperature=0
    )
    gl = g.choices[0].logprobs
    assert g.choices[0].text.startswith(prompt) and len(g.choices[0].text) > len(prompt)
    assert gl.token_logprobs[:n] == pytest.approx(lp.token_logprobs) and gl.text_offset[n] == len(prompt)
    assert n < len(gl.tokens) <= n + g.usage.completion_tokens

    # streamed: the echo comes first, with the prompt's logprobs; the text adds up
    chunks = list(
        client.completions.create(
            model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=3, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].text == prompt and chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks if c.choices) == g.choices[0].text

    # echo alone (no logprobs): the prompt, then the completion, on whichever engine serves the model
    e = client.completions.create(model=model, prompt=prompt, echo=True, max_tokens=2, temperature=0)
    assert e.choices[0].text.startswith(prompt) and e.choices[0].logprobs is None


def test_echo_refusals(server, tiny_llama):
    import openai

    srv, _ = server
    client, model = srv.client(), str(tiny_llama)
    bad = [
        ({"max_tokens": 0}, "max_tokens"),  # nothing to return without echo
        ({"echo": True, "logprobs": 6, "max_tokens": 0}, "at most 5 with echo"),
        ({"extra_body": {"echo": "yes"}}, "'echo': expected a boolean"),
    ]
    for kwargs, message in bad:
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model=model, prompt="hello", **kwargs)


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_server_loglikelihoods_equal_hflm(server, tiny_llama, loaded, which, monkeypatch):
    """The invariant: lm-eval's local-completions (echo + logprobs through the server) and HFLM (the
    model in this process) score every request the same, for a base model and a LoRA fine-tune."""
    from lm_eval.models.huggingface import HFLM

    from tunery.generation.loading import load_for_inference

    srv, served = server
    reqs = _requests(2)
    base = HFLM(pretrained=loaded[0], tokenizer=loaded[1], batch_size=8).loglikelihood(reqs)
    if which == "base":
        name, want = str(tiny_llama), base
    else:
        model, tok = load_for_inference(None, str(served))
        name, want = FT_NAME, HFLM(pretrained=model, tokenizer=tok, batch_size=8).loglikelihood(reqs)
        assert max(abs(a[0] - b[0]) for a, b in zip(want, base, strict=True)) > 1e-3  # it does differ
    got = _api(srv, name, str(tiny_llama), monkeypatch).loglikelihood(reqs)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in want]


def test_lm_eval_local_completions_against_the_server(server, tiny_llama, loaded, monkeypatch):
    """A whole lm-eval run with the server as its model gives the Python API's figures."""
    import lm_eval

    from tunery.evaluate.benchmark import resolve_tasks, summarize, task_manager

    srv, _ = server
    specs = resolve_tasks([TASK])
    out = lm_eval.simple_evaluate(
        model=_api(srv, str(tiny_llama), str(tiny_llama), monkeypatch),
        tasks=specs.specs,
        task_manager=task_manager(specs),
        limit=3,
        log_samples=False,
    )
    via_server = summarize(out, limit=3)["rows"]
    via_python = run_benchmark(*loaded, TASK, limit=3)["rows"]
    assert [(r["metric"], r["value"], r["n"]) for r in via_server] == [
        (r["metric"], r["value"], r["n"]) for r in via_python
    ]


def test_chunked_prompt_scores_equal_one_forward(loaded, monkeypatch):
    """Long prompts are scored a few logits rows at a time (with a KV cache): the same numbers as one
    full forward's log-softmax."""
    import torch

    from tunery.serve.engines import scoring

    model, tok = loaded
    prompt = list(range(5, 45))
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
    want = [float(logp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    monkeypatch.setattr(scoring, "LOGIT_BUDGET", 7 * scoring.embedding_rows(model))  # chunks of 7
    entries = scoring.score_prompt(model, tok, prompt, top=2)
    assert entries[0]["logprob"] is None and len(entries) == len(prompt)
    assert [e["logprob"] for e in entries[1:]] == pytest.approx(want, abs=1e-5)
    assert all(len(e["top_logprobs"]) == 2 for e in entries[1:])
