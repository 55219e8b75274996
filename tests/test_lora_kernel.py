"""The fused LoRA layer computes what peft computes: outputs and every gradient, and it falls back
to peft wherever it cannot fuse."""

import copy

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

from tests.helpers.tiny import tiny_config
from tunery.train import lora_kernel
from tunery.train.lora_kernel import FusedLoraLinear, fuse_lora_layers


def _pair(arch: str = "llama", **lora):
    """(peft model, the same model with fused layers), both with non-zero B so every term counts."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch))
    opts = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear") | lora
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **opts))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    fused = copy.deepcopy(peft_model)
    return peft_model, fused, fuse_lora_layers(fused)


def _grads(model, ids, autocast: torch.dtype | None = None):
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.float().detach(), out.loss.detach(), grads


IDS = torch.tensor([[3, 17, 99, 4, 250, 8, 61, 5, 77, 300, 2, 9]])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q/k/v
def test_fused_matches_peft_outputs_and_gradients(arch):
    ref, fused, n = _pair(arch)
    assert n == 2 * 7  # every adapted linear of both layers
    assert sum(isinstance(m, FusedLoraLinear) for m in fused.modules()) == n
    logits_ref, loss_ref, g_ref = _grads(ref, IDS)
    logits, loss, g = _grads(fused, IDS)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert g.keys() == g_ref.keys() and len(g) == 2 * n  # A and B of every layer
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_matches_peft_under_bf16_autocast():
    ref, fused, _ = _pair()
    logits_ref, loss_ref, g_ref = _grads(ref, IDS, torch.bfloat16)
    logits, loss, g = _grads(fused, IDS, torch.bfloat16)
    # bf16 rounds at different points in the two paths (peft rounds the update before adding it)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logits, logits_ref, rtol=5e-2, atol=5e-2)
    for name in g_ref:
        assert g[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(g[name].flatten(), g_ref[name].flatten(), dim=0)
        assert cos > 0.99, name


def test_input_gradient_flows_through_fused_layer():
    """The input gradient (g·W + s·(g·B)·A, fused with addmm) matches autograd through peft."""
    ref, fused, _ = _pair()
    layer_ref = ref.base_model.model.model.layers[0].mlp.down_proj
    layer = fused.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 5, layer_ref.in_features, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    layer_ref(x).square().sum().backward()
    layer(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["dropout", "dora", "disabled", "switch-off", "merged"],
)
def test_falls_back_to_peft_where_it_cannot_fuse(case, monkeypatch):
    lora = {"dropout": {"lora_dropout": 0.5}, "dora": {"use_dora": True}}.get(case, {})
    ref, fused, _ = _pair(**lora)
    calls = []
    original = lora_kernel._LoraLinearFn.apply
    monkeypatch.setattr(lora_kernel._LoraLinearFn, "apply", lambda *a: calls.append(1) or original(*a))
    if case == "switch-off":
        lora_kernel.fuse_lora_layers(fused, enabled=False)
    if case == "merged":
        ref.merge_adapter()
        fused.merge_adapter()
    torch.manual_seed(1)
    if case == "disabled":
        with ref.disable_adapter():
            expected = ref(input_ids=IDS).logits
        with fused.disable_adapter():
            got = fused(input_ids=IDS).logits
    else:
        torch.manual_seed(1)
        expected = ref(input_ids=IDS).logits
        torch.manual_seed(1)
        got = fused(input_ids=IDS).logits
    assert not calls
    torch.testing.assert_close(got, expected)


def test_eval_mode_dropout_fuses_and_saved_adapter_is_peft_format(tmp_path):
    ref, fused, _ = _pair(lora_dropout=0.1)
    ref.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fused(input_ids=IDS).logits, ref(input_ids=IDS).logits, rtol=1e-5, atol=1e-5
        )
    fused.save_pretrained(tmp_path / "fused")
    ref.save_pretrained(tmp_path / "ref")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key])
