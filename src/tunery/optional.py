"""The one list of imports that may sit inside a function. Every other import is at the top of its
module (tests/test_layers.py walks the source and fails on any other function-local import).

A function-local import is allowed for:
- a third-party module in `LAZY`: an optional dependency (`OPTIONAL`, with how to install it), or a
  heavy one (`HEAVY`) that a light import (`tunery --help`, `import tunery.train`) must not pay for;
- `tunery.*` inside a CLI module (`is_cli_module`): a command body imports its implementation when it
  runs, so `tunery --help` stays fast;
- the few tunery imports in `EXCEPTIONS`, each with the reason it cannot be at the top.

Names match a module and its submodules: "torch" covers "torch.distributed".
"""

from __future__ import annotations

# Not installed by `pip install tunery`: each entry says how to get it.
OPTIONAL: dict[str, str] = {
    "vllm": "`tunery serve --engine vllm`, on a GPU machine: pip install vllm",
    "llama_cpp": "the llamacpp serving engine: pip install 'tunery[llamacpp]'",
    "lm_eval": "`tunery eval --benchmark`: pip install 'tunery[bench]'",
    "mlflow": "`report_to: mlflow`: pip install 'tunery[track]'",
    "wandb": "`report_to: wandb`: pip install 'tunery[track]'",
    "tensorboard": "`report_to: tensorboard` (torch.utils.tensorboard): pip install 'tunery[track]'",
    "optuna": "`tunery sweep` with `optuna:`: pip install 'tunery[sweep]'",
    "ray": "`tunery serve --executor ray`: pip install 'tunery[ray]'",
    "flash_attn": "FlashAttention kernels on a GPU: pip install flash-attn",
}

# Installed with Tunery, but slow to import: kept out of `tunery --help` (the CLI's modules import
# only what every command needs) and out of the modules a light path imports, until used.
HEAVY: dict[str, str] = {
    "torch": "about 2 s; the CLI and the data tools run without it",
    "transformers": "about 1.5 s; imported when a model or tokenizer is loaded",
    "peft": "imports transformers; only the PEFT methods and adapter loading use it",
    "accelerate": "imports torch; only training uses it",
    "safetensors": "its torch half imports torch; saving and loading weights only",
    "datasets": "Hugging Face datasets, about 1 s; only hub dataset ids need it",
    "gguf": "about 0.3 s with numpy; GGUF export and llama.cpp serving only",
    "numpy": "about 0.2 s; GGUF tensors and seeding only",
    "pyarrow": "about 0.3 s; Parquet files only",
    "matplotlib": "about 0.5 s; the plots only",
    "huggingface_hub": "reads HF_HUB_DISABLE_PROGRESS_BARS when imported: only after the CLI's "
    "`quiet_libraries()` (tunery/quiet.py) has set it, so not at the top of a module `tunery.cli` imports",
    "openai": "about 0.8 s; the API client commands (`tunery jobs`) and remote teachers and judges only",
    "uvicorn": "the HTTP server runner: `tunery serve` only, kept out of `tunery --help`",
    "httpx": "the raw HTTP client of `tunery jobs get`, kept out of `tunery --help`",
    "jinja2": "about 25 ms; chat templates (rendered through a tokenizer), kept out of `tunery --help`",
    "rich.progress": "about 30 ms; the progress bars, kept out of `tunery --help`",
}

LAZY: dict[str, str] = {**OPTIONAL, **HEAVY}

# (importing module, imported tunery module): why the import cannot be at the top.
# `import tunery.train` stays light: the job executor imports train.rundir and the CLI's jemalloc re-exec
# train.memory, and the package imports train/run.py. Its recipe loads torch when a run starts.
_LIGHT_TRAIN = "loads torch: `import tunery.train` (train/run.py) stays light"
# A registry's loader imports its builtin plug-ins on first lookup (tunery/registry.py); "pkg.*" is any
# module of the package. Each plug-in imports `register` from its package: importing them at the top
# would be an import cycle.
_PLUGINS = "the registry's loader: each plug-in imports `register` from its package"
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("tunery.methods.registry", "tunery.methods.*"): _PLUGINS,
    ("tunery.objectives", "tunery.objectives.*"): _PLUGINS + "; the objectives import torch, and `tunery "
    "--help` imports this package (objectives/cli.py)",
    ("tunery.train.run", "tunery.methods"): _LIGHT_TRAIN,
    ("tunery.train.run", "tunery.plugins"): _LIGHT_TRAIN + " (plugins imports tunery.methods)",
    ("tunery.train.run", "tunery.train.distributed"): _LIGHT_TRAIN,
    ("tunery.train.run", "tunery.train.single"): _LIGHT_TRAIN,
    ("tunery.train.run", "tunery.train.setup"): _LIGHT_TRAIN,
    ("tunery.train.run", "tunery.train.loop"): _LIGHT_TRAIN,
}


def exception_for(importer: str, imported: str) -> tuple[str, str] | None:
    """The `EXCEPTIONS` key that lets `importer` import `imported` inside a function, if any."""
    for key in ((importer, imported), (importer, imported.rpartition(".")[0] + ".*")):
        if key in EXCEPTIONS:
            return key
    return None


def is_lazy(module: str) -> bool:
    """True when `module` (e.g. "torch.nn") is, or is a submodule of, a `LAZY` entry."""
    return any(module == name or module.startswith(name + ".") for name in LAZY)


def is_cli_module(module: str) -> bool:
    """The CLI's modules: `tunery.cli` and the command modules it mounts (`*/cli.py`, `*_cli.py`)."""
    last = module.rsplit(".", 1)[-1]
    return (
        module == "tunery.cli" or module.startswith("tunery.cli.") or last == "cli" or last.endswith("_cli")
    )
