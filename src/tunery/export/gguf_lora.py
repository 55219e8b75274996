"""Write a PEFT LoRA adapter as a GGUF LoRA file, the form llama.cpp applies per request on a base GGUF.

The layout is llama.cpp's own (`convert_lora_to_gguf.py`): `general.type = adapter`, `adapter.type =
lora`, and for each adapted matrix `blk.N.attn_q.weight.lora_a` (r x in) and `.lora_b` (out x r), named
as in the base GGUF (`gguf_file.gguf_name`). The base architecture's q/k row permutation applies to
B's rows, as it does to the base weight.

llama.cpp scales each update by `alpha / rank` with one alpha per file, or by 1 when alpha is 0. PEFT's
scale differs per module under rsLoRA, `rank_pattern` and `alpha_pattern`, so the exact scale of every
module is folded into its B and the file says alpha 0: one rule for every variant.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tunery.errors import ModelError
from tunery.export.gguf_file import _PERMUTED, ARCHITECTURES, gguf_name, permute_rotary


def llamacpp_lora_issues(cfg: dict[str, Any]) -> list[str]:
    """Why llama.cpp could not apply this adapter exactly (empty when it can)."""
    issues = []
    if cfg.get("peft_type", "LORA") != "LORA":
        issues.append(f"llama.cpp applies LoRA adapters only; this is {cfg.get('peft_type')}.")
    if cfg.get("use_dora"):
        issues.append("DoRA's magnitude vectors have no GGUF LoRA form.")
    if cfg.get("modules_to_save"):
        issues.append(f"modules_to_save={cfg['modules_to_save']} are full weight copies, not LoRA.")
    if (cfg.get("bias") or "none") != "none":
        issues.append(f"adapter biases (bias={cfg['bias']!r}) have no GGUF LoRA form.")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora")):
        issues.append(f"init_lora_weights={init!r} adapters are relative to a modified base model.")
    return issues


def _scale(cfg: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA; patterns override."""
    alpha = float(cfg.get("lora_alpha") or 8)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if module.endswith(pattern):
            alpha = float(value)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _pairs(weights: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{base module name: {"A": tensor, "B": tensor}} from PEFT's saved tensor names."""
    pairs: dict[str, dict[str, Any]] = {}
    for name, tensor in weights.items():
        for part in ("A", "B"):
            marker = f".lora_{part}.weight"
            if name.endswith(marker):
                module = name[: -len(marker)].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise ModelError(
                f"The adapter has a tensor that is not a LoRA matrix: {name}.",
                hint="Serve it with --engine torch, or merge it (tunery export --format hf).",
                param="model",
            )
    return pairs


def write_gguf_lora(adapter_dir: Path, base_config: Any, path: Path) -> int:
    """Write the adapter in `adapter_dir` for a base of config `base_config` to `path` (atomically);
    returns the number of adapted matrices."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    issues = llamacpp_lora_issues(cfg)
    if issues or base_config.model_type not in ARCHITECTURES:
        raise ModelError(
            "llama.cpp cannot apply this adapter: "
            + ("; ".join(issues) or f"no GGUF layout for {base_config.model_type!r}")
            + ".",
            param="model",
        )
    arch = ARCHITECTURES[base_config.model_type]
    n_head = base_config.num_attention_heads
    n_kv = getattr(base_config, "num_key_value_heads", None) or n_head
    pairs = _pairs(load_file(str(adapter_dir / "adapter_model.safetensors")))
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # scales are folded into B
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise ModelError(f"The adapter's {module} has lora_A or lora_B missing.", param="model")
            a = ab["A"].float().numpy()
            b = ab["B"].float().numpy() * _scale(cfg, module, a.shape[0])
            name = gguf_name(module + ".weight", arch, base_config.num_hidden_layers)
            if arch in _PERMUTED and ".attn_q." in name:
                b = permute_rotary(b, n_head)
            elif arch in _PERMUTED and ".attn_k." in name:
                b = permute_rotary(b, n_kv)
            writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32))
            writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return len(pairs)
