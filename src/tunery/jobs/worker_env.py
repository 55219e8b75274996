"""The environment a training worker starts with: an allowlist of the server's, never all of it.

A worker runs what a request asked for (a base model, a judge endpoint, reward functions), so it must
not hold the server's secrets: the admin key (TUNERY_API_KEY), cloud credentials, HF_TOKEN, or
anything else the operator exported before `tunery serve`. It gets what running Python and torch
needs (paths, locale, threads, the allocator, CUDA, model caches and offline switches), the database
URL it reads its job row with, the key variables of the judges the operator registered, and the
variables the operator names with `tunery serve --worker-env VAR`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from tunery.train.memory import allocator_env

ALLOWED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TEMP",
        "TMP",
        "PYTHONPATH",
        "PYTHONHASHSEED",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        # the allocator (train/memory.py), the CPU bf16 choice (models/cpu_bf16.py) and the thread pools
        "LD_PRELOAD",
        "MALLOC_CONF",
        "TUNERY_ALLOCATOR",
        "TUNERY_CPU_BF16",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "TOKENIZERS_PARALLELISM",
        # caches and offline switches
        "TUNERY_CACHE",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
        "HF_DATASETS_CACHE",
        "HF_DATASETS_OFFLINE",
        "TORCH_HOME",
        "TRITON_CACHE_DIR",
        "XDG_CACHE_HOME",
        "PYTORCH_CUDA_ALLOC_CONF",
        # certificates for HTTPS judge endpoints
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
    }
)
# Whole families: locale settings, CUDA's device and cache switches, transformers' caches and
# offline switch. None of them holds a credential.
ALLOWED_PREFIXES = ("LC_", "CUDA_", "TRANSFORMERS_")
# Never passed on, even when the operator names them: the admin key opens every key's data.
NEVER = frozenset({"TUNERY_API_KEY"})


def worker_env(
    database_url: str | None = None, allow: Iterable[str] = (), base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The worker's environment, from `base` (default: this process's): the allowlist, the variables
    in `allow` (registered judges' keys, the operator's --worker-env), the database URL when the
    server uses one, and jemalloc preloaded where installed."""
    base = os.environ if base is None else base
    extra = set(allow) - NEVER
    env = {
        k: v
        for k, v in base.items()
        if k not in NEVER and (k in ALLOWED or k.startswith(ALLOWED_PREFIXES) or k in extra)
    }
    if database_url:  # the worker reads its job row; never the server's own variable otherwise
        env["TUNERY_DATABASE_URL"] = database_url
    return allocator_env(env)
