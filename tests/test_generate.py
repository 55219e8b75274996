"""The generation path: batched = unbatched = transformers greedy, stops, streaming, logprobs, Engine."""

from __future__ import annotations

import pytest
import torch

from tunery.generation.generate import generate_batch, stream
from tunery.generation.sequence import GenerationParams, IncrementalDecoder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama with larger random weights, so greedy replies vary from prompt to prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.tiny import make_tiny_model_dir

    path = make_tiny_model_dir(tmp_path_factory.mktemp("gen-tiny"), "llama", initializer_range=0.3)
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _prompts(tok):
    texts = [
        "I loved this movie",
        "Terrible product. It broke after two days and support never answered.",
        "What is the capital of France?",
        "red green blue " * 6,
        "a",
    ]
    return [tok(t)["input_ids"] for t in texts]


def test_batched_greedy_equals_unbatched_and_transformers(tiny):
    _, model, tok = tiny
    prompts = _prompts(tok)
    params = GenerationParams(max_new_tokens=12)
    batched = generate_batch(model, tok, prompts, params, batch_size=8, autocast=False)
    single = [generate_batch(model, tok, [p], params, autocast=False)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert len({tuple(r.token_ids) for r in batched}) > 1  # the prompts really lead to different replies
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    for row, res in enumerate(batched):
        ref = out[row, enc["input_ids"].shape[1] :].tolist()
        assert res.token_ids == ref[: len(res.token_ids)]
        assert res.prompt_tokens == len(prompts[row])
        assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)


def test_stop_strings_and_length(tiny):
    _, model, tok = tiny
    prompt = _prompts(tok)[1]
    full = generate_batch(model, tok, [prompt], GenerationParams(max_new_tokens=16), autocast=False)[0]
    assert full.finish_reason == "length" and full.completion_tokens == 16
    stop = full.text[5:8]
    cut = generate_batch(
        model, tok, [prompt], GenerationParams(max_new_tokens=16, stop=[stop]), autocast=False
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text and cut.completion_tokens < 16


def test_eos_finishes_a_row_without_the_eos_token(tiny):
    _, model, tok = tiny
    prompts = _prompts(tok)
    first = generate_batch(model, tok, prompts[:1], GenerationParams(max_new_tokens=4), autocast=False)[0]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first.token_ids[0]
    try:
        res = generate_batch(model, tok, prompts, GenerationParams(max_new_tokens=6), autocast=False)
    finally:
        model.generation_config.eos_token_id = old
    assert res[0].finish_reason == "stop" and res[0].token_ids == [] and res[0].completion_tokens == 1
    assert all(first.token_ids[0] not in r.token_ids for r in res)


def test_streaming_deltas_join_to_full_text(tiny):
    _, model, tok = tiny
    for prompt in _prompts(tok)[:3]:
        params = GenerationParams(max_new_tokens=20)
        deltas = list(stream(model, tok, prompt, params, autocast=False))
        full = generate_batch(model, tok, [prompt], params, autocast=False)[0]
        assert "".join(deltas) == full.text and len(deltas) > 1


def test_stream_holds_back_a_partial_stop_string(tiny):
    _, model, tok = tiny
    prompt = _prompts(tok)[1]
    full = generate_batch(model, tok, [prompt], GenerationParams(max_new_tokens=16), autocast=False)[0]
    stop = full.text[6:9]
    deltas = list(
        stream(model, tok, prompt, GenerationParams(max_new_tokens=16, stop=[stop]), autocast=False)
    )
    assert "".join(deltas) == full.text[: full.text.index(stop)]


def test_incremental_decoder_never_splits_characters(tiny):
    _, _, tok = tiny
    text = "Café déjà vu 😀 naïve — ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # byte-level pieces: multi-byte characters span several tokens
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_sampling_is_seeded_and_independent_of_batching(tiny):
    _, model, tok = tiny
    prompts = _prompts(tok)
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=2)
    a = generate_batch(model, tok, prompts, params, autocast=False)
    b = generate_batch(model, tok, prompts[:2], params, batch_size=1, autocast=False)
    assert len(a) == 2 * len(prompts)
    assert [r.token_ids for r in a[:4]] == [r.token_ids for r in b]
    assert [r.index for r in a[:4]] == [0, 1, 0, 1]
    assert a[0].token_ids != a[1].token_ids  # the n choices differ


def _greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from a full forward per step: peft's own way of adding a learned prompt."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids])
            ids.append(int(model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "p_tuning"])
