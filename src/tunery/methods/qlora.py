"""`qlora`: LoRA on a base loaded in 4-bit NF4 with double quantization (bitsandbytes).

The frozen base weights take about a quarter of their bf16 memory; the LoRA matrices train in full
precision on top and are saved in PEFT's format, exactly like `lora`. Merging dequantizes the base
to full precision first and then folds the adapter in, so the merged model equals base + adapter
(peft's own 4-bit merge re-quantizes the sum, which changes the outputs).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field

from tunery.methods import lora, peft_common, register
from tunery.methods.base import Method, MoeBlock
from tunery.models.placement import bf16_supported
from tunery.quiet import quiet_loading


class QLoraOptions(lora.LoraFields):
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Dtype the 4-bit weights are dequantized to for each matmul; auto = bfloat16 on a GPU "
        "that computes it natively (Ampere and later), else float32.",
    )
    double_quant: bool = Field(True, description="Also quantize the quantization constants (saves ~0.4 bit).")
    moe: MoeBlock


def load_kwargs(options: QLoraOptions) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=options.double_quant,
            bnb_4bit_compute_dtype=compute_dtype(options.compute_dtype),
        )
    }


def compute_dtype(name: str) -> torch.dtype:
    """The matmul dtype: bf16 halves the dequantized weight traffic and runs on tensor cores."""
    if name == "auto":
        # bitsandbytes places the 4-bit base on the first GPU, so that is the device that computes.
        # A CPU keeps fp32: bitsandbytes' CPU kernels are its reference path, and fp32 is what merge
        # reproduces exactly.
        cuda = torch.cuda.is_available() and bf16_supported(torch.device("cuda"))
        return torch.bfloat16 if cuda else torch.float32
    return getattr(torch, name)


def apply(model: torch.nn.Module, options: QLoraOptions) -> torch.nn.Module:
    from peft import prepare_model_for_kbit_training

    # Gradient checkpointing is a memory/speed trade the loop decides on, not a QLoRA requirement.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return lora.apply(model, options)


def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Dequantize the base to full precision, then merge the LoRA update into it exactly."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = model.active_adapter
    config = copy.deepcopy(model.peft_config[name])
    config.init_lora_weights = True  # the weights are copied in below; don't re-run PiSSA/OLoRA
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}
    base = model.unload()  # the 4-bit transformers model without the LoRA layers
    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize()
    base = base.float()
    with quiet_loading():
        fresh = get_peft_model(base, config)
    set_peft_model_state_dict(fresh, state)
    return fresh.merge_and_unload()


register(
    Method(
        name="qlora",
        description="LoRA on a 4-bit NF4 (double-quantized) base via bitsandbytes; least memory.",
        options=QLoraOptions,
        apply=apply,
        save=peft_common.save,
        load=peft_common.load,
        merge=merge,
        merge_note="merges into a dequantized full-precision copy of the base",
        load_kwargs=load_kwargs,
        param_groups=lora.param_groups,
        trainable_parameters=lora.trainable_parameters,
        base_learning_rate=2e-4,
        scale="~0.5-2% (base in 4 bit)",
    )
)
