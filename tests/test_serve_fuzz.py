"""A property-based fuzz of the whole HTTP API from its own OpenAPI schema (schemathesis).

Every operation gets a fixed number of derandomized examples, valid by the schema and not, sent
in-process through ASGI (no socket, no training: the executor is off). Whatever comes in, the server
answers without a 500, and every 4xx is OpenAI's error object. A training file, a job and a
fine-tuned model row exist, so some generated requests reach past "not found"."""

from __future__ import annotations

import json

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from tunery.serve.app import create_app  # noqa: E402
from tunery.serve.common import Settings  # noqa: E402

KEY = "fuzz-key"
EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 6}


def _check(response, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        err = body.get("error") if isinstance(body, dict) else None
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, (where, body)
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), where


def _seed(app) -> None:
    """A little state for the fuzzer to hit: a file, a queued job and a fine-tuned model row."""
    from tunery.jobs.tables import ModelRow

    store = app.state.store
    owner = store.key_for(KEY).id
    rows = "".join(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
        for _ in range(10)
    )
    tmp = store.data_dir / "files" / ".tmp" / "seed.jsonl"
    tmp.write_text(rows)
    store.adopt_file(owner, "seed.jsonl", "fine-tune", tmp)
    store.add_model(ModelRow(name="ft:tiny:fuzz::abcdefgh", owner=owner, base="smollm2-135m", path="nowhere"))


@pytest.mark.slow  # heavy for the developer loop: a schemathesis fuzz of every operation
def test_fuzz_every_operation_no_500_and_openai_errors(tmp_path):
    app = create_app(
        Settings(
            data_dir=tmp_path / "data",
            api_key=KEY,
            run_executor=False,
            requests_per_minute=0,  # thousands of requests in a few seconds are the point here
            max_upload_mb=1,
        )
    )
    _seed(app)
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.app = app
    headers = {"Authorization": f"Bearer {KEY}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20  # the whole API, not a corner of it
    for op in operations:
        for mode, n in EXAMPLES.items():
            _fuzz(op, mode, n, headers)


def _fuzz(op, mode, n: int, headers: dict[str, str]) -> None:
    where = f"{op.method.upper()} {op.path} ({mode.value})"

    @settings(
        max_examples=n,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        _check(case.call(headers=headers), where)

    try:
        run()
    except Unsatisfiable:
        # An operation whose schema accepts anything (no parameters, a free-form body) has no
        # invalid input to generate; its valid examples ran in the positive mode.
        if mode is not GenerationMode.NEGATIVE:
            raise
