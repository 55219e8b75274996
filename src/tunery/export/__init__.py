"""Export trained models for other runtimes: merged HF safetensors, GGUF (llama.cpp / Ollama) and
PEFT adapters (vLLM, TGI, peft), each with a model card. See docs/export.md.

Importing this package is cheap: torch, transformers, peft and gguf load when an export runs.
"""

from tunery.export.write import FORMATS, GGUF_TYPES, check_mergeable, export, load_merged

__all__ = ["FORMATS", "GGUF_TYPES", "check_mergeable", "export", "load_merged"]
