"""Method options that change the math: LoRA variants, AdaLoRA's budget, MoE bases and moe_lora."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunery.config import load_config
from tunery.methods import METHODS, load_trained
from tunery.objectives import OBJECTIVES
from tunery.testing import make_tiny_model_dir, write_chat_jsonl
from tunery.train import run
from tunery.train.events import read_jsonl
from tunery.train.setup import make_optimizer, save_trained

torch.set_num_threads(1)  # the machine is shared; one thread is much faster under load


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", n=12)


IDS = torch.tensor([[5, 17, 33, 80, 120, 7, 9, 200], [44, 3, 19, 250, 61, 90, 11, 2]])


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(input_ids=IDS, use_cache=False).logits.float()


def applied(base: Path, name: str, **options):
    from tunery.models import load_model

    method = METHODS.get(name)
    opts = method.options.model_validate(options)
    return method.apply(load_model(str(base), dtype=torch.float32), opts), method, opts


def perturb(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def save(model, method, base: Path, out: Path, **options) -> Path:
    sets = [f"model={base}", f"method={method.name}"]
    sets += [f"{method.name}.{k}={json.dumps(v)}" for k, v in options.items()]
    save_trained(model, out, load_config(sets=sets), method, OBJECTIVES.get("sft"))
    return out


def config(base, name, out, data, **sets):
    values = {
        "model": str(base),
        "data.train": str(data),
        "output": str(out),
        "method": name,
        "hyperparameters.precision": "fp32",
        "hyperparameters.n_epochs": 2,
        "hyperparameters.batch_size": 4,
        "hyperparameters.learning_rate": 0.01,
        **sets,
    }
    return load_config(sets=[f"{k}={v}" for k, v in values.items()])


def test_rslora_scales_by_sqrt_rank(tiny_llama):
    model, _, _ = applied(tiny_llama, "lora", r=4, alpha=8, rslora=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_loraplus_gives_b_a_larger_learning_rate(tiny_llama):
    model, method, opts = applied(tiny_llama, "lora", r=4, loraplus_lr_ratio=16)
    groups = make_optimizer(model, method, opts, 1e-3, 0.0).param_groups
    b_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[1e-3 * 16] == b_ids and not (by_lr[1e-3] & b_ids)


@pytest.mark.parametrize("options", [{"dora": True}, {"init": "pissa"}, {"init": "olora"}])
def test_lora_variants_save_reload_and_merge(options, tiny_llama, tmp_path):
    base = logits(load_trained(str(tiny_llama))[0])
    model, method, _ = applied(tiny_llama, "lora", r=4, **options)
    # every variant starts as the base model: DoRA's magnitude = |W|, PiSSA/OLoRA split W exactly
    assert (logits(model) - base).abs().max() < 1e-4
    perturb(model)
    expected = logits(model)
    saved = save(model, method, tiny_llama, tmp_path / "saved", r=4, **options)
    reloaded, _ = load_trained(str(tiny_llama), str(saved))  # onto the original base weights
    assert (logits(reloaded) - expected).abs().max() < 1e-4
    merged = method.merge(reloaded)
    assert (logits(merged) - expected).abs().max() < 1e-4
