"""Packed rows with per-example attention give the same logits and loss as unpacked examples."""

import pytest
import torch
import transformers as tf

from tunery.modeling.attention import use_packed_attention
from tunery.modeling.forward import IGNORE, packed_inputs, padded_inputs, supervised_loss


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_packed_hidden_equals_unpacked(fixture, request):
    path = request.getfixturevalue(fixture)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [[5, 9, 33, 40, 41, 7], [12, 13, 14], [100, 101, 102, 103, 104, 105, 106, 107]]
    with torch.no_grad():
        unpacked = [model(input_ids=torch.tensor([r])).logits[0] for r in rows]
        assert use_packed_attention(model)
        batch = packed_inputs(rows)
        decoder = model.get_decoder()
        h = decoder(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            cu_seq_lens_q=batch["cu_seq_lens"],
            cu_seq_lens_k=batch["cu_seq_lens"],
            max_length_q=batch["max_len"],
            max_length_k=batch["max_len"],
        ).last_hidden_state
        packed = model.lm_head(h)[0]
    start = 0
    for r, ref in zip(rows, unpacked, strict=True):
        assert torch.allclose(packed[start : start + len(r)], ref, atol=1e-5), (
            "attention leaked across examples"
        )
        start += len(r)


def test_packed_loss_equals_padded_loss(tiny_llama):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rows = [[5, 9, 33, 40, 41, 7], [12, 13, 14, 15], [100, 101, 102, 103, 104]]
    labels = [[IGNORE, IGNORE, 33, 40, 41, 7], [IGNORE, 13, 14, 15], [IGNORE, IGNORE, IGNORE, 103, 104]]
    with torch.no_grad():
        padded = supervised_loss(model, padded_inputs(rows, 0, labels))
        use_packed_attention(model)
        packed = supervised_loss(model, packed_inputs(rows, labels))
    assert padded[2] == packed[2] == 9
    assert torch.allclose(padded[0], packed[0], atol=1e-5)
    assert int(padded[1]) == int(packed[1])
