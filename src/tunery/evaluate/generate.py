"""The one generation code path: eval, compare, `tunery chat`, `tunery generate` and the server use it.

A hand-written decode loop over the KV cache rather than `model.generate`, because every caller needs
something `generate` makes awkward: per-sequence stop strings and finish, per-sequence sampling
parameters (the server batches unrelated requests), streaming text deltas, OpenAI-shaped logprobs, and
dropping finished rows from the batch so they stop costing compute. Prompts are left-padded, the
prefill computes logits only for the last position, and bf16 autocast is used where the device has
native bf16 matmuls. Every tensor is made on the model's device (`models/placement.py`), and each
sampling generator lives where the probabilities are, so the loop runs unchanged on a GPU.
"""

from __future__ import annotations

import functools
import inspect
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tunery.errors import TuneryError
from tunery.models import placement
from tunery.models.unwrap import unwrap


class ContextLengthError(TuneryError):
    code = "context_length_exceeded"


@dataclass
class GenerationParams:
    """Sampling settings of one request. temperature 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [
            (self.max_new_tokens >= 1, "max_tokens", "must be at least 1"),
            (0 <= self.temperature <= 2, "temperature", "must be between 0 and 2"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.top_logprobs <= 20, "top_logprobs", "must be between 0 and 20"),
            (1 <= self.n <= 128, "n", "must be between 1 and 128"),
            (len(self.stop) <= 4, "stop", "at most 4 stop sequences are allowed"),
        ]
        for ok, param, msg in checks:
            if not ok:
                raise TuneryError(
                    f"Invalid value for '{param}': {msg}.", code="invalid_request_error", param=param
                )


@dataclass
class GenerationResult:
    token_ids: list[int]  # completion tokens (the end-of-sequence token excluded)
    text: str  # decoded completion, cut before any stop string
    finish_reason: str  # "stop" | "length"
    logprobs: list[dict[str, Any]] | None  # OpenAI `logprobs.content` entries, when asked for
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the end-of-sequence token included
    index: int = 0  # which of the request's n choices


def bf16_supported(device: Any = None) -> bool:
    """True where bf16 compute is native on `device` (default: where inference runs): a GPU with bf16,
    or a CPU with AVX512-BF16 or AMX; elsewhere bf16 is emulated and slow."""
    return placement.bf16_supported(device)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a reply: the generation config's eos ids plus the tokenizer's."""
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for value in (
        getattr(gen_cfg, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


class IncrementalDecoder:
    """Turns token ids into text deltas without ever emitting half of a multi-byte character.

    Decodes a small window (the previous token(s) plus the new ones) and emits the difference, as vLLM
    does: the window keeps sentencepiece's leading-space handling right, and a window ending in U+FFFD
    means a character is still incomplete, so nothing is emitted until its last byte arrives.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte <-> printable-unicode table, used by byte-level BPE vocabularies.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    """The raw UTF-8 bytes of one token (OpenAI's `bytes` field), exact for byte-level BPE."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = _byte_decoder()
    if isinstance(piece, str) and piece and all(ch in table for ch in piece):
        return [table[ch] for ch in piece]
    return list(tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8"))


def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    raw = token_bytes(tokenizer, token_id)
    return {"token": bytes(raw).decode("utf-8", errors="replace"), "logprob": logprob, "bytes": raw}


class _Seq:
    """One sequence being decoded: its params, sampler state, text and pending stream output."""

    def __init__(
        self,
        prompt: list[int],
        params: GenerationParams,
        tokenizer: Any,
        index: int = 0,
        adapter: str | None = None,
    ):
        import torch

        self.prompt = prompt
        self.params = params
        self.index = index
        self.adapter = adapter
        self.decoder = IncrementalDecoder(tokenizer)
        self.tokenizer = tokenizer
        self.generated: list[int] = []
        self.text = ""  # all decoded text so far (may run past a stop string until it is cut)
        self.emitted = 0  # characters of `text` already handed to the stream
        self.finish_reason: str | None = None
        self.eos_hit = False
        self.logprobs: list[dict[str, Any]] | None = [] if params.logprobs else None
        self.pending_logprobs = 0
        self.generator: torch.Generator | None = None
        self.seed: int | None = None
        if params.temperature > 0:
            seed = params.seed if params.seed is not None else random.getrandbits(62)
            self.seed = (seed * 1_000_003 + index) % (2**63)
        self.max_stop = max((len(s) for s in params.stop), default=0)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def generator_on(self, device: Any) -> Any:
        """This sequence's sampling generator, made on the device of the probabilities it samples
        from (`multinomial` refuses a generator of another device)."""
        import torch

        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed or 0)
        return self.generator

    def accept(self, token_id: int, eos_ids: set[int], entry: dict[str, Any] | None) -> None:
        self.generated.append(token_id)
        if token_id in eos_ids:
            self.eos_hit = True
            self.finish_reason = "stop"
            self.text += self.decoder.flush()
            return
        if entry is not None and self.logprobs is not None:
            self.logprobs.append(entry)
        delta = self.decoder.push(token_id)
        if delta:
            start = max(0, len(self.text) - self.max_stop + 1)
            self.text += delta
            for stop in self.params.stop:
                pos = self.text.find(stop, start)
                if pos != -1:
                    self.text = self.text[:pos]
                    self.finish_reason = "stop"
                    return
        if len(self.generated) >= self.params.max_new_tokens:
            self.text += self.decoder.flush()
            self.finish_reason = "length"

    def take_delta(self) -> tuple[str, list[dict[str, Any]]]:
        """Text safe to stream now, holding back a tail that may still become a stop string."""
        end = len(self.text)
        if not self.done:
            for k in range(min(self.max_stop - 1, end), 0, -1):
                if any(s.startswith(self.text[end - k :]) for s in self.params.stop):
                    end -= k
                    break
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        new_lp: list[dict[str, Any]] = []
        if self.logprobs is not None:
            new_lp = self.logprobs[self.pending_logprobs :]
            self.pending_logprobs = len(self.logprobs)
        return delta, new_lp

    def result(self) -> GenerationResult:
        ids = self.generated[:-1] if self.eos_hit else list(self.generated)
        return GenerationResult(
            token_ids=ids,
            text=self.text,
            finish_reason=self.finish_reason or "length",
            logprobs=self.logprobs,
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.generated),
            index=self.index,
        )


def _context_limit(model: Any) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)


def _check_context(model: Any, prompt: list[int], params: GenerationParams) -> GenerationParams:
    return check_context(_context_limit(model), prompt, params)


def check_context(limit: int | None, prompt: list[int], params: GenerationParams) -> GenerationParams:
    """Refuse an empty prompt or one that fills the `limit`-token context; clip max_new_tokens to it."""
    if not prompt:
        raise TuneryError("The prompt is empty.", code="invalid_request_error", param="messages")
    if limit is None:
        return params
    if len(prompt) >= limit:
        raise ContextLengthError(
            f"This model's maximum context length is {limit} tokens, but the prompt has {len(prompt)} "
            "tokens.",
            param="messages",
        )
    if len(prompt) + params.max_new_tokens > limit:
        # Clip rather than fail: the reply simply ends with finish_reason "length" at the limit.
        params = GenerationParams(**{**params.__dict__, "max_new_tokens": limit - len(prompt)})
    return params


def _pick_tokens(logits: Any, seqs: list[_Seq]) -> list[int]:
    """Greedy argmax for every row, then per-row sampling (own generator) where temperature > 0."""
    import torch

    chosen = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            keep = (sorted_p.cumsum(0) - sorted_p) < p.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        chosen[row] = int(torch.multinomial(probs, 1, generator=seq.generator_on(probs.device)))
    return chosen


def _entries(logp: Any, row: int, token_id: int, seq: _Seq, tokenizer: Any) -> dict[str, Any] | None:
    if not seq.params.logprobs:
        return None
    entry = _token_entry(tokenizer, token_id, float(logp[row, token_id]))
    top: list[dict[str, Any]] = []
    if seq.params.top_logprobs:
        values, ids = logp[row].topk(seq.params.top_logprobs)
        top = [_token_entry(tokenizer, int(i), float(v)) for v, i in zip(values, ids, strict=True)]
    entry["top_logprobs"] = top
    return entry


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


def decode_steps(
    model: Any,
    tokenizer: Any,
    seqs: list[_Seq],
    *,
    autocast: bool | None = None,
    mixed_adapters: bool = False,
) -> Iterator[list[_Seq]]:
    """Decode `seqs` together; yields the still-running sequences after every step.

    Finished rows are removed from the batch (and from the KV cache) at once, so a long reply does
    not make short ones keep paying for compute. With `mixed_adapters`, each row's `adapter` name is
    passed to peft as `adapter_names=` so different LoRA adapters share one batch.
    """
    import torch
    from transformers import DynamicCache

    from tunery.evaluate.skinny import skinny_linears

    if not seqs:
        return
    device = placement.model_device(model)
    use_bf16 = bf16_supported(device) if autocast is None else autocast
    use_bf16 = use_bf16 and next(model.parameters()).dtype == torch.float32
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids or {0})
    ids, mask = _left_padded([s.prompt for s in seqs], pad_id, device)
    active = list(seqs)
    want_logprobs = any(s.params.logprobs for s in seqs)
    with (
        torch.inference_mode(),
        placement.autocast(device, use_bf16),
        skinny_linears(model),  # decode steps read the weights twice as fast (evaluate/skinny.py)
    ):
        forward, step, cache, mask = _learned_prompt(model, ids, mask)
        if cache is None:
            try:
                cache = DynamicCache(config=model.config)
            except TypeError:
                cache = DynamicCache()
        cache_arg = _cache_arg(forward)
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
        for _ in decode_steps(model, tokenizer, seqs, autocast=autocast):
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
    from tunery.data import encode_prompt

    return encode_prompt(messages, tokenizer, tools)


def __getattr__(name: str) -> Any:
    # The Engine lives in its own module; re-exported here so callers find the whole path in one place.
    if name in ("Engine", "GenerationHandle"):
        from tunery.evaluate import engine

        return getattr(engine, name)
    raise AttributeError(name)
