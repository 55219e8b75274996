"""One matrix over every tuning method, on tiny random models.

For each method: (1) exactly the intended parameters train and their count is reported;
(2) a few steps through `tunery.train.run` lower the loss; (3) saving and reloading through
`load_trained` reproduces the logits; (4) merging matches base + adapter within 1e-4 in fp32, or
the method says clearly why it cannot; (5) switching adapters by name changes the outputs and
switching back restores them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import write_chat_jsonl
from tunery.errors import ModelError
from tunery.methods import METHODS, count_parameters, load_trained
from tunery.methods.multi import AdapterSet
from tunery.plugins import load_config
from tunery.train import run
from tunery.train.events import read_jsonl
from tunery.train.setup import save_trained

# The machine is shared: one thread per test process is several times faster than two.
torch.set_num_threads(1)

# method -> (options, predicate on the names of the parameters that must train)
CASES: dict[str, tuple[dict, object]] = {
    "full": ({}, lambda n: True),
    "freeze": ({"layers": 1}, lambda n: n.startswith("model.layers.1.")),
    "lora": ({"r": 4}, lambda n: "lora_" in n),
    "qlora": ({"r": 4}, lambda n: "lora_" in n),
    "adalora": ({"init_r": 6, "target_r": 2}, lambda n: "lora_" in n),
    "ia3": ({}, lambda n: "ia3_l" in n),
    "prompt_tuning": ({"num_virtual_tokens": 4}, lambda n: "prompt_encoder" in n),
    "prefix_tuning": ({"num_virtual_tokens": 4}, lambda n: "prompt_encoder" in n),
    "p_tuning": ({"num_virtual_tokens": 4, "encoder": "lstm"}, lambda n: "prompt_encoder" in n),
    "adapter": ({"style": "houlsby", "reduction_factor": 8}, lambda n: ".tunery_adapter." in n),
    "unipelt": ({"prefix_tokens": 3}, lambda n: ".tunery_unipelt." in n),
    "moe_lora": ({"experts": 3, "top_k": 2, "r": 4}, lambda n: ".tunery_moe_lora." in n),
}
MERGEABLE = {"full", "freeze", "lora", "qlora", "adalora", "ia3"}
LR = {
    "full": 0.003,
    "freeze": 0.003,
    "ia3": 0.05,
    "prompt_tuning": 0.1,
    "prefix_tuning": 0.03,
    "p_tuning": 0.03,
}


def test_every_registered_method_is_in_the_matrix():
    assert set(METHODS.names()) == set(CASES)
    for name, m in METHODS.items():
        assert m.description and m.scale, name
        assert m.can_merge or m.merge_note, f"{name}: no merge and no merge_note"


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", n=12)


@pytest.fixture(scope="module")
def batch(tiny_llama):
    from tunery.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    ids = tok(["What colour is item 3? red", "Quick question: blue or green?"], padding=True)
    return {
        "input_ids": torch.tensor(ids["input_ids"]),
        "attention_mask": torch.tensor(ids["attention_mask"]),
    }


def _config(base: Path, name: str, out: Path, data: Path, **extra):
    opts, _ = CASES[name]
    sets = {
        "model": str(base),
        "data.train": str(data),
        "output": str(out),
        "method": name,
        "hyperparameters.precision": "fp32",
        "hyperparameters.n_epochs": 3,
        "hyperparameters.batch_size": 4,
        "hyperparameters.learning_rate": LR.get(name, 0.01),
        "hyperparameters.lr_scheduler": "constant",
        "hyperparameters.warmup_ratio": 0,
        **{f"{name}.{k}": json.dumps(v) for k, v in opts.items()},
        **extra,
    }
    return load_config(sets=[f"{k}={v}" for k, v in sets.items()])


def _applied(base: Path, name: str, seed: int = 0):
    """The method applied to a fresh base, with its trained part randomised so it is not inert."""
    from tunery.models import load_model

    method = METHODS.get(name)
    opts = method.options.model_validate(CASES[name][0])
    kwargs = method.load_kwargs(opts) if method.load_kwargs else {}
    model = method.apply(load_model(str(base), dtype=torch.float32, **kwargs), opts)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval(), method, opts


def _save(model, method, base: Path, out: Path) -> Path:
    cfg = load_config(sets=[f"model={base}", f"method={method.name}"])
    from tunery.objectives import OBJECTIVES

    save_trained(model, out, cfg, method, OBJECTIVES.get("sft"))
    return out


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits[:, -batch["input_ids"].shape[1] :].float()


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_parameters_are_the_intended_ones(name, tiny_llama, train_file, tmp_path, check_4bit_nf4):
    model, _, _ = _applied(tiny_llama, name)
    if name == "qlora":
        check_4bit_nf4(model)
    _, intended = CASES[name]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, name
    assert all(intended(n) for n in trainable), [n for n in trainable if not intended(n)][:3]
    if name != "full":  # nothing outside the method trains
        frozen_match = [n for n, p in model.named_parameters() if not p.requires_grad and intended(n)]
        assert not frozen_match or name == "adalora", frozen_match[:3]
    count, total = count_parameters(model)
    assert 0 < count <= total


@pytest.mark.parametrize("name", list(CASES))
def test_training_lowers_loss_and_reloads(name, tiny_llama, train_file, tmp_path, batch, check_4bit_nf4):
    result = run(_config(tiny_llama, name, tmp_path / "run", train_file))
    assert result.status == "succeeded"
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    losses = [r["train_loss"] for r in rows]
    assert min(losses[-2:]) < losses[0] - 0.05, losses
    # (1) the count is reported, and matches the model the method builds
    event = next(
        e for e in read_jsonl(result.output_dir / "events.jsonl") if "trainable_parameters" in e["data"]
    )
    model, _, _ = _applied(tiny_llama, name)
    assert event["data"]["trainable_parameters"] == count_parameters(model)[0]
    # the run's model dir loads through the public entry point and differs from the base
    trained, _ = load_trained(str(tiny_llama), str(result.model_dir))
    if name == "qlora":
        check_4bit_nf4(trained)  # the saved adapter reloads onto a 4-bit base, as it trained on one
    base, _ = load_trained(str(tiny_llama))
    assert not torch.allclose(_logits(trained, batch), _logits(base, batch), atol=1e-4)
    assert json.loads((result.model_dir / "tunery.json").read_text())["method"] == name


@pytest.mark.parametrize("name", list(CASES))
def test_save_reload_same_logits_and_merge(name, tiny_llama, tmp_path, batch, check_4bit_nf4):
    model, method, _ = _applied(tiny_llama, name)
    expected = _logits(model, batch)
    saved = _save(model, method, tiny_llama, tmp_path / "saved")
    reloaded, _ = load_trained(str(tiny_llama), str(saved))
    if name == "qlora":
        check_4bit_nf4(reloaded)
    assert torch.allclose(_logits(reloaded, batch), expected, atol=1e-5)
    assert not any(p.requires_grad for p in reloaded.parameters())
    if name in MERGEABLE:
        assert method.can_merge, name
        merged = method.merge(reloaded)
        assert not hasattr(merged, "peft_config")
        assert not any("lora_" in n or "ia3_" in n for n, _ in merged.named_parameters())
        if name == "qlora":
            # bitsandbytes runs its 4-bit CPU matmul in bf16 where the CPU has AVX512-BF16, so the 4-bit
            # model's logits carry bf16 rounding (6e-3 measured). The merge is checked within that; an
            # unexplained 1-2e-3 gap to the dequantized fp32 base with the adapter unmerged is open (stop 18).
            assert (_logits(merged, batch) - expected).abs().max() < 2e-2
            return
        assert (_logits(merged, batch) - expected).abs().max() < 1e-4
    else:
        assert method.merge is None and len(method.merge_note) > 20, name


@pytest.mark.parametrize("name", [n for n in CASES if n != "full"])
def test_switch_adapters_by_name(name, tiny_llama, tmp_path, batch):
    dirs = {}
    for seed, tag in enumerate(("a", "b")):
        model, method, _ = _applied(tiny_llama, name, seed=seed)
        dirs[tag] = str(_save(model, method, tiny_llama, tmp_path / tag))
    adapters = AdapterSet.load(str(tiny_llama), dirs)
    first = _logits(adapters.model, batch)
    adapters.set("b")
    second = _logits(adapters.model, batch)
    assert (first - second).abs().max() > 1e-3
    adapters.set("a")
    assert torch.allclose(_logits(adapters.model, batch), first, atol=1e-5)
    with pytest.raises(ModelError):
        adapters.set("nope")


def test_full_is_not_switchable(tiny_llama, tmp_path):
    model, method, _ = _applied(tiny_llama, "full")
    saved = str(_save(model, method, tiny_llama, tmp_path / "full"))
    with pytest.raises(ModelError, match="whole model"):
        AdapterSet.load(str(tiny_llama), {"a": saved})


@pytest.mark.parametrize("name", ["freeze", "adapter", "unipelt", "moe_lora", "ia3"])
def test_continue_training_a_saved_model(name, tiny_llama, train_file, tmp_path):
    first = run(_config(tiny_llama, name, tmp_path / "first", train_file))
    second = run(_config(tiny_llama, name, tmp_path / "second", train_file, init_from=str(first.model_dir)))
    losses_first = [r["train_loss"] for r in read_jsonl(first.output_dir / "metrics.jsonl")]
    losses_second = [r["train_loss"] for r in read_jsonl(second.output_dir / "metrics.jsonl")]
    # the second run starts where the first ended, not from the base model
    assert losses_second[0] < losses_first[0] - 0.03, (losses_first, losses_second)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied and untied LM head
def test_full_load_checks_every_weight_is_there(arch, tmp_path, tiny_llama, tiny_qwen2):
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from tunery.errors import TuneryError
    from tunery.methods import full

    src = tiny_llama if arch == "llama" else tiny_qwen2
    trained = tf.AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        trained.model.norm.weight.add_(1.0)
    trained.save_pretrained(tmp_path / "full", safe_serialization=True)
    loaded = full.load(tf.AutoModelForCausalLM.from_pretrained(src), tmp_path / "full")
    torch.testing.assert_close(loaded.model.norm.weight, trained.model.norm.weight)
    ids = torch.tensor([[3, 17, 99, 4]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)

    shard = tmp_path / "full" / "model.safetensors"
    state = load_file(shard)
    del state["model.norm.weight"]
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(TuneryError, match="has no weights for model.norm.weight"):
        full.load(tf.AutoModelForCausalLM.from_pretrained(src), tmp_path / "full")
