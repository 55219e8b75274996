"""Several trained adapters of one method on one base model, switched by name.

peft methods use peft's own multi-adapter support (`load_adapter` + `set_adapter`); methods
implemented in Tunery swap their saved tensors in place (`native.WeightSwitcher`). Either way the
base is loaded once. A `full` fine-tune is a whole model, not an adapter, so it cannot be switched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunery.errors import ModelError
from tunery.methods import native
from tunery.methods.loading import load_trained, read_info


class AdapterSet:
    """`AdapterSet.load(base, {"a": dir_a, "b": dir_b})`, then `.set("b")`, `.model(...)`."""

    def __init__(self, model: torch.nn.Module, tokenizer, method: str, first: str, path: str):
        self.model, self.tokenizer, self.method = model, tokenizer, method
        self.names = [first]
        self.active = first
        self._peft = hasattr(model, "set_adapter") and hasattr(model, "peft_config")
        self._switch = None if self._peft else native.WeightSwitcher(model, first, native.read_weights(path))

    @classmethod
    def load(cls, model: str | None, adapters: dict[str, str], *, dtype=None) -> AdapterSet:
        if not adapters:
            raise ModelError("No adapters given.", param="adapter")
        infos = {name: read_info(path) for name, path in adapters.items()}
        methods = {info["method"] for info in infos.values()}
        if len(methods) > 1:
            raise ModelError(
                f"Adapters of different methods ({', '.join(sorted(methods))}) cannot share one base.",
                hint="Load each method's adapters into its own AdapterSet.",
            )
        method = methods.pop()
        if method == "full":
            raise ModelError("A full fine-tune is a whole model, not a switchable adapter.", param="adapter")
        first, *rest = adapters
        loaded, tokenizer = load_trained(model, infos[first]["path"], dtype=dtype)
        out = cls(loaded, tokenizer, method, first, infos[first]["path"])
        for name in rest:
            out.add(name, infos[name]["path"])
        return out

    def add(self, name: str, path: str | Path) -> None:
        if name in self.names:
            raise ModelError(f"An adapter named {name!r} is already loaded.")
        info = read_info(path)
        if info["method"] != self.method:
            raise ModelError(f"{path} was trained with {info['method']!r}, not {self.method!r}.")
        if self._peft:
            self.model.load_adapter(info["path"], adapter_name=name)
        else:
            self._switch.add(name, Path(info["path"]))
        self.names.append(name)

    def set(self, name: str) -> None:
        if name not in self.names:
            raise ModelError(f"No adapter named {name!r}; loaded: {', '.join(self.names)}.")
        if self._peft:
            # peft names the first adapter "default"
            self.model.set_adapter("default" if name == self.names[0] else name)
        else:
            self._switch.set(name)
        self.active = name
