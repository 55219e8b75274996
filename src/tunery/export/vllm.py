"""What vLLM's LoRA loader will refuse in a PEFT adapter_config.json, checked before anyone deploys.

The rules mirror vLLM's `PEFTHelper` validation (vllm/lora/peft_helper.py) and its `LoRAConfig`
(vllm/config/lora.py); docs/export.md explains each one.
"""

from __future__ import annotations

from typing import Any

# vLLM's --max-lora-rank accepts exactly these values (MaxLoRARanks); its default is 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Linear layers vLLM can put LoRA on in Llama/Qwen2/Mistral-style decoders (q/k/v are packed into
# qkv_proj and gate/up into gate_up_proj internally; PEFT's per-module names map onto them).
VLLM_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def max_rank(cfg: dict[str, Any]) -> int:
    ranks = [int(cfg.get("r") or 0), *[int(v) for v in (cfg.get("rank_pattern") or {}).values()]]
    return max(ranks)


def needed_max_lora_rank(cfg: dict[str, Any]) -> int | None:
    """The smallest --max-lora-rank value that fits the adapter, or None if none does."""
    rank = max_rank(cfg)
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def vllm_issues(cfg: dict[str, Any]) -> list[str]:
    """Reasons vLLM would refuse (or silently mis-serve) this adapter; empty when it loads."""
    issues = []
    if cfg.get("peft_type", "LORA") != "LORA":
        issues.append(f"vLLM serves LoRA adapters only; this is {cfg.get('peft_type')}.")
    if cfg.get("use_dora"):
        issues.append("DoRA (use_dora) is not supported by vLLM; merge it instead (--format hf).")
    if cfg.get("modules_to_save"):
        issues.append(
            f"modules_to_save={cfg['modules_to_save']} is not supported: vLLM requires it to be empty, "
            "because those modules are full weight copies, not low-rank updates. Merge instead."
        )
    if (cfg.get("bias") or "none") != "none":
        issues.append(f"Adapter biases (bias={cfg['bias']!r}) are not supported by vLLM.")
    if needed_max_lora_rank(cfg) is None:
        issues.append(
            f"Rank {max_rank(cfg)} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})."
        )
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        issues.append(
            f"target_modules is the pattern {targets!r}; vLLM needs explicit module names "
            f"({', '.join(sorted(VLLM_TARGETS))})."
        )
    else:
        # PEFT saves "all-linear" expanded to full names (model.layers.0.self_attn.q_proj); vLLM
        # matches the last component against the layers it supports.
        extra = sorted({t.rsplit(".", 1)[-1] for t in targets} - VLLM_TARGETS)
        if extra:
            issues.append(
                f"LoRA on {', '.join(extra)} is not supported by vLLM for decoder models "
                f"(supported: {', '.join(sorted(VLLM_TARGETS))})."
            )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora")):
        issues.append(
            f"init_lora_weights={init!r}: PiSSA/OLoRA adapters are relative to a modified base "
            "model unless converted when saved; merge instead (--format hf)."
        )
    return issues
