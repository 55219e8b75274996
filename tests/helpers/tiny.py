"""Tiny random models and a small tokenizer, built in-process for tests and examples.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a fixed corpus, and the
models are random transformers configs saved as ordinary Hugging Face directories, so every
code path (resolve, load, train, save, serve) runs on them exactly as on a real model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunery.config import TuneryConfig

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "I loved this movie, the acting was wonderful and the story kept me hooked.",
    "Terrible product. It broke after two days and support never answered.",
    "The battery is great but the screen scratches easily, so my feelings are mixed.",
    "positive negative mixed neutral yes no true false red green blue",
    "What is the capital of France? Paris. What is two plus two? Four.",
    '{"name": "Alice", "age": 30, "city": "Berlin"} [1, 2, 3]',
    "user assistant system tool function question answer review label sentiment",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(vocab_size: int = 512, corpus: Iterable[str] | None = None):
    """A byte-level BPE tokenizer with ChatML specials and a chat template, trained on `corpus`
    (default: a few fixed sentences; the GPU bench passes its data for realistic lengths)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4 if corpus is None else corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


# Decoder architectures the factory builds, each set so that the feature Tunery could get wrong is
# exercised by ~20-40-token test sequences: sliding windows of 8 tokens, soft-capping values the
# random logits actually reach, fused projections, q/k norms. tests/test_architectures.py runs them all.
DECODER_ARCHS = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "mixtral",
    "qwen2_moe",
)
TINY_WINDOW = 8


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides):
    """A small config of the named architecture: one of DECODER_ARCHS, or bert."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
    )
    builders = {
        "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common),
        "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common),
        # q/k RMS norms per head, tied head as in the small Qwen3 models, and Qwen3's head_dim of 128
        # (heads x head_dim != hidden; transformers' GGUF loader assumes 128 for Qwen3)
        "qwen3": lambda: tf.Qwen3Config(
            num_key_value_heads=2, head_dim=128, tie_word_embeddings=True, **common
        ),
        # sliding window on every layer
        "mistral": lambda: tf.MistralConfig(num_key_value_heads=2, sliding_window=TINY_WINDOW, **common),
        # soft-capped attention and final logits, alternating sliding/global layers, scaled embeddings
        "gemma2": lambda: tf.Gemma2Config(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=TINY_WINDOW,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            # 10x the default init, so attention scores (~3) and logits reach the caps
            initializer_range=0.2,
            **common,
        ),
        # text-only Gemma 3 (Gemma3ForCausalLM): local layers with their own rope base, then a global one
        "gemma3": lambda: tf.Gemma3TextConfig(
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=TINY_WINDOW,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **(common | {"num_hidden_layers": 3}),
        ),
        # fused qkv_proj and gate_up_proj, and Phi-3-mini's sliding window
        "phi3": lambda: tf.Phi3Config(
            num_key_value_heads=2, sliding_window=TINY_WINDOW, pad_token_id=None, eos_token_id=None, **common
        ),
        # q/k norms over the whole projection, norms after attention and MLP
        "olmo2": lambda: tf.Olmo2Config(
            num_key_value_heads=2, pad_token_id=None, eos_token_id=None, **common
        ),
        "mixtral": lambda: tf.MixtralConfig(
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=False,
            **common,
        ),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            **common,
        ),
        "bert": lambda: tf.BertConfig(**common),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {', '.join(builders)}")
    cfg = builders[arch]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_tiny_model_dir(path: str | Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny model + tokenizer as a Hugging Face directory and return its path."""
    import torch
    import transformers as tf

    path = Path(path)
    tok = tiny_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok), **overrides)
    if arch != "bert":
        cfg.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        cfg.pad_token_id = tok.pad_token_id
        cfg.bos_token_id = None
    torch.manual_seed(seed)
    model_cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    model = model_cls.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if arch != "bert":
        tf.GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id).save_pretrained(
            path
        )
    return path


COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write one JSON object a line and return the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_row(user: str, reply: str, system: str | None = None) -> dict[str, Any]:
    """One OpenAI chat example: an optional system message, a user turn and the assistant's reply."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def write_chat_jsonl(path: str | Path, n: int = 20, seed: int = 0) -> Path:
    """A small memorisable chat dataset: each question maps to a fixed colour."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tail = rng.choice(["Answer briefly.", "One word please.", "Quick question."])
        question = f"What colour is item {i}? {tail}"
        rows.append(chat_row(question, COLORS[i % len(COLORS)], system="You name colours."))
    return write_jsonl(path, rows)


def quick_run_config(model: str | Path, data: str | Path, output: str | Path, **sets: Any) -> TuneryConfig:
    """The config of a short deterministic test run: fp32, constant learning rate, no warmup.

    `sets` are dotted config keys (`**{"hyperparameters.n_epochs": 2}`), applied as `--set` would;
    they override these defaults.
    """
    from tunery.plugins import load_config

    base: dict[str, Any] = {
        "model": str(model),
        "data.train": str(data),
        "output": str(output),
        "hyperparameters.precision": "fp32",
        "hyperparameters.lr_scheduler": "constant",
        "hyperparameters.warmup_ratio": 0,
    }
    base.update(sets)
    return load_config(sets=[f"{k}={v}" for k, v in base.items()])
