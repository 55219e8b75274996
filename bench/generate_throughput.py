"""Generation throughput: Tunery's decode loop against `transformers` `generate`, and adapter switching.

    python bench/generate_throughput.py                      # the tiny random model (seconds)
    python bench/generate_throughput.py --model smollm2-135m # the embedded real model

Workload: chat prompts from datasets/qa/test.jsonl (varied lengths) rendered with the model's chat
template, greedy decoding, the same `max_new_tokens` and end-of-sequence ids for both stacks. Batch 1 runs
the prompts one by one; batch 8 runs them together (left-padded). Each variant runs for the base model and
for the model with a rank-16 LoRA adapter on all linear layers (random non-zero B, so it changes outputs).
Throughput counts generated tokens up to and including each row's end-of-sequence token, so a stack
that keeps decoding finished rows gets no credit for it. Adapter switch latency is measured in the
Engine: `set_adapter` between two loaded rank-16 adapters (and, separately, the first load from disk).
Tunery also runs once more with its skinny decode matmuls off (`generation/skinny.py`), to show that
lever's share.

Writes docs/bench/generate_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # the test helpers (tests/helpers/): tiny models, a real server


def load(spec: str | None, tmp: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec is None:
        from tests.helpers.tiny import make_tiny_model_dir

        path = make_tiny_model_dir(tmp / "tiny", "llama", initializer_range=0.3)
        return (
            str(path),
            AutoModelForCausalLM.from_pretrained(path).eval(),
            AutoTokenizer.from_pretrained(path),
        )
    from tunery.models import load_model, load_tokenizer, resolve

    resolved = resolve(spec)
    return str(resolved.path), load_model(resolved).eval(), load_tokenizer(resolved)


def prompts_for(tok, n: int) -> list[list[int]]:
    from tunery.data import encode_prompt, load_dataset
    from tunery.evaluate.run import split_example

    convs = load_dataset(ROOT / "datasets/qa/test.jsonl", kind="chat").examples[:n]
    return [encode_prompt(split_example(c)[0], tok) for c in convs]


def make_adapter(model_dir: str, out: Path, seed: int) -> str:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.02
    model.save_pretrained(out)
    return str(out)


def counted(ids: list[int], eos: set[int]) -> int:
    for i, t in enumerate(ids):
        if t in eos:
            return i + 1
    return len(ids)


def run_tunery(
    model, tok, prompts, batch: int, max_new: int, skinny: bool = True
) -> tuple[int, list[list[int]]]:
    """`skinny=False` runs without Tunery's skinny decode matmuls (the lever's contribution)."""
    from tunery.generation.generate import generate_batch
    from tunery.generation.sequence import GenerationParams

    params = GenerationParams(max_new_tokens=max_new)
    res = generate_batch(model, tok, prompts, params, batch_size=batch, skinny=skinny)
    return sum(r.completion_tokens for r in res), [r.token_ids for r in res]


def run_hf(model, tok, prompts, batch: int, max_new: int, eos: set[int]) -> tuple[int, list[list[int]]]:
    tok.padding_side = "left"
    total, outs = 0, []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        enc = tok.pad({"input_ids": chunk}, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=sorted(eos),
                pad_token_id=tok.pad_token_id,
            )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            n = counted(row, eos)
            total += n
            outs.append(row[: n - 1] if n and row[n - 1] in eos else row[:n])
    return total, outs


def timed(fns: list, repeats: int) -> list[tuple[float, int, list[list[int]]]]:
    """Best-of-`repeats` wall time of each stack, run in turn so machine load hits them alike."""
    for fn in fns:  # warm-up: first-call allocations and lazy initialisation
        fn()
    best = [(float("inf"), 0, [])] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            tokens, outs = fn()
            elapsed = time.perf_counter() - t0
            if elapsed < best[i][0]:
                best[i] = (elapsed, tokens, outs)
    return best


def switch_latency(model_spec: str, adapters: list[str], prompt: list[int], rounds: int) -> dict:
    from tunery.generation.engine import Engine
    from tunery.generation.sequence import GenerationParams

    engine = Engine(batch_wait=0)
    params = GenerationParams(max_new_tokens=1)
    try:
        engine.generate(model_spec, None, prompt, params)
        loads, switches = [], []
        for a in adapters:
            engine.generate(model_spec, a, prompt, params)
            loads.append(engine.stats["last_adapter_load_ms"])
        for i in range(rounds):
            engine.generate(model_spec, adapters[i % len(adapters)], prompt, params)
            switches.append(engine.stats["last_switch_ms"])
    finally:
        engine.close()
    return {
        "switch_ms_median": statistics.median(switches),
        "switch_ms_max": max(switches),
        "first_load_ms_median": statistics.median(loads),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="Model spec (default: a tiny random llama).")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="Default 64 (tiny: 32).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/bench")
    args = ap.parse_args()
    from peft import PeftModel

    from tunery.generation.generate import bf16_supported
    from tunery.generation.sequence import eos_token_ids

    max_new = args.max_new_tokens or (64 if args.model else 32)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        model_dir, model, tok = load(args.model, tmp)
        prompts = prompts_for(tok, args.prompts)
        eos = eos_token_ids(model, tok)
        adapters = [make_adapter(model_dir, tmp / f"adapter{i}", i) for i in range(2)]
        variants = {"base": model, "lora-r16": PeftModel.from_pretrained(model, adapters[0]).eval()}
        rows = []
        for name, mdl in variants.items():
            for batch in (1, 8):
                ours = lambda m=mdl, b=batch: run_tunery(m, tok, prompts, b, max_new)  # noqa: E731
                plain = lambda m=mdl, b=batch: run_tunery(m, tok, prompts, b, max_new, skinny=False)  # noqa: E731
                theirs = lambda m=mdl, b=batch: run_hf(m, tok, prompts, b, max_new, eos)  # noqa: E731
                (t_s, n_t, out_t), (t_p, n_p, _), (t_h, n_h, out_h) = timed(
                    [ours, plain, theirs], args.repeats
                )
                same = sum(a == b for a, b in zip(out_t, out_h, strict=True))
                rows.append(
                    {
                        "variant": name,
                        "batch": batch,
                        "tunery_tok_s": n_t / t_s,
                        "tunery_plain_linear_tok_s": n_p / t_p,
                        "hf_tok_s": n_h / t_h,
                        "speedup": (n_t / t_s) / (n_h / t_h),
                        "tunery_tokens": n_t,
                        "hf_tokens": n_h,
                        "identical_outputs": f"{same}/{len(prompts)}",
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            if name == "lora-r16":
                mdl.unload()  # give the base back its plain linear layers for the Engine below
        switch = switch_latency(model_dir, adapters, prompts[0], rounds=10)
    result = {
        "model": args.model or "tiny-llama (random, 2 layers)",
        "max_new_tokens": max_new,
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "threads": torch.get_num_threads(),
        "bf16_autocast": bf16_supported(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
        "adapter_switch": switch,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generate_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Generation throughput: {result['model']}",
        "",
        f"`python bench/generate_throughput.py{' --model ' + args.model if args.model else ''}` — greedy, "
        f"{len(prompts)} chat prompts ({min(result['prompt_tokens'])}-{max(result['prompt_tokens'])} "
        f"tokens), max_new_tokens={max_new}, {result['threads']} threads, bf16 autocast: "
        f"{result['bf16_autocast']}.",
        "",
        "| variant | batch | Tunery tok/s | Tunery, F.linear decode tok/s | transformers generate tok/s "
        "| speedup | identical outputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['tunery_tok_s']:.1f} | "
            f"{r['tunery_plain_linear_tok_s']:.1f} | {r['hf_tok_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['identical_outputs']} |"
        )
    lines += [
        "",
        f"Adapter switch (rank 16, Engine `set_adapter`): median {switch['switch_ms_median']:.2f} ms, "
        f"max {switch['switch_ms_max']:.2f} ms; first load from disk: "
        f"{switch['first_load_ms_median']:.1f} ms.",
        "",
    ]
    (args.out / "generate_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
