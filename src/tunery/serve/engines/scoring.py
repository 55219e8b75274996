"""Prompt scoring for `/v1/completions` with `echo` and `logprobs`: the log-probability of every prompt
token given the ones before it, as OpenAI's legacy completions return it (and as `lm-eval`'s
`local-completions` reads it to score log-likelihood tasks).

`TorchEngine` is the torch `Engine` with one more kind of request, `score`. It runs on the engine's
one worker thread like every forward pass, so the active adapter is never changed under a decode.
Scores come from the model in its own dtype without autocast, exactly as a Hugging Face forward
(lm-eval's `HFLM`) computes them.

Memory: the logits of a whole prompt are prompt length x vocabulary floats (8k tokens of a 262k
vocabulary: 8 GiB). The prompt goes through in chunks with a KV cache instead, so at most
`LOGIT_BUDGET` logits exist at a time; the cache is what generating from that prompt would hold.
Prompt length is bounded by the model's context, like every prompt.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery.errors import TuneryError
from tunery.generation.engine import (
    Engine,
    GenerationHandle,
    _Request,
    adapter_name,
    check_token_ids,
    embedding_rows,
)
from tunery.generation.generate import _cache_arg
from tunery.generation.sequence import GenerationParams, _check_context, _token_entry
from tunery.models import placement

LOGIT_BUDGET = 1 << 25  # floats of logits alive at once while scoring (128 MiB in float32)
PROMPT_LEARNING = {"PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"}


@dataclass
class PromptScores:
    """The scored prompt: one entry per token ({token, logprob, bytes, top_logprobs}); the first
    token's logprob and top_logprobs are None (nothing comes before it)."""

    entries: list[dict[str, Any]]
    index: int = 0


@dataclass
class _Score(_Request):
    top: int = 0
    seqs: list[Any] = field(default_factory=list)


def refuse_prompt_learning(adapter_dir: str | None) -> None:
    """Prompt-learning adapters put virtual tokens before the prompt; their prompt scores would not
    line up with the prompt's tokens. Refused clearly rather than answered wrongly."""
    if adapter_dir is None:
        return
    try:
        cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    if str(cfg.get("peft_type", "")).upper() in PROMPT_LEARNING:
        raise TuneryError(
            f"echo with logprobs is not supported for {cfg['peft_type']} adapters (their virtual tokens "
            "come before the prompt).",
            code="unsupported_parameter",
            param="echo",
        )


def score_prompt(model: Any, tokenizer: Any, prompt: list[int], top: int = 0) -> list[dict[str, Any]]:
    """Entries for every token of `prompt`: logprob of token i given tokens before i."""
    import torch
    from transformers import DynamicCache

    first = _token_entry(tokenizer, prompt[0], 0.0)
    entries = [{**first, "logprob": None, "top_logprobs": None}]
    if len(prompt) < 2:
        return entries
    device = placement.model_device(model)
    chunk = max(1, min(len(prompt) - 1, LOGIT_BUDGET // max(1, embedding_rows(model))))
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    cache_arg = _cache_arg(model)
    ids = torch.tensor(prompt, dtype=torch.long, device=device)
    with torch.inference_mode():
        # Tokens [start, end) go in; their logits predict tokens [start + 1, end + 1).
        for start in range(0, len(prompt) - 1, chunk):
            end = min(start + chunk, len(prompt) - 1)
            out = model(
                input_ids=ids[None, start:end],
                attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                position_ids=torch.arange(start, end, device=device)[None],
                use_cache=True,
                **{cache_arg: cache},
            )
            logp = torch.log_softmax(out.logits[0].float(), dim=-1)
            del out
            targets = ids[start + 1 : end + 1]
            chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
            tops = logp.topk(top, dim=-1) if top else None
            for j, token in enumerate(targets.tolist()):
                entry = _token_entry(tokenizer, token, chosen[j])
                entry["top_logprobs"] = (
                    [
                        _token_entry(tokenizer, int(i), float(v))
                        for v, i in zip(tops.values[j].tolist(), tops.indices[j].tolist(), strict=True)
                    ]
                    if tops is not None
                    else []
                )
                entries.append(entry)
    return entries


class TorchEngine(Engine):
    """The torch engine, plus `score`: prompt log-probabilities for echo requests."""

    def score(
        self, model_spec: str | None, adapter_dir: str | None, prompt_ids: list[int], top: int = 0
    ) -> GenerationHandle:
        """Queue one prompt for scoring; `handle.result()` is `[PromptScores]`."""
        key, adapter = self.resolve(model_spec, adapter_dir)
        refuse_prompt_learning(adapter or (key.partition("::")[2] or None))
        model = self._base(key).model  # loads now: errors surface in the caller's thread
        check_token_ids(prompt_ids, embedding_rows(model))
        _check_context(model, list(prompt_ids), GenerationParams(max_new_tokens=1))
        handle = GenerationHandle(1)
        self._enqueue(
            _Score(key, adapter, list(prompt_ids), GenerationParams(max_new_tokens=1), handle, top=top)
        )
        return handle

    def _take_batch(self) -> list[_Request]:
        """A scoring request runs alone; generation batches never take one."""
        if isinstance(self._pending[0], _Score):
            return [self._pending.pop(0)]
        scores = [r for r in self._pending if isinstance(r, _Score)]
        self._pending = [r for r in self._pending if not isinstance(r, _Score)]
        try:
            return super()._take_batch()
        finally:
            self._pending.extend(scores)

    def _run_batch(self, batch: list[_Request]) -> None:
        if not isinstance(batch[0], _Score):
            return super()._run_batch(batch)
        req = batch[0]
        base = self._base(req.base_key)
        dirs = [req.adapter] if req.adapter else []
        model = self._ensure_adapters(base, dirs) if dirs else (base.peft or base.model)
        context: Any = nullcontext()
        if base.peft is not None:
            if dirs:
                base.peft.set_adapter(adapter_name(dirs[0]))
            else:
                context = base.peft.disable_adapter()  # a base-model request on a wrapped base
        with context:
            entries = score_prompt(model, base.tokenizer, req.prompt, req.top)
        req.handle._finish([PromptScores(entries)])  # type: ignore[list-item]
