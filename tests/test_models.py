"""tunery.models: aliases, spec resolution, GGUF conversion cache, loading and model facts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.tiny import make_tiny_model_dir
from tunery.errors import ConfigError, ModelError
from tunery.models import ALIASES, load_model, load_tokenizer, model_info, resolve
from tunery.models import gguf as gguf_mod


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    # Conversions in these tests go to a throwaway cache; the slow real-model test keeps the user's
    # cache so that its 20-40 s conversion happens once per machine, as in real use.
    if "slow" not in request.keywords:
        monkeypatch.setenv("TUNERY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model_dir(root / arch, arch) for arch in ("llama", "qwen2", "bert")}


# --------------------------------------------------------------------------- a tiny GGUF writer


def _permute_rotary(t: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter reorders q/k rows for its rotary layout; transformers' loader undoes it.
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """Write a tiny HF Llama directory as an f32 GGUF, with the keys llama.cpp's converter writes."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_license("apache-2.0")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)

    backend = json.loads(tok.backend_tokenizer.to_str())
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in backend["added_tokens"] if a["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3 = control, 1 = normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        array = tensor.float().numpy()
        if name in _TOP_NAMES:
            gname = _TOP_NAMES[name]
        else:  # model.layers.<i>.<module>.weight
            _, _, layer, *rest = name.split(".")
            module = ".".join(rest[:-1])
            gname = f"blk.{layer}.{_LAYER_NAMES[module]}.weight"
            if module == "self_attn.q_proj":
                array = _permute_rotary(array, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = _permute_rotary(array, cfg.num_key_value_heads)
        w.add_tensor(gname, np.ascontiguousarray(array, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# --------------------------------------------------------------------------- aliases


def test_alias_table_and_locations():
    assert set(ALIASES) >= {"smollm2-135m", "minilm-l6", "gemma3-270m"}
    for alias in ALIASES.values():
        # Apache-2.0, except Gemma, whose own terms are its license and are printed on first use
        gemma = alias.name == "gemma3-270m"
        assert alias.description and alias.license.startswith("Gemma Terms" if gemma else "Apache-2.0")
        assert bool(alias.terms) == gemma
    assert ALIASES["smollm2-135m"].kind == "causal-lm" and ALIASES["minilm-l6"].kind == "encoder"
    gguf_file = ALIASES["smollm2-135m"].locate()
    assert gguf_file.suffix == ".gguf" and gguf_file.stat().st_size > 50_000_000
    minilm = ALIASES["minilm-l6"].locate()
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()


def test_minilm_alias_is_an_encoder():
    info = model_info("minilm-l6")
    assert info["kind"] == "alias" and info["model_kind"] == "encoder" and info["license"] == "Apache-2.0"
    assert (info["n_layers"], info["hidden_size"], info["max_positions"]) == (6, 384, 512)
    assert 20e6 < info["n_params"] < 25e6
    with pytest.raises(ModelError, match="encoder"):
        load_model("minilm-l6")  # causal-lm is refused for an encoder
    model = load_model("minilm-l6", task="sequence-classification", num_labels=3)
    tok = load_tokenizer("minilm-l6")
    assert tok.pad_token == "[PAD]" and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["a great movie", "awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


# --------------------------------------------------------------------------- local directories


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_local_dir_loads(tiny_dirs, arch):
    resolved = resolve(str(tiny_dirs[arch]))
    assert resolved.kind == "local" and resolved.path == tiny_dirs[arch].resolve()
    model, tok = load_model(resolved), load_tokenizer(resolved)
    assert type(model).__name__.endswith("ForCausalLM") and not model.training
    assert tok.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))

    info = model_info(str(tiny_dirs[arch]))
    unique_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert info["n_params"] == unique_params
    assert info["model_kind"] == "causal-lm" and info["has_chat_template"]
    assert (info["n_layers"], info["hidden_size"], info["max_positions"]) == (2, 64, 512)


def test_tasks_and_dtype(tiny_dirs):
    clf = load_model(tiny_dirs["llama"], task="sequence-classification", num_labels=3)
    assert type(clf).__name__ == "LlamaForSequenceClassification" and clf.config.num_labels == 3
    with torch.no_grad():  # two rows of different length: needs the pad id to find the last token
        assert clf(torch.tensor([[5, 6, 7], [8, 9, clf.config.pad_token_id]])).logits.shape == (2, 3)
    assert type(load_model(tiny_dirs["bert"], task="base")).__name__ == "BertModel"
    assert load_model(tiny_dirs["qwen2"], dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        load_model(tiny_dirs["qwen2"], dtype="int3")
    with pytest.raises(ConfigError, match="task"):
        load_model(tiny_dirs["qwen2"], task="translation")


def test_new_head_load_report_shows_only_real_problems(tiny_dirs, tmp_path):
    """Creating a head, transformers' LOAD REPORT (new head MISSING, LM head UNEXPECTED) is noise; a
    report without `new_head`, or one listing a base weight, still comes through."""
    import logging
    import shutil

    from safetensors.torch import load_file, save_file

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            reports.append(record.getMessage())

    reports: list[str] = []
    log, handler = logging.getLogger("transformers.modeling_utils"), Collect()
    log.addHandler(handler)
    try:
        for arch in ("llama", "qwen2", "bert"):  # tied and untied (lm_head unexpected) decoders, an encoder
            load_model(tiny_dirs[arch], task="sequence-classification", num_labels=2, new_head=True)
        assert not [r for r in reports if "LOAD REPORT" in r]
        load_model(tiny_dirs["llama"], task="sequence-classification", num_labels=2)
        assert "LOAD REPORT" in reports[-1] and "score.weight" in reports[-1]
        broken = tmp_path / "broken"
        shutil.copytree(tiny_dirs["llama"], broken)
        weights = broken / "model.safetensors"
        state = load_file(weights)
        del state["model.norm.weight"]
        save_file(state, weights, metadata={"format": "pt"})
        reports.clear()
        load_model(broken, task="sequence-classification", num_labels=2, new_head=True)
        assert "model.norm.weight" in reports[-1] and "score.weight" in reports[-1]  # the whole report
    finally:
        log.removeHandler(handler)


def test_pad_token_falls_back_to_eos(tiny_dirs, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    path = Path(shutil.copytree(tiny_dirs["llama"], tmp_path / "nopad"))
    config = json.loads((path / "config.json").read_text())
    config["pad_token_id"] = None
    (path / "config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = None
    tok.save_pretrained(path)

    tok = load_tokenizer(path)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    model = load_model(path, task="sequence-classification", num_labels=2)
    assert model.config.pad_token_id == tok.eos_token_id


def test_bin_only_dir_is_refused(tiny_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file

    path = Path(shutil.copytree(tiny_dirs["llama"], tmp_path / "pickled"))
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="pickle") as err:
        load_model(path)
    assert "pytorch_model.bin" in str(err.value) and "safetensors" in str(err.value)
    assert "arbitrary code" in str(err.value)


def test_adapter_dir_is_not_a_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "smollm2-135m"}))
    with pytest.raises(ModelError, match="adapter") as err:
        resolve(str(tmp_path))
    assert "smollm2-135m" in str(err.value)


# --------------------------------------------------------------------------- unknown specs and the hub


@pytest.mark.parametrize("spec", ["./no/such/model", "not a model!", "missing.gguf", ""])
def test_unknown_spec_lists_aliases(spec):
    with pytest.raises(ModelError) as err:
        resolve(spec)
    text = str(err.value)
    assert "smollm2-135m" in text and "minilm-l6" in text
    assert err.value.param == "model"


def test_hub_id_offline_error_is_clear_and_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        resolve("made-up-org/no-such-model-4242")
    assert time.perf_counter() - start < 10
    text = str(err.value)
    assert "made-up-org/no-such-model-4242" in text and "offline" in text
    assert "smollm2-135m" in text and "minilm-l6" in text
    with pytest.raises(ModelError, match="Did you mean 'smollm2-135m'"):
        resolve("smollm2")  # a typo of an alias looks like a hub id; the error points at the alias


def test_hub_id_from_local_cache(monkeypatch, tmp_path, tiny_dirs):
    import shutil

    import huggingface_hub.constants

    # The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dirs["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    resolved = resolve("tiny-org/tiny-llama")
    assert resolved.kind == "hub" and resolved.name == "tiny-org/tiny-llama"
    assert resolved.path.name == commit
    assert load_model(resolved).config.num_hidden_layers == 2


# --------------------------------------------------------------------------- GGUF


def test_gguf_file_converts_once_with_equal_logits(tiny_dirs, tmp_path, monkeypatch):
    import gguf
    import numpy as np

    gguf_file = write_llama_gguf(tiny_dirs["llama"], tmp_path / "tiny-llama.gguf")
    # The plain-view reader parses what gguf's own reader parses, fields and tensors alike.
    stock, plain = gguf.GGUFReader(gguf_file), gguf_mod.read_gguf(gguf_file)
    assert list(stock.fields) == list(plain.fields) and stock.fields and len(stock.tensors) > 8
    for name, field in stock.fields.items():
        assert all(np.array_equal(a, b) for a, b in zip(field.parts, plain.fields[name].parts, strict=True))
    for a, b in zip(stock.tensors, plain.tensors, strict=True):
        assert a.name == b.name and a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data)

    # Transformers' loader would parse the header three times (tokenizer, config, weights): once here.
    parses = {"plain": 0, "stock": 0}

    class CountedReader(gguf.GGUFReader):
        def __init__(self, *args, **kwargs):
            parses["stock"] += 1
            super().__init__(*args, **kwargs)

    def counted_plain(path):
        parses["plain"] += 1
        return plain_reader(path)

    plain_reader = gguf_mod.read_gguf
    monkeypatch.setattr(gguf, "GGUFReader", CountedReader)
    monkeypatch.setattr(gguf_mod, "read_gguf", counted_plain)
    resolved = resolve(str(gguf_file))
    assert parses == {"plain": 1, "stock": 0}
    assert gguf.GGUFReader is CountedReader  # the loader's name is given back
    assert resolved.kind == "gguf" and resolved.name == "tiny-llama" and resolved.license == "apache-2.0"
    assert resolved.path.parent == tmp_path / "cache" / "models"
    config = json.loads((resolved.path / "config.json").read_text())
    assert "quantization_config" not in config  # saved as a plain model
    assert (resolved.path / "generation_config.json").is_file()

    converted, source = load_model(resolved), load_model(tiny_dirs["llama"])
    ids = torch.randint(0, source.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, source(ids).logits, rtol=0, atol=1e-5)
    tok, tok0 = load_tokenizer(resolved), load_tokenizer(tiny_dirs["llama"])
    text = "<|im_start|>user\nI loved this movie, 10/10!<|im_end|>\n"
    assert tok(text)["input_ids"] == tok0(text)["input_ids"]
    assert tok.chat_template == tok0.chat_template and tok.pad_token == "<pad>"

    # A second resolve uses the cache: no conversion, same directory.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_mod, "convert_gguf", no_conversion)
    again = resolve(str(gguf_file))
    assert again.path == resolved.path
    assert resolve(str(tmp_path)).path == resolved.path  # a folder with one .gguf names it


def test_concurrent_conversions_run_once(tmp_path, monkeypatch):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + bytes(64))
    calls = []

    def slow_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)  # long enough for the second caller to reach the lock
        (out / "config.json").write_text("{}")
        (out / gguf_mod.MARKER).write_text("{}")

    monkeypatch.setattr(gguf_mod, "convert_gguf", slow_convert)
    stale = gguf_mod.cached_dir_for(fake, "m")
    stale.parent.mkdir(parents=True)
    (stale.parent / f".{stale.name}.tmp-killed").mkdir()  # left by a killed conversion
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(gguf_mod.ensure_converted(fake, "m")))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1] == stale
    assert (stale / gguf_mod.MARKER).is_file()
    assert [p.name for p in stale.parent.iterdir() if ".tmp-" in p.name] == []


