"""Loading a resolved model and its tokenizer, plus cheap facts about a model for `tunery recommend`.

Weights load from safetensors only: a pickle `.bin` file can run arbitrary code when it is
unpickled, and a fine-tuning platform loads files that users upload. `trust_remote_code` stays off
unless the caller asks for it, for the same reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
from pathlib import Path
from typing import Any, Literal

from tunery.errors import ConfigError, ModelError
from tunery.models.aliases import ALIASES
from tunery.models.load_lock import LOAD_LOCK
from tunery.models.resolve import ResolvedModel, resolve
from tunery.quiet import quiet_loading

Task = Literal["causal-lm", "sequence-classification", "base"]
_AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}
# Bidirectional encoders: transformers would happily wrap some of these in a causal-LM head,
# which trains nonsense, so causal-lm is refused for them.
ENCODER_MODEL_TYPES = frozenset(
    {
        "bert",
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "deberta",
        "deberta-v2",
        "distilbert",
        "electra",
        "albert",
        "mpnet",
        "camembert",
        "modernbert",
        "ernie",
        "nomic_bert",
        "megatron-bert",
        "mobilebert",
        "squeezebert",
        "funnel",
        "rembert",
        "roformer",
        "xlnet",
        "flaubert",
        "luke",
        "nezha",
    }
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}


def load_tokenizer(spec: str | os.PathLike | ResolvedModel, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (the eos token when the model defines none)."""
    from transformers import AutoTokenizer

    model = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(model, "tokenizer", exc) from None
    ensure_pad_token(tokenizer, model.spec)
    return tokenizer


def ensure_pad_token(tokenizer, spec: str = "the model") -> None:
    """Batches need a pad token; decoders often ship without one, and padding with eos is safe
    because padded positions are masked out of attention and of the loss."""
    if tokenizer.pad_token is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise ModelError(
        f"The tokenizer of '{spec}' has no pad, eos or unk token to pad batches with.", param="model"
    )


