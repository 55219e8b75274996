"""The router layer for MoE base models (Mixtral, Qwen-MoE, OLMoE...), run around every method.

Why a layer over all methods rather than a method: the router loss and router freezing matter
whatever trains the experts (full, freeze, LoRA, adapters...). So every method's options declare a
`moe` block (`moe: MoeBlock`, methods/base.py): `lora: {r: 8, moe: {router_aux_loss_coef: 0.01,
train_router: false}}`, and `methods.register` registers each method `with_routers`: its apply,
save, load, aux_loss and metrics run the method's own step and then this layer's. On a dense base
the layer does nothing.

The training loop runs the decoder itself and never asks for the model's own aux loss, so the
router logits are captured with forward hooks on the router modules (the classes transformers
records as `router_logits`). The loss is transformers' Switch-style load-balancing loss over all
layers, `E * sum_e f_e * P_e`, added through `aux_loss`; expert utilisation is logged with every
step row. Routers that train are saved next to the method's files (`moe_router.safetensors`),
in router order, so they load back whatever wrapping (peft or not) the method uses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tunery.methods.base import Method, MoeOptions, mark_token_averaged_loss

ROUTER_FILE = "moe_router.safetensors"


class RouterState:
    """Router logits captured during the current training forward, and routing counts for logging."""

    def __init__(self, routers: list[torch.nn.Module], top_k: int, coef: float):
        self.routers, self.top_k, self.coef = routers, top_k, coef
        self.logits: list[torch.Tensor] = []
        self.load: torch.Tensor | None = None
        self.last_aux = 0.0

    def hook(self, module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and generation leave the training statistics alone
        logits = output[0] if isinstance(output, tuple) else output
        logits = logits.reshape(-1, logits.shape[-1])
        self.logits.append(logits)
        chosen = logits.detach().topk(self.top_k, dim=-1).indices
        counts = torch.bincount(chosen.flatten().cpu(), minlength=logits.shape[-1]).float()
        self.load = counts if self.load is None else self.load + counts


def router_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router (gate) modules: the classes transformers records as router_logits."""
    classes: set[type] = set()
    for m in model.modules():
        spec = (getattr(type(m), "_can_record_outputs", None) or {}).get("router_logits")
        target = getattr(spec, "target_class", spec)
        if isinstance(target, type):
            classes.add(target)
    if classes:
        return [m for m in model.modules() if isinstance(m, tuple(classes))]
    return [m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "Router"))]


def _config(model: torch.nn.Module):
    return getattr(model, "config", None)


def attach(model: torch.nn.Module, options: MoeOptions, trainable: bool = True) -> None:
    """Hook the routers of an MoE base and set their trainability; no-op on dense models."""
    routers = router_modules(model)
    if not routers:
        return
    cfg = _config(model)
    coef = options.router_aux_loss_coef
    if coef is None:
        coef = getattr(cfg, "router_aux_loss_coef", None) or 0.001
    state = getattr(model, "tunery_moe", None)
    if state is None:
        state = RouterState(routers, int(getattr(cfg, "num_experts_per_tok", 2) or 2), coef)
        for r in routers:
            r.register_forward_hook(state.hook)
        model.tunery_moe = state
        mark_token_averaged_loss(model)
    state.coef = coef
    if options.train_router is not None:
        # peft's all-linear also puts a LoRA on the routers (a wrapper whose base_layer is the
        # router): freezing the routing means freezing that too.
        ids = {id(r) for r in routers}
        wrappers = [m for m in model.modules() if id(getattr(m, "base_layer", None)) in ids]
        for module in [*routers, *wrappers]:
            for p in module.parameters():
                p.requires_grad_(options.train_router and trainable)


def aux_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """transformers' load_balancing_loss_func over the layers captured in this forward."""
    state: RouterState | None = getattr(model, "tunery_moe", None)
    if state is None or not state.logits:
        return None
    logits = torch.cat(state.logits, dim=0)
    state.logits = []
    probs = logits.float().softmax(-1)
    chosen = probs.topk(state.top_k, dim=-1).indices
    mask = F.one_hot(chosen, probs.shape[-1]).float()  # [tokens, k, E]
    loss = (mask.mean(0) * probs.mean(0).unsqueeze(0)).sum() * probs.shape[-1]
    state.last_aux = float(loss.detach())
    return state.coef * loss


def metrics(model: torch.nn.Module) -> dict[str, Any]:
    state: RouterState | None = getattr(model, "tunery_moe", None)
    if state is None or state.load is None or state.load.sum() == 0:
        return {}
    rel = state.load / state.load.sum() * state.load.numel()
    state.load = None
    return {
        "moe_router_aux_loss": state.last_aux,
        "moe_router_load_max": float(rel.max()),
        "moe_router_load_min": float(rel.min()),
        "moe_router_expert_load": [round(float(v), 4) for v in rel],
    }


def save_routers(model: torch.nn.Module, out: Path) -> None:
    from safetensors.torch import save_file

    routers = router_modules(model)
    tensors = {
        f"router.{i}.{n}": p.detach().cpu().contiguous()
        for i, r in enumerate(routers)
        for n, p in r.named_parameters()
    }
    save_file(tensors, str(Path(out) / ROUTER_FILE))


def load_routers(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(path) / ROUTER_FILE))
    with torch.no_grad():
        for i, r in enumerate(router_modules(model)):
            for n, p in r.named_parameters():
                p.copy_(tensors[f"router.{i}.{n}"].to(p.dtype))


def _saved_moe_options(path: Path) -> MoeOptions:
    info = Path(path) / "tunery.json"
    if info.exists():
        moe = (json.loads(info.read_text()).get("method_options") or {}).get("moe")
        if isinstance(moe, dict):
            return MoeOptions.model_validate(moe)
    return MoeOptions()


def with_routers(method: Method) -> Method:
    """`method` with the router layer after each of its own steps (see the module docstring)."""
    return dataclasses.replace(
        method,
        apply=functools.partial(_apply, method.apply),
        save=functools.partial(_save, method.save),
        load=functools.partial(_load, method.load),
        aux_loss=functools.partial(_aux_loss, method.aux_loss),
        metrics=functools.partial(_metrics, method.metrics),
    )


def _apply(own: Callable[..., torch.nn.Module], model: torch.nn.Module, opts: Any) -> torch.nn.Module:
    model = own(model, opts)
    attach(model, opts.moe)
    return model


def _save(own: Callable[[torch.nn.Module, Path], None], model: torch.nn.Module, out: Path) -> None:
    own(model, out)
    state = getattr(model, "tunery_moe", None)
    if state is not None and any(p.requires_grad for r in state.routers for p in r.parameters()):
        save_routers(model, out)


def _load(
    own: Callable[..., torch.nn.Module], base: torch.nn.Module, path: Path, trainable: bool = False
) -> torch.nn.Module:
    model = own(base, path, trainable=trainable)
    if (Path(path) / ROUTER_FILE).exists():
        load_routers(model, path)
    attach(model, _saved_moe_options(path), trainable=trainable)
    return model


def _aux_loss(
    own: Callable[[torch.nn.Module], torch.Tensor | None] | None, model: torch.nn.Module
) -> torch.Tensor | None:
    mine = own(model) if own else None
    router = aux_loss(model)
    if mine is None:
        return router
    return mine if router is None else mine + router


def _metrics(
    own: Callable[[torch.nn.Module], dict[str, Any]] | None, model: torch.nn.Module
) -> dict[str, Any]:
    return {**(own(model) if own else {}), **metrics(model)}
