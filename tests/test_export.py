"""tunery export: merged HF, GGUF (+ Modelfile), PEFT adapters and model cards, on tiny models.

Tolerances of GGUF round trips, as the largest logit difference relative to the largest reference
logit (tiny random models, hidden size 64): f32 is exact (1e-5 absolute); f16 rounds every weight to
11 significant bits (1%); q8_0 stores 8-bit blocks of 32 with one f16 scale (8%).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunery.errors import ConfigError, TuneryError
from tunery.export import export
from tunery.export.gguf_file import llama3_rope_factors, tokenizer_pre
from tunery.export.ollama import detect_format, modelfile
from tunery.export.vllm import needed_max_lora_rank, vllm_issues


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    # As in test_models: the slow real-model test keeps the user's cache, so SmolLM2's 20-40 s
    # GGUF conversion happens once per machine; everything else uses a throwaway cache.
    if "slow" not in request.keywords:
        monkeypatch.setenv("TUNERY_CACHE", str(tmp_path_factory.getbasetemp() / "tunery-cache"))


REL_TOL = {"f32": None, "f16": 1e-2, "q8_0": 8e-2}
IDS = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))


def _lora_dir(base: Path, out: Path) -> Path:
    """A PEFT LoRA adapter with random non-zero B (so merging changes the logits) + tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama, tiny_qwen2) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "llama": (tiny_llama, _lora_dir(tiny_llama, root / "llama-lora")),
        "qwen2": (tiny_qwen2, _lora_dir(tiny_qwen2, root / "qwen2-lora")),
    }


def _reference(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()


@pytest.fixture(scope="module")
def reference_logits(adapters) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {arch: _reference(*paths)(IDS).logits for arch, paths in adapters.items()}


# --------------------------------------------------------------------------- hf


@pytest.mark.slow  # heavy for the developer loop: a fresh process loads the export
def test_hf_export_is_sharded_and_loads_without_tunery(adapters, reference_logits, tmp_path):
    base, adapter = adapters["llama"]
    out = export(None, str(adapter), "hf", tmp_path / "merged", max_shard_size="100KB")
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "tunery.json").exists() and not (out / "adapter_config.json").exists()
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "assert 'tunery' not in sys.modules and 'peft' not in sys.modules\n"
        "assert tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)"
        " == '<|im_start|>user\\nhi<|im_end|>\\n'\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    logits = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(logits, reference_logits["llama"], rtol=0, atol=1e-5)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 3


