"""One sequence being decoded: sampling settings, the sampler, stop strings, detokenization, logprobs.

Everything here is shared by every serving engine (torch, llama.cpp, vLLM) so that they answer alike:
`GenerationParams` checks a request, `_Seq` accepts tokens one at a time (stop strings, incremental
detokenization that never splits a character, OpenAI-shaped logprobs), `_pick_tokens` samples a batch
of rows, each with its own generator, and `check_context` clips a request to the model's context.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

from tunery.errors import TuneryError


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


TURN_END = "<|im_end|>"


def turn_end_markers(tokenizer: Any) -> tuple[str, ...]:
    """Text that ends a reply besides the EOS token: Tunery's default ChatML template (for models that
    ship none, data/encode.py) closes each assistant turn with `<|im_end|>` and then EOS. A base model's
    tokenizer (Gemma 3's, for one) has no such token, so the marker is plain text that a fine-tuned model
    writes before its EOS; without this it would end every reply (measured: gemma3-270m fine-tuned on
    sentiment answered "positive<|im_end|>" and scored 0%)."""
    if getattr(tokenizer, "chat_template", None):
        return ()  # the model's own template: its turn end is a token among the EOS ids
    token = tokenizer.convert_tokens_to_ids(TURN_END)  # a dict lookup: unknown -> the unk id or None
    return () if token is not None and token != tokenizer.unk_token_id else (TURN_END,)


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
        # The request's stop strings and the template's turn end: both cut the text and finish with "stop".
        self.stops = [*params.stop, *turn_end_markers(tokenizer)]
        self.max_stop = max((len(s) for s in self.stops), default=0)

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

    def accept(self, token_id: int, eos_ids: Set[int], entry: dict[str, Any] | None) -> None:
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
            for stop in self.stops:
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
                if any(s.startswith(self.text[end - k :]) for s in self.stops):
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
