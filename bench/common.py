"""Helpers shared by the benchmarks: data, model FLOPs, matmul peaks, child processes, timing.

Every variant of a benchmark runs in its own child process (`run_child`), so one variant's memory,
threads or compiled kernels never leak into the next one's numbers; the child reports its own peak
RSS (`getrusage(RUSAGE_SELF).ru_maxrss`, which covers the whole life of the process).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # the test helpers (tests/helpers/): tiny models, a real server
IGNORE = -100


# The flags that decide matmul speed on a CPU (AVX-512, native bf16, AMX); every report records them.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """The CPU's name and which of `CPU_FLAGS` it has."""
    from tunery.cpu import cpu_identity

    model, flags = cpu_identity()
    present = set(flags.split())
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in present]}


def machine_info() -> dict[str, Any]:
    import torch

    from tunery.train.precision import auto_bf16_on_cpu, cpu_has_bf16

    return {
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu_bf16": cpu_has_bf16(),  # the CPU's flags: native bf16 instructions
        "auto_bf16": auto_bf16_on_cpu(),  # what `auto` precision takes here (measured faster or not)
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def matmul_peak(dtype_name: str, n_max: int = 2048, seconds: float = 3.0) -> float:
    """Sustained GFLOPS of a large square `torch.matmul` in this process (same threads as the runs).

    The size doubles from 256 up to `n_max` while one product stays under half a second: without
    AVX512-BF16, bf16 matmuls run a slow fallback (well under 1 GFLOPS) and a 2048 product would
    take a minute. The best of several timed repetitions is kept: the machine is shared, and the
    peak is what the hardware can do, not what it did while a neighbour was busy.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    n = 256
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        torch.matmul(a, b)  # also the warm-up: oneDNN picks and caches its kernel on the first call
        if n >= n_max or time.perf_counter() - t0 > 0.06:
            break
        n *= 2
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt / 1e9)
    return best


def param_counts(model: Any) -> dict[str, int]:
    """Parameters that do matmul work per token: the decoder's non-embedding weights and the LM head.

    The input embedding is a lookup (no FLOPs). A tied LM head shares its weights with the embedding
    but still costs a hidden-by-vocabulary matmul wherever logits are computed, so it is counted apart.
    Adapter (LoRA) weights are excluded: at r=16 they add under 2% and are not "the model".
    """
    from tunery.models.unwrap import unwrap

    base = unwrap(model)
    emb = base.get_input_embeddings()
    head = base.get_output_embeddings()
    skip = {id(emb.weight)}
    body = 0
    for name, p in base.named_parameters():
        if id(p) in skip or "lora_" in name or p is head.weight:
            continue
        body += p.numel()
    return {"body": body, "head": head.weight.numel()}


def flops_per_token(counts: dict[str, int], supervised_fraction: float) -> float:
    """Model FLOPs per token of training with frozen base weights (LoRA):

    forward 2*N, backward 2*N (gradients flow through the frozen weights to the adapters, but no
    weight gradients of the frozen matrices are computed), so 4*N per token. N is the decoder's
    non-embedding parameters for every token, plus the LM head only at supervised positions: that is
    where the loss needs logits, so a stack computing logits everywhere does extra, uncredited work.
    Attention score FLOPs (quadratic in length) are left out, as is usual for MFU.
    """
    return 4.0 * counts["body"] + 4.0 * counts["head"] * supervised_fraction


def load_examples(model_dir: str, path: Path, n: int, max_length: int) -> list[dict[str, list[int]]]:
    """The first `n` chat rows of `path`, tokenized once with Tunery's encoder: ids and labels
    (-100 outside assistant replies). Every variant trains on exactly these token sequences."""
    from tunery.data import encode_chat, load_dataset
    from tunery.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    convs = load_dataset(path, kind="chat").examples[:n]
    out = []
    for conv in convs:
        f = encode_chat(conv, tok, max_length)
        out.append({"input_ids": f["input_ids"], "labels": f["labels"]})
    return out


def heldout_loss(model: Any, examples: list[dict[str, list[int]]]) -> float:
    """Mean next-token CE per supervised token, fp32, one example at a time (no padding, no packing):
    the same measurement for every stack, so losses are comparable."""
    import torch
    import torch.nn.functional as F

    model.eval()
    device = next(model.parameters()).device  # the GPU bench measures on the GPU
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            tgt = torch.tensor(ex["labels"][1:], device=device)
            sel = tgt != IGNORE
            total += float(F.cross_entropy(logits[sel], tgt[sel], reduction="sum"))
            count += int(sel.sum())
    return total / max(1, count)


def peak_rss_mb() -> float:
    """Peak resident set of this process so far, in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_rate(tokens: list[int], seconds: list[float], warmup: int) -> tuple[float, int, float]:
    """(tokens/s, tokens, seconds) over the steps after the first `warmup` ones."""
    if len(tokens) != len(seconds):
        raise ValueError(f"{len(tokens)} token counts for {len(seconds)} step times")
    skip = min(warmup, max(0, len(tokens) - 1))  # always keep at least one measured step
    tok = sum(tokens[skip:])
    sec = sum(seconds[skip:])
    return (tok / sec if sec > 0 else 0.0), tok, sec


def run_child(
    script: Path, args: list[str], timeout: float | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `script --child ...` in a fresh interpreter; it writes its result as JSON to a file."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *args, "--result", str(result_path)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result_path.exists():
            tail = (proc.stderr or proc.stdout)[-3000:]
            return {"error": f"exit code {proc.returncode}", "stderr_tail": tail, "wall_seconds": wall}
        out = json.loads(result_path.read_text())
        out["wall_seconds"] = wall
        return out