def test_unreadable_gguf_is_a_model_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(ModelError, match="broken.gguf"):
        resolve(str(bad))
    assert not any(p.name.startswith("broken-") for p in (tmp_path / "cache" / "models").iterdir())


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_alias_real_model():
    start = time.perf_counter()
    resolved = resolve("smollm2-135m")  # converts on the first run on a machine (20-40 s), then cached
    model, tok = load_model(resolved), load_tokenizer(resolved)
    assert resolved.kind == "alias" and resolved.license == "Apache-2.0"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "<|im_start|>" in tok.chat_template and "<|im_end|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>" and model.config.pad_token_id is not None
    print(f"smollm2-135m resolve+load: {time.perf_counter() - start:.1f} s")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply


def test_concurrent_loads_leave_transformers_intact(tiny_dirs):
    """transformers swaps process-wide functions (`tie_weights`, `init_weights`) while it builds a
    model. Threads loading at once (the server's engine, an evaluation, an export) used to interleave
    the swaps and leave `tie_weights` a no-op: every later load of a tied model kept its lm_head on the
    meta device. Loads now hold `LOAD_LOCK`; without it this fails on every run here."""
    import transformers

    from tunery.generation.loading import load_for_inference

    original = transformers.PreTrainedModel.tie_weights, transformers.PreTrainedModel.init_weights
    path = str(tiny_dirs["llama"])
    loaders = [lambda: load_model(path), lambda: load_for_inference(path)]
    errors: list[BaseException] = []

    def work(load):
        try:
            for _ in range(4):
                load()
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(loaders[i % 2],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (transformers.PreTrainedModel.tie_weights, transformers.PreTrainedModel.init_weights) == original
    model = load_model(path)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.slow
def test_gemma3_270m_builtin_reassembles_loads_and_says_its_terms(tmp_path, monkeypatch, capsys):
    """The second builtin family (issue 25 §2): reassembled from its chunk packages (sha256 checked),
    converted once, a Gemma 3 text model with its 262k vocabulary, its terms printed on first use and
    carried as its license; llama.cpp serving refuses it by name, so the torch engine serves it."""
    from tunery.export.gguf_file import gguf_refusal
    from tunery.generation.generate import generate_batch
    from tunery.generation.loading import load_for_inference
    from tunery.generation.sequence import GenerationParams
    from tunery.models.resolve import resolve

    monkeypatch.setenv("TUNERY_CACHE", str(tmp_path / "cache"))
    first = resolve("gemma3-270m")
    assert "Gemma Terms of Use" in capsys.readouterr().err and "Gemma Terms" in first.license
    resolve("gemma3-270m")
    assert "Gemma Terms" not in capsys.readouterr().err  # only on the use that converts it
    model, tok = load_for_inference("gemma3-270m")
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    assert 260e6 < sum(p.numel() for p in model.parameters()) < 280e6
    ids = tok("The capital of France is", add_special_tokens=True)["input_ids"]
    reply = generate_batch(model, tok, [ids], GenerationParams(max_new_tokens=6))[0]
    assert reply.completion_tokens > 0 and reply.text.strip()
    assert "gemma3_text" in gguf_refusal(model.config)
