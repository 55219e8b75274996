"""Models: builtin aliases, spec resolution (alias / local dir / .gguf / hub id) and loading.

Importing this package is cheap: torch and transformers are imported only when a model is loaded.
"""

from tunery.models.aliases import ALIASES, Alias
from tunery.models.gguf import cache_root
from tunery.models.load import ensure_pad_token, load_model, load_tokenizer, model_info
from tunery.models.resolve import ResolvedModel, resolve

__all__ = [
    "ALIASES",
    "Alias",
    "ResolvedModel",
    "cache_root",
    "ensure_pad_token",
    "load_model",
    "load_tokenizer",
    "model_info",
    "resolve",
]
