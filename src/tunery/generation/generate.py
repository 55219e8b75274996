"""The one generation code path: eval, compare, `tunery chat`, `tunery generate`, GRPO and RLAIF
rollouts, data synthesis and the server use it. One sequence's sampling, stop strings and detokenizing
are in `sequence.py`.

A hand-written decode loop over the KV cache rather than `model.generate`, because every caller needs
something `generate` makes awkward: per-sequence stop strings and finish, per-sequence sampling
parameters (the server batches unrelated requests), streaming text deltas, OpenAI-shaped logprobs, and
dropping finished rows from the batch so they stop costing compute. Prompts are left-padded, the
prefill computes logits only for the last position, and bf16 autocast is used where it pays: a GPU with
bf16, or a CPU where bf16 matmuls are native and measured faster than fp32 (`models/cpu_bf16.py`).
Every tensor is made on the model's device (`models/placement.py`), and each sampling generator lives
where the probabilities are, so the loop runs unchanged on a GPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from tunery.data import encode_prompt
from tunery.generation.sequence import (
    GenerationParams,
    GenerationResult,
    _check_context,
    _entries,
    _pick_tokens,
    _Seq,
    eos_token_ids,
)
from tunery.generation.skinny import skinny_linears
from tunery.modeling.prefix import MIN_SHARED_PREFIX, shared_prefix_length
from tunery.models import placement
from tunery.models.unwrap import unwrap


def bf16_supported(device: Any = None) -> bool:
    """True where to autocast to bf16 on `device` (default: where inference runs): a GPU with bf16, or
    a CPU with native bf16 (AVX512-BF16 or AMX) where bf16 is also measured faster than fp32
    (`models/cpu_bf16.py`); elsewhere fp32 is faster."""
    return placement.bf16_supported(device)


def _cache_arg(model: Any) -> str:
    """The forward's KV-cache argument: transformers 5.24 renamed `past_key_values` to `cache` (the old
    name warns, and goes in 5.40); older versions and remote-code models only take `past_key_values`."""
    base = unwrap(model)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _learned_prompt(model: Any, ids: Any, mask: Any) -> tuple[Any, dict[str, Any], Any, Any]:
    """(model to call, first-step inputs, prefilled cache or None, attention mask) for the decode loop.

    peft's forward adds a prompt-learning adapter's prompt on every call (for prefix tuning a fresh
    prefix cache that replaces the caller's; otherwise virtual tokens prepended again), which is right for
    one full forward but not for a KV-cached decode. So the prompt goes in once, before the first step,
    and the base model runs every step."""
    import torch

    cfg = getattr(model, "active_peft_config", None)
    if not getattr(cfg, "is_prompt_learning", False) or getattr(model, "_adapters_disabled", False):
        return model, {"input_ids": ids}, None, mask
    base = model.get_base_model()
    prompt = model.get_prompt(ids.shape[0])
    virtual = torch.ones((ids.shape[0], cfg.num_virtual_tokens), dtype=mask.dtype, device=mask.device)
    mask = torch.cat([virtual, mask], dim=1)
    if isinstance(prompt, torch.Tensor):  # prompt tuning, p-tuning: virtual-token embeddings
        embeds = base.get_input_embeddings()(ids)
        return base, {"inputs_embeds": torch.cat([prompt.to(embeds.dtype), embeds], dim=1)}, None, mask
    return base, {"input_ids": ids}, prompt, mask  # prefix tuning: the key/value prefixes, as a cache


def _left_padded(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(ids, attention mask) of left-padded prompts, built on the host and copied to `device` once."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def can_share_prefix(model: Any) -> bool:
    """Whether rows of `model` may share one prefill of a common prefix: the shared rows then hold
    padding between the prefix and their own tokens. Positions follow the mask, so full attention sees
    exactly the unpadded prompt; a sliding window counts cache slots, padding included, so windowed
    layers would not (those models prefill every row whole). A learned prompt that peft prepends gives
    the same tokens other keys and values, and so do rows on different adapters (`decode_steps` never
    shares a mixed-adapter batch)."""
    cfg = getattr(unwrap(model), "config", None)
    peft_cfg = getattr(model, "active_peft_config", None)
    if getattr(peft_cfg, "is_prompt_learning", False):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return all(kind == "full_attention" for kind in layer_types)
    return not getattr(cfg, "sliding_window", None)


def _shared_tokens(model: Any, prompts: list[list[int]], allowed: bool) -> int:
    """How many leading tokens the batch prefills once for all rows (0: every row whole). A system
    prompt, few-shot examples or the n samples of one prompt are shared where `can_share_prefix`
    allows; tests/test_generate.py compares the tokens and logprobs with whole prompts on every
    architecture."""
    if not allowed or len(prompts) < 2 or not can_share_prefix(model):
        return 0
    shared = shared_prefix_length(prompts)
    return shared if shared >= MIN_SHARED_PREFIX else 0


def _prefill_shared(forward: Any, cache_arg: str, cache: Any, prefix: list[int], mask: Any) -> Any:
    """Run the shared prefix once, give every row its own copy of the prefix's keys and values, and
    return the rows' attention mask with the prefix's columns in front."""
    import torch

    ids = torch.tensor([prefix], dtype=torch.long, device=mask.device)
    positions = torch.arange(len(prefix), device=mask.device)[None]
    forward(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: cache},
    )
    cache.batch_repeat_interleave(mask.shape[0])
    return torch.cat([mask.new_ones((mask.shape[0], len(prefix))), mask], dim=1)


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def decode_steps(
    model: Any,
    tokenizer: Any,
    seqs: list[_Seq],
    *,
    autocast: bool | None = None,
    mixed_adapters: bool = False,
    skinny: bool = True,
    share_prefix: bool = True,
) -> Iterator[list[_Seq]]:
    """Decode `seqs` together; yields the still-running sequences after every step.

    Finished rows are removed from the batch (and from the KV cache) at once, so a long reply does
    not make short ones keep paying for compute. With `mixed_adapters`, each row's `adapter` name is
    passed to peft as `adapter_names=` so different LoRA adapters share one batch. `skinny=False`
    turns off the skinny decode matmuls (generation/skinny.py; the benchmark measures the lever).
    A prefix common to every prompt is prefilled once (`_shared_tokens`); `share_prefix=False` turns
    that off.
    """
    import torch

    if not seqs:
        return
    device = placement.model_device(model)
    use_bf16 = bf16_supported(device) if autocast is None else autocast
    use_bf16 = use_bf16 and next(model.parameters()).dtype == torch.float32
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids or {0})
    prompts = [s.prompt for s in seqs]
    shared = _shared_tokens(model, prompts, share_prefix and not mixed_adapters)
    ids, mask = _left_padded([p[shared:] for p in prompts], pad_id, device)
    active = list(seqs)
    want_logprobs = any(s.params.logprobs for s in seqs)
    with (
        torch.inference_mode(),
        placement.autocast(device, use_bf16),
        skinny_linears(model, skinny),  # decode steps read the weights twice as fast (generation/skinny.py)
    ):
        forward, step, cache, mask = _learned_prompt(model, ids, mask)
        cache = _new_cache(model) if cache is None else cache
        cache_arg = _cache_arg(forward)
        if shared:
            mask = _prefill_shared(forward, cache_arg, cache, prompts[0][:shared], mask)
        # Positions follow the mask, virtual tokens included (peft numbers the real tokens after them);
        # a prefix-tuning cache already holds the mask's first columns.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        step_pos = positions[:, cache.get_seq_length() :]
        while True:
            extra = {"adapter_names": [s.adapter or "__base__" for s in active]} if mixed_adapters else {}
            out = forward(
                **step,
                attention_mask=mask,
                position_ids=step_pos,
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: cache},
                **extra,
            )
            logits = out.logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1) if want_logprobs else None
            chosen = _pick_tokens(logits, active)
            for row, (seq, tok) in enumerate(zip(active, chosen, strict=True)):
                seq.accept(tok, eos_ids, _entries(logp, row, tok, seq, tokenizer))
            yield active
            # Computed after the yield so a consumer can finish a row (a cancelled request) early.
            keep = [row for row, s in enumerate(active) if not s.done]
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                chosen = [chosen[r] for r in keep]
                active = [active[r] for r in keep]
            step = {"input_ids": torch.tensor(chosen, dtype=torch.long, device=device)[:, None]}
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            positions = positions[:, -1:] + 1
            step_pos = positions


def generate_batch(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    params: GenerationParams,
    *,
    batch_size: int = 8,
    autocast: bool | None = None,
    on_done: Callable[[int], None] | None = None,
    skinny: bool = True,
    share_prefix: bool = True,
) -> list[GenerationResult]:
    """Generate a completion for every prompt (token ids); results come back in prompt order.

    With `params.n > 1` the result list is prompt-major: n results for prompt 0, then prompt 1, ...
    Prompts are sorted by length before batching so rows in a batch need little padding.
    `on_done(k)` is called after each batch with the number of results it finished (progress bars).
    """
    jobs = []
    for p_index, prompt in enumerate(prompts):
        p = _check_context(model, list(prompt), params)
        jobs.extend((p_index * params.n + i, list(prompt), p, i) for i in range(params.n))
    jobs.sort(key=lambda job: -len(job[1]))
    results: list[GenerationResult | None] = [None] * len(jobs)
    for start in range(0, len(jobs), max(1, batch_size)):
        chunk = jobs[start : start + batch_size]
        seqs = [_Seq(prompt, p, tokenizer, index=i) for _, prompt, p, i in chunk]
        for _ in decode_steps(
            model, tokenizer, seqs, autocast=autocast, skinny=skinny, share_prefix=share_prefix
        ):
            pass
        for (slot, *_), seq in zip(chunk, seqs, strict=True):
            results[slot] = seq.result()
        if on_done is not None:
            on_done(len(chunk))
    return [r for r in results if r is not None]


def stream(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    params: GenerationParams,
    *,
    autocast: bool | None = None,
) -> Iterator[str]:
    """Yield text deltas of one completion as they are decoded (joined, they equal the full text)."""
    p = _check_context(model, list(prompt_ids), params)
    seq = _Seq(list(prompt_ids), GenerationParams(**{**p.__dict__, "n": 1}), tokenizer)
    for _ in decode_steps(model, tokenizer, [seq], autocast=autocast):
        delta, _lp = seq.take_delta()
        if delta:
            yield delta


def chat_prompt(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template, ready for the reply.

    The same rendering as training (`tunery.data.encode_prompt`), so inference sees the ids the
    model was trained on; models without a template get Tunery's default ChatML template.
    """
    return encode_prompt(messages, tokenizer, tools)
