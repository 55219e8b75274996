"""Export trained models for other runtimes: merged HF safetensors, GGUF (llama.cpp / Ollama) and
PEFT adapters (vLLM, TGI, peft), each with a model card. See docs/export.md.

Importing this package imports torch (through `tunery.methods`); transformers, peft and gguf load when
an export runs. `tunery export` is defined in `tunery/cli/export.py`, so `tunery --help` does not import it.
"""

from tunery.export.write import FORMATS, GGUF_TYPES, check_mergeable, export, load_merged

__all__ = ["FORMATS", "GGUF_TYPES", "check_mergeable", "export", "load_merged"]