def load_model(
    spec: str | os.PathLike | ResolvedModel,
    *,
    dtype: Any = None,
    trust_remote_code: bool = False,
    task: Task = "causal-lm",
    num_labels: int | None = None,
    new_head: bool = False,
    **from_pretrained_kwargs: Any,
):
    """Load a model for `task` from safetensors weights; its config's pad id is always set.

    `dtype` is a torch dtype, a name ("bf16", "float32", ...) or "auto"; None keeps transformers'
    default. Extra keyword arguments go to `from_pretrained` (e.g. `quantization_config`).
    `new_head`: `spec` is a base model and the classification head is created here (left fresh, or
    filled afterwards from a trained adapter), so transformers' report of that head swap is expected
    and not shown; see `_load_new_head`.
    """
    import transformers

    model = resolve(spec)
    if task not in _AUTO_CLASSES:
        raise ConfigError(f"Unknown model task {task!r}; one of {', '.join(_AUTO_CLASSES)}.", param="task")
    check_safetensors(model)
    try:
        config = transformers.AutoConfig.from_pretrained(model.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(model, "config", exc) from None
    if task == "causal-lm" and model_kind(config.model_type, config.architectures) == "encoder":
        raise ModelError(
            f"'{model.spec}' is an encoder ({config.model_type}); it cannot generate text.",
            hint="Use it with the classify objective (a classification head), or pick a causal LM "
            "such as smollm2-135m.",
            param="model",
        )
    if task == "sequence-classification" and num_labels is not None:
        config.num_labels = num_labels  # also resets id2label/label2id to match
    if config.pad_token_id is None:
        # Sequence classification picks each row's last non-pad token by this id, and generation
        # pads finished rows with it; use the tokenizer's (eos when the model has no pad token).
        config.pad_token_id = load_tokenizer(model, trust_remote_code).pad_token_id
    kwargs: dict[str, Any] = {
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
        **from_pretrained_kwargs,
    }
    if dtype is not None:
        kwargs["dtype"] = _torch_dtype(dtype)
    auto_class = getattr(transformers, _AUTO_CLASSES[task])
    try:
        with LOAD_LOCK, quiet_loading():  # no "Loading weights" bar (tunery/quiet.py)
            if new_head:
                loaded = _load_new_head(auto_class, model.path, config, kwargs)
            else:
                loaded = auto_class.from_pretrained(model.path, config=config, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(model, "model", exc) from None
    gen = getattr(loaded, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = config.pad_token_id
    return loaded


def _load_new_head(auto_class: Any, path: Any, config: Any, kwargs: dict[str, Any]) -> Any:
    """`from_pretrained` without transformers' LOAD REPORT when it shows only the head swap.

    Creating a head on a base model, transformers warns (a table on the `transformers.modeling_utils`
    logger) that the head's weights are MISSING and, for an untied causal LM, that `lm_head.weight` is
    UNEXPECTED: keys outside the base model (`base_model_prefix`), which is exactly the swap asked for.
    The report is logged before `from_pretrained` returns the loading info, so it is held back by a
    filter (for this thread's records only) and let through if anything else is missing, unexpected
    or mismatched, or if the load fails."""
    log = logging.getLogger("transformers.modeling_utils")
    thread = threading.get_ident()
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.thread == thread and "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    log.addFilter(hold)
    expected = False
    try:
        loaded, info = auto_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
        base = f"{loaded.base_model_prefix}."
        swap = [*info["missing_keys"], *info["unexpected_keys"]]
        expected = not info["mismatched_keys"] and not any(k.startswith(base) for k in swap)
        return loaded
    finally:
        log.removeFilter(hold)
        if not expected:
            for record in held:
                log.handle(record)


def check_safetensors(model: ResolvedModel) -> None:
    """Refuse a directory whose weights exist only in pickle formats, saying why."""
    path = Path(model.path)
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"'{model.spec}' has only PyTorch pickle weights ({', '.join(pickles[:3])}); Tunery loads "
            "safetensors only, because unpickling a file can run arbitrary code hidden in it.",
            hint='If you trust the file, convert it once: python -c "from transformers import '
            f"AutoModel as M; M.from_pretrained('{path}', use_safetensors=False)"
            f".save_pretrained('{path}-safetensors')\" (use the class of your model; the tokenizer "
            "files must be copied too).",
            param="model",
        )
    raise ModelError(
        f"'{model.spec}' holds no model weights: no *.safetensors file in {path}.", param="model"
    )


def model_kind(model_type: str | None, architectures: list[str] | None) -> str:
    """'causal-lm', 'encoder' or 'other', from the config alone."""
    archs = architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        return "causal-lm"
    if model_type in ENCODER_MODEL_TYPES:
        return "encoder"
    return "other"


def model_info(spec: str | os.PathLike | ResolvedModel) -> dict[str, Any]:
    """Facts about a model read from its files without loading weights (for `tunery recommend`)."""
    model = resolve(spec)
    path = Path(model.path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot read the config.json of '{model.spec}': {exc}", param="model") from None
    text = config.get("text_config") or config  # multimodal configs nest the language model
    archs = config.get("architectures") or []
    alias = ALIASES.get(model.spec) if model.kind == "alias" else None
    return {
        "spec": model.spec,
        "name": model.name,
        "kind": model.kind,
        "path": str(path),
        "license": model.license,
        "model_type": config.get("model_type"),
        "architecture": archs[0] if archs else None,
        "model_kind": alias.kind if alias else model_kind(config.get("model_type"), archs),
        "n_params": count_safetensors_params(path),
        "n_layers": text.get("num_hidden_layers") or text.get("n_layer"),
        "hidden_size": text.get("hidden_size") or text.get("n_embd"),
        "vocab_size": text.get("vocab_size"),
        "max_positions": text.get("max_position_embeddings") or text.get("n_positions"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "tie_word_embeddings": bool(
            text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
        ),
        "has_chat_template": has_chat_template(path),
    }


def count_safetensors_params(path: Path) -> int | None:
    """Sum of tensor sizes from the safetensors headers only (a few KB read per file)."""
    total, files = 0, sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    for file in files:
        try:
            with open(file, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return None
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def has_chat_template(path: Path) -> bool:
    path = Path(path)
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise ConfigError(f"Unknown dtype {dtype!r}; use bf16, fp16, fp32 or auto.", param="dtype")
    return getattr(torch, name)


def _load_error(model: ResolvedModel, what: str, exc: Exception) -> ModelError:
    text = str(exc).strip()
    if "trust_remote_code" in text:
        return ModelError(
            f"'{model.spec}' needs custom code from its repository to load its {what}.",
            hint="Set trust_remote_code: true (or --set trust_remote_code=true) only if you trust that code.",
            param="trust_remote_code",
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return ModelError(
        f"Could not load the {what} of '{model.spec}' from {model.path}: {first}", param="model"
    )
