"""The benchmark's levers compute the same thing as the defaults, and its helpers count correctly."""

import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from tunery.modeling import forward
from tunery.modeling.attention import block_causal_mask, use_packed_attention
from tunery.modeling.forward import IGNORE, packed_inputs, supervised_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402

ROWS = [[5, 9, 33, 40, 41, 7], [12, 13, 14, 15], [100, 101, 102, 103, 104, 105, 106]]
LABELS = [
    [IGNORE, IGNORE, 33, 40, 41, 7],
    [IGNORE, 13, 14, 15],
    [IGNORE, IGNORE, IGNORE, 103, 104, 105, 106],
]


def test_block_causal_mask_shape_and_isolation():
    mask = block_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_mask_mode_equals_segment_mode(tiny_llama):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert use_packed_attention(model)
    batch = packed_inputs(ROWS, LABELS)
    with torch.no_grad():
        use_packed_attention(model, "segments")
        seg = forward.decoder_hidden(model, batch)
        use_packed_attention(model, "mask")
        dense = forward.decoder_hidden(model, batch)
        unpacked = torch.cat(
            [model.get_decoder()(input_ids=torch.tensor([r])).last_hidden_state for r in ROWS], 1
        )
    assert torch.allclose(seg, dense, atol=1e-5)
    assert torch.allclose(dense, unpacked, atol=1e-5), "the 4D mask let attention cross examples"


def test_full_head_gives_the_same_loss(tiny_llama):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    use_packed_attention(model)
    batch = packed_inputs(ROWS, LABELS)
    with torch.no_grad():
        sup = supervised_loss(model, batch)
        full = supervised_loss(model, {**batch, "full_head": True})  # the lever, as the loop sets it
    assert sup[2] == full[2] == 11
    assert torch.allclose(sup[0], full[0], atol=1e-5)
    assert int(sup[1]) == int(full[1])


def test_param_counts_and_flops(tiny_llama):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    counts = common.param_counts(model)
    cfg = model.config
    assert counts["head"] == cfg.vocab_size * cfg.hidden_size
    emb = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    assert counts["body"] == total - emb - (0 if tied else counts["head"])
    # 4 FLOPs per parameter per token (2 forward + 2 backward); the head only where supervised
    assert common.flops_per_token(counts, 0.5) == 4 * counts["body"] + 2 * counts["head"]


def test_steady_rate_skips_warmup():
    assert common.steady_rate([100, 50, 50], [10.0, 1.0, 1.0], warmup=1) == (50.0, 100, 2.0)
    # never drops every step: a one-step run is measured on that step
    assert common.steady_rate([30], [3.0], warmup=2) == (10.0, 30, 3.0)
    with pytest.raises(ValueError):
        common.steady_rate([1, 2], [1.0], warmup=0)


def test_heldout_loss_matches_manual_ce(tiny_llama):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    examples = [{"input_ids": r, "labels": lab} for r, lab in zip(ROWS, LABELS, strict=True)]
    model.eval()
    with torch.no_grad():
        total, _, n = supervised_loss(model, forward.padded_inputs(ROWS, 0, LABELS))
    assert common.heldout_loss(model, examples) == pytest.approx(float(total) / n, rel=1e-5)
