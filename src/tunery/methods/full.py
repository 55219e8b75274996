"""`full`: every parameter trains. Saved as a plain transformers model (safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from tunery.errors import TuneryError
from tunery.methods import register
from tunery.methods.base import Method, MoeBlock
from tunery.quiet import quiet_loading


class FullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    moe: MoeBlock


def apply(model: torch.nn.Module, options: FullOptions) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save(model: torch.nn.Module, out: Path) -> None:
    with quiet_loading():  # no "Writing model shards" bar
        model.save_pretrained(out, safe_serialization=True)


def load(base: torch.nn.Module, path: Path, trainable: bool = False) -> torch.nn.Module:
    # A full fine-tune *is* a model directory: load its weights into the base's architecture.
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = base.load_state_dict(state, strict=False)
    if unexpected:
        raise TuneryError(
            f"The weights in {path} do not fit the base model: {', '.join(unexpected[:3])}",
            hint="Load it with the base model it was fine-tuned from.",
            code="invalid_model",
        )
    if getattr(base.config, "tie_word_embeddings", False):
        base.tie_weights()
    # save_pretrained leaves out tied copies (the LM head shares the embeddings); any other tensor
    # missing from the directory would silently keep the base's values, or a new head's random ones.
    current = base.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    lost = [k for k in missing if current[k].data_ptr() not in loaded]
    if lost:
        raise TuneryError(
            f"{path} has no weights for {', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}",
            hint="It is not a complete `full` fine-tune of this base model.",
            code="invalid_model",
        )
    for p in base.parameters():
        p.requires_grad_(trainable)
    return base


register(
    Method(
        name="full",
        description="All parameters train. Best quality per example, most memory, risk of forgetting.",
        options=FullOptions,
        apply=apply,
        save=save,
        load=load,
        base_learning_rate=2e-5,
        scale="100%",
        merge=lambda model: model,
        merge_note="already a plain model",
        trainable_parameters=lambda shape, _: (shape.n_params, "all parameters train"),
    )
)
