"""Whether llama.cpp's extra CPU buffer types are safe on this machine, found out in a child process.

llama.cpp repacks quantized weights into "extra" buffer types (AMX tiles, interleaved AVX blocks) for
faster matmuls. On some machines its AMX kernel dies on the first decode: measured here with
llama-cpp-python 0.3.36 on a Firecracker VM whose CPU has AMX-INT8 (and where oneDNN's AMX works),
`ldtilecfg` raised a general-protection fault for q8_0, q4_0, q4_1 and q4_k GGUFs, f32/f16/bf16 ones
ran. A fault kills the whole server with every tenant's requests, so before a base is loaded with
those buffers, a child process loads the same GGUF with them and decodes a few tokens. The verdict is
kept per llama.cpp version, CPU and tensor type, so a machine pays for the probe once per type.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

from tunery.cpu import cpu_identity
from tunery.fsutil import write_atomic

log = logging.getLogger("tunery.serve")

PROBE_TIMEOUT_S = 300  # loading a large GGUF from a cold disk takes minutes
_LOCK = threading.Lock()

# Loads argv[1] with the extra buffer types on and decodes four tokens; exit 0 means they work.
_CHILD = """
import sys
import llama_cpp
sink = llama_cpp.llama_log_callback(lambda level, text, data: None)
llama_cpp.llama_log_set(sink, None)
llama_cpp.llama_backend_init()
mparams = llama_cpp.llama_model_default_params()
mparams.n_gpu_layers = 0
mparams.use_extra_bufts = True
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), mparams)
if not model:
    sys.exit(3)
cparams = llama_cpp.llama_context_default_params()
cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 64
cparams.n_threads = cparams.n_threads_batch = 2
ctx = llama_cpp.llama_init_from_model(model, cparams)
n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
batch = llama_cpp.llama_batch_init(8, 0, 1)
for i in range(4):
    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = i % n_vocab, i, 1, int(i == 3)
    batch.seq_id[i][0] = 0
batch.n_tokens = 4
sys.exit(0 if llama_cpp.llama_decode(ctx, batch) == 0 else 4)
"""


def _machine_key(gguf_type: str) -> str:
    """llama.cpp's version, the CPU's model and flags, the tensor type: what the verdict depends on."""
    import llama_cpp

    cpu, flags = cpu_identity()
    return hashlib.sha256(f"{llama_cpp.__version__}|{cpu}|{flags}|{gguf_type}".encode()).hexdigest()[:16]


def extra_buffers_safe(gguf: Path, gguf_type: str, cache_dir: Path) -> bool:
    """True when a child process decoded `gguf` with the extra buffer types; cached in `cache_dir`."""
    verdict = cache_dir / f"extra-buffers-{_machine_key(gguf_type)}.json"
    with _LOCK:
        try:
            return bool(json.loads(verdict.read_text())["safe"])
        except (OSError, ValueError, KeyError):
            pass
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, str(gguf)],
                capture_output=True,
                timeout=PROBE_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            log.warning("llama.cpp probe timed out; serving without its extra CPU buffers this time")
            return False  # not cached: a slow disk says nothing about the CPU
        if proc.returncode > 0:
            return True  # it could not load or decode at all: the real load reports why, with its error
        safe = proc.returncode == 0
        write_atomic(verdict, json.dumps({"safe": safe, "gguf_type": gguf_type, "exit": proc.returncode}))
        if not safe:
            log.warning(
                "llama.cpp's extra CPU buffer types (AMX, repacked weights) crashed a probe for %s "
                "weights on this machine (signal %d); serving them without those buffers",
                gguf_type,
                -proc.returncode,
            )
        return safe