def test_hf_export_bf16_qwen2(adapters, reference_logits, tmp_path):
    from transformers import AutoModelForCausalLM

    out = export(None, str(adapters["qwen2"][1]), "hf", tmp_path / "q", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(IDS).logits.float()
    ref = reference_logits["qwen2"]
    assert (logits - ref).abs().max() < 0.03 * ref.abs().max()


# --------------------------------------------------------------------------- gguf


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_through_transformers(adapters, reference_logits, tmp_path, arch, out_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = adapters[arch]
    kwargs = {"quant": out_type} if out_type.startswith("q") else {"dtype": out_type}
    out = export(None, str(adapter), "gguf", tmp_path / "g", **kwargs)
    (gguf_file,) = out.glob("*.gguf")
    assert gguf_file.name == f"{arch}-lora-{out_type}.gguf"
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name).eval()
    with torch.no_grad():
        logits = model(IDS).logits
    ref = reference_logits[arch]
    if REL_TOL[out_type] is None:
        torch.testing.assert_close(logits, ref, rtol=0, atol=1e-5)
    else:
        assert (logits - ref).abs().max() < REL_TOL[out_type] * ref.abs().max()

    tok, tok0 = (
        AutoTokenizer.from_pretrained(out, gguf_file=gguf_file.name),
        AutoTokenizer.from_pretrained(base),
    )
    text = "<|im_start|>user\nI loved this movie, 10/10!<|im_end|>\n"
    assert tok(text)["input_ids"] == tok0(text)["input_ids"]
    assert tok.chat_template == tok0.chat_template and tok.eos_token == "<|im_end|>"
    modelfile_text = (out / "Modelfile").read_text()
    assert f"FROM ./{gguf_file.name}" in modelfile_text
    assert 'PARAMETER stop "<|im_end|>"' in modelfile_text and "<|im_start|>{{ .Role }}" in modelfile_text


def test_exported_gguf_resolves_and_generates_like_the_adapter(adapters, tmp_path, monkeypatch):
    """The round trip `tunery chat --model DIR` takes: resolve the folder's one .gguf, load, generate."""
    from tunery.generation.generate import generate_batch
    from tunery.generation.loading import load_for_inference
    from tunery.generation.sequence import GenerationParams
    from tunery.models import load_tokenizer, resolve

    monkeypatch.setenv("TUNERY_CACHE", str(tmp_path / "cache"))
    base, adapter = adapters["llama"]
    out = export(None, str(adapter), "gguf", tmp_path / "g", dtype="f32")
    resolved = resolve(str(out))
    assert resolved.kind == "gguf" and resolved.name == "llama-lora-f32"
    params = GenerationParams(max_new_tokens=8)
    prompt = [[5, 6, 7, 8, 9]]
    exported, tok = load_for_inference(str(out), None)
    reference, tok0 = _reference(base, adapter), load_tokenizer(base)
    got = generate_batch(exported, tok, prompt, params)[0]
    want = generate_batch(reference, tok0, prompt, params)[0]
    assert got.completion_tokens > 0 and got.text == want.text


# --------------------------------------------------------------------------- adapter


def test_adapter_export_loads_in_peft(adapters, reference_logits, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = adapters["llama"]
    out = export("org/tiny-llama", str(adapter), "adapter", tmp_path / "a")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny-llama"  # what a server will look the base up by
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, reference_logits["llama"], rtol=0, atol=1e-6)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "vllm serve" in card and "will not load" not in card
    assert vllm_issues(cfg) == [] and needed_max_lora_rank(cfg) == 8


def test_vllm_constraints():
    good = {"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    assert vllm_issues(good) == [] and needed_max_lora_rank(good) == 16
    bad = {
        **good,
        "r": 1024,
        "use_dora": True,
        "modules_to_save": ["lm_head"],
        "target_modules": ["model.layers.0.self_attn.q_proj", "lm_head"],
        "init_lora_weights": "pissa",
    }
    text = " ".join(vllm_issues(bad))
    for needle in ("DoRA", "modules_to_save", "1024", "lm_head", "PiSSA"):
        assert needle in text, needle
    assert needed_max_lora_rank(bad) is None
    assert vllm_issues({**good, "peft_type": "PROMPT_TUNING"})


# --------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def prompt_tuning_dir(tmp_path_factory, tiny_llama) -> Path:
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("pt") / "prompt-tuning"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        out
    )
    return out


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_unmergeable_adapter_explains_the_options(prompt_tuning_dir, tmp_path, fmt):
    with pytest.raises(TuneryError) as err:
        export(None, str(prompt_tuning_dir), fmt, tmp_path / "x")
    assert "prompt tuning" in err.value.message and "nothing to merge" in err.value.message
    assert "--format adapter" in err.value.hint and "tunery chat --adapter" in err.value.hint
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_cli_renders_errors_and_exports(prompt_tuning_dir, adapters, tmp_path):
    import typer
    from typer.testing import CliRunner

    from tunery.cli.export import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # typer needs two commands to keep `export` as a sub-command
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--adapter", str(prompt_tuning_dir), "--format", "hf", "--out", "x"])
    assert res.exit_code == 2 and "nothing to merge" in res.output and "Traceback" not in res.output
    out = tmp_path / "cli-adapter"
    res = runner.invoke(
        app, ["export", "--adapter", str(adapters["llama"][1]), "--format", "adapter", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").is_file()
    res = runner.invoke(
        app, ["export", "--adapter", str(adapters["llama"][1]), "--format", "adapter", "--out", str(out)]
    )
    assert res.exit_code == 2 and "--force" in res.output


def test_option_errors(adapters, tiny_llama, tmp_path):
    adapter = str(adapters["llama"][1])
    with pytest.raises(ConfigError, match="gguf only"):
        export(None, adapter, "hf", tmp_path / "a", quant="q8_0")
    with pytest.raises(ConfigError, match="Unknown GGUF type"):
        export(None, adapter, "gguf", tmp_path / "a", quant="q3_k")
    with pytest.raises(ConfigError, match="format"):
        export(None, adapter, "onnx", tmp_path / "a")
    with pytest.raises(TuneryError, match="holds no PEFT adapter"):
        export(str(tiny_llama), None, "adapter", tmp_path / "a")


def test_full_method_dir_exports_as_hf_not_adapter(tiny_llama, tmp_path):
    """A `full` save is a plain HF model + tunery.json: merging is the identity."""
    import shutil

    from transformers import AutoModelForCausalLM

    saved = tmp_path / "run" / "model"
    shutil.copytree(tiny_llama, saved)
    (saved / "tunery.json").write_text(
        json.dumps({"base_model": str(tiny_llama), "method": "full", "objective": "sft"})
    )
    with pytest.raises(TuneryError, match="saves a full model"):
        export(None, str(saved), "adapter", tmp_path / "a")
    out = export(None, str(saved), "hf", tmp_path / "h")
    a, b = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- model card


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_llama) -> Path:
    from tests.helpers.tiny import write_chat_jsonl
    from tunery.evaluate.run import evaluate
    from tunery.export.write import _source, load_merged
    from tunery.plugins import load_config
    from tunery.train import run

    root = tmp_path_factory.mktemp("trained")
    train = write_chat_jsonl(root / "train.jsonl", n=12)
    valid = write_chat_jsonl(root / "valid.jsonl", n=4, seed=1)
    sets = {
        "model": str(tiny_llama),
        "data.train": str(train),
        "data.validation": str(valid),
        "output": str(root / "run"),
        "method": "lora",
        "lora.r": 4,
        "hyperparameters.precision": "fp32",
        "hyperparameters.n_epochs": 1,
        "hyperparameters.batch_size": 4,
    }
    result = run(load_config(sets=[f"{k}={v}" for k, v in sets.items()]))
    assert result.status == "succeeded"
    # The merged model answers exactly as base + adapter (checked above); eval.json comes from it.
    model, tok = load_merged(_source(None, result.model_dir))
    res = evaluate(model, tok, valid, max_new_tokens=3, progress=False, compute_loss=False)
    res.pop("predictions", None)
    (result.output_dir / "eval.json").write_text(json.dumps(res))
    return result.output_dir


def test_model_card_from_run(trained_run, tmp_path):
    out = export(None, str(trained_run / "model"), "adapter", tmp_path / "a")
    card = (out / "README.md").read_text()
    root = trained_run.parent
    for name in ("train.jsonl", "valid.jsonl"):
        digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert digest in card, name
    rows = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last_valid = [r for r in rows if r.get("valid_loss") is not None][-1]
    assert f"loss {last_valid['valid_loss']:.6g}" in card
    evaluation = json.loads((trained_run / "eval.json").read_text())
    assert f"| exact_match | {evaluation['exact_match']:.6g} |" in card
    assert "**Method:** lora" in card and "**Objective:** sft" in card and "| r | 4 |" in card
    assert "| n_epochs | 1 |" in card and "| batch_size | 4 |" in card
    assert card.startswith("---\nlicense: unknown\n")


def test_license_of_builtin_alias_without_loading_it():
    from tunery.export.write import base_license

    assert base_license("smollm2-135m") == "Apache-2.0"


# --------------------------------------------------------------------------- formats and details


SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def test_chat_format_detection_and_modelfile():
    from tests.helpers.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    found = detect_format(tok)
    assert found.format.name == "chatml" and found.default_system is None

    tok.chat_template = SMOLLM_TEMPLATE
    text, found = modelfile("m.gguf", tok)
    assert found.format.name == "chatml"
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text

    tok.chat_template = LLAMA3_TEMPLATE
    tok.bos_token = "<|endoftext|>"  # stands in for <|begin_of_text|>: the prefix is not in the template
    found = detect_format(tok)
    assert found is not None and found.format.name == "llama3"

    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text, found = modelfile("m.gguf", tok)
    assert found is None and "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text


def test_pre_tokenizer_names():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert tokenizer_pre({"pre_tokenizer": byte_level}) == "gpt-2"
    digits = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
    }
    assert tokenizer_pre({"pre_tokenizer": digits}) == "smollm"
    split = {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}}
    qwen = {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    assert tokenizer_pre({"pre_tokenizer": qwen}) == "qwen2"
    assert tokenizer_pre({"pre_tokenizer": None}) == "default"


def test_llama3_rope_factors_match_transformers():
    import numpy as np
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    np.testing.assert_allclose(llama3_rope_factors(rope, 64), (plain / scaled.double()).numpy(), rtol=1e-4)


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_to_gguf_q8_0(tmp_path):
    """The builtin SmolLM2-135M (Q4_1 GGUF, dequantized) exported as q8_0 and read back."""
    from transformers import AutoModelForCausalLM

    from tunery.models import load_model

    out = export("smollm2-135m", None, "gguf", tmp_path / "smol", quant="q8_0")
    (gguf_file,) = out.glob("*.gguf")
    assert gguf_file.name == "smollm2-135m-q8_0.gguf"
    card, mf = (out / "README.md").read_text(), (out / "Modelfile").read_text()
    assert "license: apache-2.0" in card and "pre-tokenizer `smollm`" in card
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in mf
    from tunery.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "The capital is Paris."
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        ref = load_model("smollm2-135m", dtype=torch.float32).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file.name).eval()(ids).logits
    # q8_0 of a Q4_1 original: every weight was already on a 4-bit grid, re-rounded to 8 bits.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85
