"""Skinny decode matmuls compute what nn.Linear computes, only where they apply, and leave the model
as it was."""

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

from tests.helpers.tiny import tiny_config, tiny_tokenizer
from tunery.generation import skinny
from tunery.generation.generate import generate_batch
from tunery.generation.sequence import GenerationParams
from tunery.generation.skinny import SkinnyLinear, skinny_linears


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (8, 1), (2, 8), (2,), (16,), (17,), (3, 40)])
def test_skinny_linear_equals_linear(shape, bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 200, bias=bias)
    layer = torch.nn.Linear(96, 200, bias=bias)
    layer.load_state_dict(plain.state_dict())
    layer.__class__ = SkinnyLinear
    x = torch.randn(*shape, 96)
    y = layer(x)
    assert y.shape == (*shape, 200) and y.is_contiguous()
    torch.testing.assert_close(y, plain(x), rtol=1e-5, atol=1e-5)


def _tiny_lm():
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.eos_token_id, cfg.pad_token_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    return tf.AutoModelForCausalLM.from_config(cfg).eval(), tok


def test_context_swaps_large_models_only_and_restores(monkeypatch):
    model, _ = _tiny_lm()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    plain = [m for m in peft_model.modules() if type(m) is torch.nn.Linear]
    with skinny_linears(peft_model) as n:  # a 2-layer model stays in cache: F.linear is faster
        assert n == 0
    monkeypatch.setattr(skinny, "MIN_WEIGHT_BYTES", 0)
    with pytest.raises(RuntimeError), skinny_linears(peft_model) as n:
        assert n == len(plain) and all(type(m) is SkinnyLinear for m in plain)
        raise RuntimeError("a failing decode still gives the layers back")
    assert all(type(m) is torch.nn.Linear for m in plain)
    with skinny_linears(peft_model, enabled=False) as n:
        assert n == 0


def test_decode_with_skinny_linears_matches_plain(monkeypatch):
    model, tok = _tiny_lm()
    with torch.no_grad():  # larger weights than the default init, so tokens vary
        for p in model.parameters():
            p.mul_(8)
    prompts = [[5, 9, 33, 40], [12, 13, 14, 15, 16, 17, 18], [100, 101]]
    params = GenerationParams(max_new_tokens=12)
    monkeypatch.setattr(skinny, "MIN_WEIGHT_BYTES", 0)
    expected = [r.token_ids for r in generate_batch(model, tok, prompts, params, batch_size=3, skinny=False)]
    calls = []
    original = SkinnyLinear.forward
    monkeypatch.setattr(SkinnyLinear, "forward", lambda self, x: calls.append(1) or original(self, x))
    got = [r.token_ids for r in generate_batch(model, tok, prompts, params, batch_size=3)]
    assert calls and got == expected
    assert all(type(m) is not SkinnyLinear for m in model.modules())
