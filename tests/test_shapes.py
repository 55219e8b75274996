"""Shape buckets (modeling/shapes.py): lengths rounded up so bf16 on a CPU sees few shapes, and the
padding changes nothing a token-level objective computes."""

from __future__ import annotations

import pytest
import torch

from tunery.modeling.forward import supervised_loss
from tunery.modeling.shapes import bucket, pad_to_bucket
from tunery.objectives import OBJECTIVES


@pytest.mark.parametrize(
    ("n", "want"),
    [(1, 16), (16, 16), (17, 32), (256, 256), (257, 320), (1024, 1024), (1025, 1280), (4096, 4096)],
)
def test_bucket_boundaries(n, want):
    assert bucket(n) == want


def test_few_shapes_up_to_4096():
    assert len({bucket(n) for n in range(1, 4097)}) == 16 + 12 + 12


@pytest.fixture(scope="module")
def model(tiny_llama):
    from tunery.models import load_model

    torch.manual_seed(0)
    return load_model(str(tiny_llama), dtype="float32")


def _features(n_rows: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    feats = []
    for k in range(n_rows):
        ids = torch.randint(5, 400, (11 + 7 * k,), generator=g).tolist()
        labels = [-100] * 4 + ids[4:]  # the first tokens are the prompt
        feats.append({"input_ids": ids, "labels": labels})
    return feats


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, correct, n = supervised_loss(model, batch)
    loss.backward()
    return loss.detach(), int(correct), n, [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_padding_to_a_bucket_changes_no_loss_or_gradient(model, packed):
    sft = OBJECTIVES.get("sft")
    batch = sft.collate(_features(3), 0, packed)
    padded = pad_to_bucket(batch, 0)
    assert padded["input_ids"].shape[1] == bucket(batch["input_ids"].shape[1]) > batch["input_ids"].shape[1]
    assert padded["n_units"] == batch["n_units"] and padded["n_tokens"] == batch["n_tokens"]
    plain, bucketed = _loss_and_grads(model, batch), _loss_and_grads(model, padded)
    torch.testing.assert_close(bucketed[0], plain[0], rtol=1e-6, atol=1e-6)
    assert bucketed[1:3] == plain[1:3]
    for a, b in zip(bucketed[3], plain[3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_token_level_objectives_are_the_ones_bucketed():
    bucketed = {name for name, obj in OBJECTIVES.items() if obj.token_level}
    # Per-row objectives pool the last token of each row or score whole rows: padding would move them.
    assert bucketed == {"sft", "pretrain", "distill"}
