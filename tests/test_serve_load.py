"""50 concurrent chat requests across two adapters on one tiny base, each answer checked against
direct generation with the same model and adapter (no server, no batching)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tunery.serve.testing import make_lora_adapter, register_model, running_server
from tunery.testing import make_tiny_model_dir


def direct(base: Path, adapter: Path, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    from tunery.evaluate.generate import GenerationParams, chat_prompt, generate_batch
    from tunery.evaluate.loading import load_for_inference

    model, tok = load_for_inference(str(base), str(adapter))
    params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0)
    return [generate_batch(model, tok, [chat_prompt(tok, p)], params)[0].text for p in prompts]


def test_50_concurrent_requests_two_adapters(tmp_path):
    base = make_tiny_model_dir(tmp_path / "tiny")
    adapters = [make_lora_adapter(base, tmp_path / f"adapter{i}", seed=i) for i in range(2)]
    data = tmp_path / "data"
    with running_server(data) as server:
        names = ["ft:tiny:admin:a::aaaaaaaa", "ft:tiny:admin:b::bbbbbbbb"]
        stored = [
            register_model(data, server.api_key, name, base, adapter)
            for name, adapter in zip(names, adapters, strict=True)
        ]
        prompts = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(25)]
        jobs = [(names[i % 2], prompts[i // 2]) for i in range(50)]
        client = server.client(timeout=120)

        def ask(job):
            model, messages = job
            return client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)

        with ThreadPoolExecutor(50) as pool:
            replies = list(pool.map(ask, jobs))

    assert len(replies) == 50 and all(r.choices[0].message.content is not None for r in replies)
    expected = {name: direct(base, path, prompts, 8) for name, path in zip(names, stored, strict=True)}
    for i, ((model, _), reply) in enumerate(zip(jobs, replies, strict=True)):
        assert reply.model == model
        assert reply.choices[0].message.content == expected[model][i // 2], (i, model)
    # The two adapters really differ, so a mixed-up adapter would have been caught.
    assert expected[names[0]] != expected[names[1]]
