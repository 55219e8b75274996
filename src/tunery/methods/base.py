"""The shape every tuning method has: options, apply, save, load, and (optionally) merge.

A method module defines an options model (pydantic), builds a `Method`, and registers it in
`tunery.methods.METHODS`. The training loop, evaluation, serving and export only talk to this shape.

Every method's options end with a `moe: MoeBlock` field: the router options of MoE bases, which
`methods.register` acts on around the method's own steps (methods/moe_base.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # torch is imported where tensors are made, not to import the registry
    import torch

    from tunery.models.shape import ModelShape


# Options for MoE base models (Mixtral, Qwen-MoE, OLMoE...); on a dense base they do nothing.
class MoeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="Weight of the router load-balancing loss; default: the base's config."
    )
    train_router: bool | None = Field(
        None, description="Train (true) or freeze (false) the routers; default: as the method decides."
    )


# The `moe` field every method's options declare, last: `lora: {r: 8, moe: {train_router: false}}`.
MoeBlock = Annotated[
    MoeOptions, Field(default_factory=MoeOptions, description="MoE base models: router options.")
]


@dataclass
class Method:
    name: str
    description: str
    options: type[BaseModel]
    # apply(model, options) -> model with exactly the intended parameters trainable
    apply: Callable[[torch.nn.Module, Any], torch.nn.Module]
    # save(model, out_dir): writes what is needed to rebuild the trained part
    save: Callable[[torch.nn.Module, Path], None]
    # load(base_model, dir, trainable=False) -> model with the trained part restored; with
    # trainable=True exactly the method's parameters train again (sequential fine-tuning, resume)
    load: Callable[..., torch.nn.Module]
    base_learning_rate: float = 2e-4
    scale: str = "small"  # human summary of the trainable-parameter scale, for `tunery methods`
    # merge(model) -> plain transformers model with the method folded in; None when the math forbids it
    merge: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    merge_note: str = ""
    # load_kwargs(options) -> extra from_pretrained kwargs (qlora: quantization_config)
    load_kwargs: Callable[[Any], dict[str, Any]] | None = None
    # param_groups(model, options, lr) -> optimizer param groups (LoRA+ uses a larger lr for B)
    param_groups: Callable[[torch.nn.Module, Any, float], list[dict[str, Any]]] | None = None
    # aux_loss(model) -> extra loss term (MoE load balancing), or None; one that averages over every
    # token the forward runs marks the model with `mark_token_averaged_loss`
    aux_loss: Callable[[torch.nn.Module], torch.Tensor | None] | None = None
    # False for methods that change the forward itself (prompt learning): the loop then pads rows
    supports_packing: bool = True
    # after_step(model, step, total_steps): called right after each optimizer step, before the
    # gradients are zeroed (AdaLoRA reads them to reallocate its rank budget)
    after_step: Callable[[torch.nn.Module, int, int], None] | None = None
    # metrics(model) -> extra values merged into each logged step row (expert utilisation)
    metrics: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    # trainable_parameters(shape, options) -> (count, what trains), from the model's shape alone: what
    # cost estimates count (train/estimate.py); None is estimated as about 1% of the weights
    trainable_parameters: Callable[[ModelShape, Any], tuple[int, str]] | None = None

    @property
    def can_merge(self) -> bool:
        return self.merge is not None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their logical size."""
    import torch

    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:  # bitsandbytes Params4bit
            n = int(torch.Size(p.quant_state.shape).numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


# A model whose method adds a loss averaged over every token the forward runs (MoE router load
# balancing, MoE LoRA's gate balance), not only the supervised ones. Training then computes each row
# whole: a prefix shared by a micro-batch's rows (modeling/prefix.py) would count once, not once per
# row, and move that average.
TOKEN_AVERAGED_LOSS = "tunery_token_averaged_loss"


def mark_token_averaged_loss(model: torch.nn.Module) -> None:
    setattr(model, TOKEN_AVERAGED_LOSS, True)


def has_token_averaged_loss(model: torch.nn.Module) -> bool:
    return bool(getattr(model, TOKEN_AVERAGED_LOSS, False))