def test_prompt_learning_decodes_like_a_full_forward(tiny, method):
    """peft adds the learned prompt on every forward; the KV-cached decode must add it exactly once."""
    import warnings

    from transformers import AutoModelForCausalLM

    from tunery.generation.generate import decode_steps
    from tunery.generation.sequence import _Seq
    from tunery.methods import METHODS

    path, _, tok = tiny
    m = METHODS.get(method)
    model = m.apply(AutoModelForCausalLM.from_pretrained(path), m.options(num_virtual_tokens=4)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # a prompt that really changes the replies
    prompts = _prompts(tok)[:3]
    seqs = [_Seq(p, GenerationParams(max_new_tokens=n), tok) for p, n in zip(prompts, (6, 2, 4), strict=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated `past_key_values=` either
        for _ in decode_steps(model, tok, seqs, autocast=False):  # rows of unequal length, ending apart
            pass
        with model.disable_adapter():  # the base model, through the same wrapper
            base = generate_batch(model, tok, prompts, GenerationParams(max_new_tokens=6), autocast=False)
    got = [s.result().token_ids for s in seqs]
    assert got == [_greedy_without_cache(model, p, len(g)) for p, g in zip(prompts, got, strict=True)]
    assert [r.token_ids for r in base] == [
        r.token_ids
        for r in generate_batch(*tiny[1:], prompts, GenerationParams(max_new_tokens=6), autocast=False)
    ]
    assert any(g != b.token_ids[: len(g)] for g, b in zip(got, base, strict=True))


def test_logprobs(tiny):
    _, model, tok = tiny
    res = generate_batch(
        model,
        tok,
        _prompts(tok)[:2],
        GenerationParams(max_new_tokens=5, logprobs=True, top_logprobs=3),
        autocast=False,
    )
    for r in res:
        assert len(r.logprobs) == len(r.token_ids)
        for entry in r.logprobs:
            tops = entry["top_logprobs"]
            assert len(tops) == 3 and tops[0]["logprob"] >= tops[1]["logprob"] >= tops[2]["logprob"]
            assert entry["logprob"] == pytest.approx(tops[0]["logprob"])  # greedy takes the top token
            assert entry["logprob"] <= 0
        # Token bytes are exact: joined, they decode to the reply (partial characters included).
        raw = bytes(b for entry in r.logprobs for b in entry["bytes"])
        assert raw.decode("utf-8", errors="replace") == tok.decode(r.token_ids)


def test_invalid_params_and_context_limit(tiny):
    from tunery.errors import TuneryError

    _, model, tok = tiny
    with pytest.raises(TuneryError, match="temperature"):
        GenerationParams(temperature=3)
    with pytest.raises(TuneryError) as err:
        generate_batch(model, tok, [[5] * 600], GenerationParams())
    assert err.value.code == "context_length_exceeded"
    # A request running past the context is clipped, not refused.
    res = generate_batch(model, tok, [[5] * 508], GenerationParams(max_new_tokens=50), autocast=False)[0]
    assert res.completion_tokens == 4 and res.finish_reason == "length"


def _make_adapter(base_dir, out, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero, which would make the adapter a no-op
            p.data = torch.randn(p.shape, generator=g) * 0.3
    model.save_pretrained(out)
    return str(out)


def test_engine_adapter_switching_and_mixed_batches(tiny, tmp_path):
    from tunery.generation.engine import Engine

    path, _, tok = tiny
    a1 = _make_adapter(path, tmp_path / "a1", 1)
    a2 = _make_adapter(path, tmp_path / "a2", 2)
    prompts = _prompts(tok)[:3]
    params = GenerationParams(max_new_tokens=8)
    engine = Engine(autocast=False, max_adapters=2)
    try:

        def run(adapter):
            return [engine.generate(str(path), adapter, p, params, timeout=60)[0].token_ids for p in prompts]

        base = run(None)
        out1, out2 = run(a1), run(a2)
        assert out1 != base and out2 != base and out1 != out2
        assert run(a1) == out1 and run(None) == base  # switching back restores the outputs
        key, _ = engine.resolve(str(path), None)
        assert (
            engine._bases[key].peft.base_model.model is engine._bases[key].model
        )  # the base was never reloaded
        assert engine.stats["last_switch_ms"] < 50
        # Concurrent requests on different adapters share batches and still match one-by-one results.
        handles = [
            (exp, engine.submit(str(path), ad, p, params))
            for ad, outs in ((None, base), (a1, out1), (a2, out2))
            for p, exp in zip(prompts, outs, strict=True)
        ]
        assert all(h.result(timeout=60)[0].token_ids == exp for exp, h in handles)
        # Streaming through a handle yields the same text.
        h = engine.submit(str(path), a2, prompts[0], params)
        assert "".join(h.text_stream()) == h.result()[0].text == tok.decode(out2[0])
    finally:
        engine.close()


def _base_model_tokenizer():
    """A tokenizer like a base model's (Gemma 3's): no chat template, no `<|im_end|>` token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["positive negative mixed"] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def test_default_template_turn_end_ends_a_base_models_reply():
    """Tunery's default ChatML template ends an assistant turn with `<|im_end|>` + EOS. For a tokenizer
    without that token the marker is text, and it must end the reply (and never appear in it), streamed
    or not: a fine-tuned base model otherwise answers "positive<|im_end|>" and every label is off."""
    from tests.helpers.tiny import tiny_tokenizer
    from tunery.generation.sequence import _Seq, turn_end_markers

    tok = _base_model_tokenizer()
    assert turn_end_markers(tok) == ("<|im_end|>",)
    assert turn_end_markers(tiny_tokenizer()) == ()  # its own template; `<|im_end|>` is its EOS token
    ids = tok.encode("positive<|im_end|>\nmore")
    seq = _Seq([1], GenerationParams(max_new_tokens=len(ids) + 1), tok)
    streamed = ""
    for token in ids:
        if seq.done:
            break
        seq.accept(token, {tok.eos_token_id}, None)
        streamed += seq.take_delta()[0]
    result = seq.result()
    assert result.text == "positive" == streamed and result.finish_reason == "stop"
    # a user's own stop strings still apply beside the marker
    seq = _Seq([1], GenerationParams(max_new_tokens=len(ids) + 1, stop=["iti"]), tok)
    for token in ids:
        if not seq.done:
            seq.accept(token, {tok.eos_token_id}, None)
    assert seq.result().text == "pos"


# --------------------------------------------------------------------------- a shared prefix, prefilled once

SYSTEM = "You are a careful assistant. Answer each question in one short sentence, and never guess. " * 2


def test_shared_prefix_length_leaves_every_prompt_a_token_of_its_own():
    from tunery.generation.generate import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts (n samples of one)
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0


@pytest.mark.parametrize("arch", __import__("tests.helpers.tiny", fromlist=["x"]).DECODER_ARCHS)
def test_shared_prefix_decodes_like_whole_prompts(arch, tmp_path, monkeypatch):
    """Prompts that start alike (a system prompt) are prefilled once and copied per row, with padding
    between the prefix and each row's own tokens: the same tokens and logprobs as whole prompts, on
    every architecture; windowed ones (whose window counts cache slots, padding included) never share."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers.tiny import make_tiny_model_dir
    from tunery.generation import generate as gen

    path = make_tiny_model_dir(tmp_path / arch, arch, initializer_range=0.3)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    chats = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        for text in (
            "I loved this movie",
            "What is the capital of France? " * 3,
            "red",
            "It broke after a day.",
        )
    ]
    prompts = [gen.chat_prompt(tok, chat) for chat in chats]
    assert gen.MIN_SHARED_PREFIX <= gen.shared_prefix_length(prompts) < min(len(p) for p in prompts) - 1
    calls = []
    prefill = gen._prefill_shared
    monkeypatch.setattr(gen, "_prefill_shared", lambda *a: calls.append(a[-1].shape[0]) or prefill(*a))
    params = GenerationParams(max_new_tokens=10, logprobs=True, top_logprobs=2)
    shared = generate_batch(model, tok, prompts, params, batch_size=4, autocast=False)
    whole = generate_batch(model, tok, prompts, params, batch_size=4, autocast=False, share_prefix=False)
    windowed = bool(getattr(model.config, "sliding_window", None)) and arch != "qwen2_moe"
    assert calls == ([] if windowed else [4])
    assert [r.token_ids for r in shared] == [r.token_ids for r in whole]
    # Where rows shared a prefill, their replies still differ: each row saw its own tokens.
    assert windowed or len({tuple(r.token_ids) for r in whole}) > 1
    for a, b in zip(shared, whole, strict=True):
        got = [e["logprob"] for e in a.logprobs]
        want = [e["logprob"] for e in b.logprobs]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-4)


def test_the_server_engine_shares_a_prefill_only_within_one_request(tiny, monkeypatch):
    """A server batch mixes tenants' requests: a prefill shared between them would let one tenant's
    latency tell whether another's prompt starts like theirs. The n samples of one request share it."""
    from tunery.generation import generate as gen
    from tunery.generation.engine import Engine, GenerationHandle, _Request

    path, _, tok = tiny
    prompt = gen.chat_prompt(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}])
    other = gen.chat_prompt(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "yo"}])
    calls = []
    prefill = gen._prefill_shared
    monkeypatch.setattr(gen, "_prefill_shared", lambda *a: calls.append(a[-1].shape[0]) or prefill(*a))
    engine = Engine(autocast=False)
    try:
        key, _ = engine.resolve(str(path), None)

        def request(ids: list[int], n: int) -> _Request:
            params = GenerationParams(max_new_tokens=4, n=n, temperature=1.0 if n > 1 else 0.0, seed=1)
            return _Request(key, None, ids, params, GenerationHandle(n))

        two_tenants = [request(prompt, 1), request(other, 1)]
        engine._run_batch(two_tenants)
        assert calls == [] and all(len(r.handle.result(timeout=5)) == 1 for r in two_tenants)
        one = request(prompt, 3)
        engine._run_batch([one])
        assert calls == [3] and len(one.handle.result(timeout=5)) == 3
    finally:
        engine.close()
