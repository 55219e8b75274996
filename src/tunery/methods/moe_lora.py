"""`moe_lora`: a mixture of LoRA experts. Each target linear gets E LoRA experts and a learned
top-k router: y = W x + (alpha/r) * sum_{e in top-k(x)} w_e(x) B_e A_e x, with w the router's
softmax renormalised over the chosen experts.

A Switch-style load-balancing loss, E * sum_e f_e * P_e (f_e: share of routing slots that went to
expert e, P_e: mean router probability of e), keeps experts in use; it reaches the loss through
`aux_loss` with a configurable coefficient. Expert utilisation is logged with every step row
(`moe_lora_load_max/min`: the busiest/idlest expert's load relative to an even split).
Routing is per token, so packed rows work as they are. It cannot merge: the expert mix changes
from token to token, so there is no single weight update to fold in.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunery.errors import ConfigError
from tunery.methods import native, register
from tunery.methods.base import Method, MoeBlock, mark_token_averaged_loss
from tunery.methods.layers import decoder_layers, float_dtype
from tunery.models.shape import ModelShape

MARK = "tunery_moe_lora"


class MoELoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experts: int = Field(4, ge=1, description="LoRA experts per target linear.")
    top_k: int = Field(2, ge=1, description="Experts each token uses.")
    r: int = Field(8, ge=1, description="Rank of each expert.")
    alpha: float = Field(16, description="Scale numerator (scale = alpha/r).")
    target_modules: str | list[str] = Field(
        "all-linear", description="Linear layer names in the decoder layers, or all-linear."
    )
    aux_loss_coef: float = Field(0.01, ge=0, description="Weight of the load-balancing loss.")
    moe: MoeBlock

    @model_validator(mode="after")
    def _check(self) -> MoELoraOptions:
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed experts ({self.experts})")
        return self


class MoELoRA(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, options: MoELoraOptions, dtype: torch.dtype):
        super().__init__()
        e, r = options.experts, options.r
        self.A = torch.nn.Parameter(torch.empty(e, r, linear.in_features, dtype=dtype))
        self.B = torch.nn.Parameter(torch.zeros(e, linear.out_features, r, dtype=dtype))
        for k in range(e):  # LoRA's init per expert: B = 0, so the model starts unchanged
            torch.nn.init.kaiming_uniform_(self.A.data[k], a=math.sqrt(5))
        self.router = torch.nn.Linear(linear.in_features, e, bias=False, dtype=dtype)
        torch.nn.init.normal_(self.router.weight, std=0.02)
        self.top_k, self.scale = options.top_k, options.alpha / r
        self.aux: torch.Tensor | None = None  # this micro-batch's balance loss, consumed by aux_loss
        self.load = torch.zeros(e)  # routing slots per expert since the last logged step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x).float()
        probs = logits.softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        ax = torch.einsum("...i,eri->...er", x, self.A) * gates.unsqueeze(-1).to(x.dtype)
        out = torch.einsum("...er,eor->...o", ax, self.B) * self.scale
        if self.training and torch.is_grad_enabled():
            e = probs.shape[-1]
            slots = F.one_hot(idx, e).flatten(0, -2).float()  # [tokens * k, E]
            share = slots.mean(0)
            self.aux = e * (share * probs.flatten(0, -2).mean(0)).sum()
            self.load += slots.sum(0).detach().cpu()
        return out


def _hook(module, args, output):
    return output + getattr(module, MARK)(args[0]).to(output.dtype)


def targets(model: torch.nn.Module, options: MoELoraOptions) -> list[tuple[str, torch.nn.Linear]]:
    _, layers = decoder_layers(model)
    wanted = options.target_modules
    found = []
    for layer in layers:
        for name, module in layer.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and (wanted == "all-linear" or leaf in wanted):
                found.append((name, module))
    if not found:
        raise ConfigError(f"moe_lora.target_modules {wanted!r} matches no linear layer.", param="moe_lora")
    return found


def apply(model: torch.nn.Module, options: MoELoraOptions) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for _, linear in targets(model, options):
        linear.add_module(MARK, MoELoRA(linear, options, float_dtype(linear)))
        linear.register_forward_hook(_hook)
    model.tunery_moe_lora_options = options
    mark_token_averaged_loss(model)
    return model


def _experts(model: torch.nn.Module) -> list[MoELoRA]:
    return [m for m in model.modules() if isinstance(m, MoELoRA)]


def aux_loss(model: torch.nn.Module) -> torch.Tensor | None:
    experts = _experts(model)
    terms = [m.aux for m in experts if m.aux is not None]
    for m in experts:
        m.aux = None
    if not terms:
        return None
    coef = model.tunery_moe_lora_options.aux_loss_coef
    return coef * torch.stack(terms).mean()


def metrics(model: torch.nn.Module) -> dict[str, Any]:
    """Load per expert relative to an even split (1.0 = balanced), summed over all target layers."""
    experts = _experts(model)
    if not experts:
        return {}
    load = torch.stack([m.load for m in experts]).sum(0)
    for m in experts:
        m.load.zero_()
    if load.sum() == 0:
        return {}
    rel = load / load.sum() * load.numel()
    return {
        "moe_lora_load_max": float(rel.max()),
        "moe_lora_load_min": float(rel.min()),
        "moe_lora_expert_load": [round(float(v), 4) for v in rel],
    }


def save(model: torch.nn.Module, out: Path) -> None:
    names = [n for n, _ in model.named_parameters() if MARK in n.split(".")]
    native.save_named(model, out, names, model.tunery_moe_lora_options, "moe_lora")


def load(base: torch.nn.Module, path: Path, trainable: bool = False) -> torch.nn.Module:
    return native.load_native(base, path, MoELoraOptions, apply, trainable)


def trainable_parameters(shape: ModelShape, options: MoELoraOptions) -> tuple[int, str]:
    experts = options.experts * shape.low_rank_parameters(options.r)
    routers = shape.layers * sum(a for a, _ in shape.linears()) * options.experts  # in -> expert logits
    return experts + routers, f"{options.experts} rank-{options.r} experts on every linear layer"


register(
    Method(
        name="moe_lora",
        description="Mixture of LoRA experts: E experts per linear, top-k router, load-balancing loss.",
        options=MoELoraOptions,
        apply=apply,
        save=save,
        load=load,
        aux_loss=aux_loss,
        metrics=metrics,
        trainable_parameters=trainable_parameters,
        merge_note="routing differs per token, so there is no single weight update to fold in",
        base_learning_rate=3e-4,
        scale="~E x LoRA (2-8%)",
    )
)
