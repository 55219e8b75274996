"""50 concurrent chat requests across two adapters on one tiny base, each answer checked against
direct generation with the same model and adapter (no server, no batching), on each serving engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.server import make_lora_adapter, register_model, running_server
from tests.helpers.tiny import make_tiny_model_dir


def direct(base: Path, adapter: Path, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    from tunery.generation.generate import chat_prompt, generate_batch
    from tunery.generation.loading import load_for_inference
    from tunery.generation.sequence import GenerationParams

    model, tok = load_for_inference(str(base), str(adapter))
    params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0)
    return [generate_batch(model, tok, [chat_prompt(tok, p)], params)[0].text for p in prompts]


def direct_llamacpp(base: Path, adapter: Path, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    from tunery.generation.generate import chat_prompt
    from tunery.generation.sequence import GenerationParams
    from tunery.serve.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(gguf_type="f32")
    try:
        tok = engine.tokenizer(str(base), str(adapter))
        params = GenerationParams(max_new_tokens=max_tokens, temperature=0.0)
        return [
            engine.generate(str(base), str(adapter), chat_prompt(tok, p), params)[0].text for p in prompts
        ]
    finally:
        engine.close()


@pytest.mark.slow  # heavy for the developer loop: 50 concurrent requests per engine
@pytest.mark.parametrize("engine", ["torch", "llamacpp"])
def test_50_concurrent_requests_two_adapters(tmp_path, engine):
    """torch batches the two adapters in one forward (peft's adapter_names): its replies must equal
    direct generation exactly. llama.cpp decodes each adapter's sequences in their own batch: replies
    equal its own one-at-a-time replies on at least 90% (batched matmuls round differently; random
    tiny models have near-tied logits), which a mixed-up adapter would fail by far."""
    if engine == "llamacpp":
        pytest.importorskip("llama_cpp")
    base = make_tiny_model_dir(tmp_path / "tiny")
    adapters = [make_lora_adapter(base, tmp_path / f"adapter{i}", seed=i) for i in range(2)]
    data = tmp_path / "data"
    args = ["--engine", engine] + (["--gguf-type", "f32"] if engine == "llamacpp" else [])
    with running_server(data, "test-admin-key", *args) as server:
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
    reference = direct if engine == "torch" else direct_llamacpp
    expected = {name: reference(base, path, prompts, 8) for name, path in zip(names, stored, strict=True)}
    same = 0
    for i, ((model, _), reply) in enumerate(zip(jobs, replies, strict=True)):
        assert reply.model == model
        same += reply.choices[0].message.content == expected[model][i // 2]
    assert same == 50 if engine == "torch" else same >= 45, f"{same}/50 replies as generated alone"
    # The two adapters really differ, so a mixed-up adapter would have been caught.
    assert expected[names[0]] != expected[names[1]]
