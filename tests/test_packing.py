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


def test_only_an_unscored_prefix_of_every_row_is_shared():
    """A shared position has one hidden state for all rows, so it may carry no target (labels are
    shifted: position t scores labels[t + 1]); short or single-row prefixes are not shared."""
    from tunery.modeling.prefix import MIN_SHARED_PREFIX, trainable_prefix_length

    prompt = list(range(100, 120))  # 20 tokens
    rows = [prompt + [1, 2, 3], prompt + [4, 5], prompt[:18] + [6, 7, 8]]
    unscored = [[IGNORE] * len(r) for r in rows]
    assert trainable_prefix_length(rows[:2], unscored[:2]) == 20
    assert trainable_prefix_length(rows, unscored) == 18  # the third row leaves the prompt at 18
    assert trainable_prefix_length(rows[:1], unscored[:1]) == 0  # nothing to share with
    scored = [list(unscored[0]), list(unscored[1])]
    scored[1][17] = rows[1][17]  # position 16 scores a token: positions 0..15 may still be shared
    assert trainable_prefix_length(rows[:2], scored) == 16 == MIN_SHARED_PREFIX
    scored[1][16] = rows[1][16]  # now only 15: too short to share
    assert trainable_prefix_length(rows[:2], scored) == 0
    batch = packed_inputs(rows[:2], unscored[:2], share_prefix=True)
    assert batch["shared_prefix"] == 20 and batch["input_ids"][0].tolist() == prompt + [1, 2, 3, 4, 5]
    assert batch["position_ids"][0].tolist() == list(range(23)) + [20, 21]
    assert batch["cu_seq_lens"].tolist() == [0, 20, 23, 25]
    assert "shared_prefix" not in packed_inputs(rows[:2], unscored[:2])  # asked for, or never
