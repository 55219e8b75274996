"""The training loop end to end on tiny models: learning, invariants, run directory, resume."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny import write_chat_jsonl
from tunery.plugins import load_config
from tunery.train import loop, run
from tunery.train.events import read_jsonl

# The machine's cores are shared: one torch thread per process runs tiny models several times faster
# under load, in this process (the fixture) and in the `tunery train` processes (ONE_THREAD).
pytestmark = pytest.mark.usefixtures("one_thread")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _config(tmp_path, model, **sets):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=sets.pop("n", 20))
    base = {
        "model": str(model),
        "data.train": str(data),
        "output": str(tmp_path / "run"),
        "hyperparameters.precision": "fp32",
        "method": "lora",
    }
    base.update(sets)
    return load_config(sets=[f"{k}={v}" for k, v in base.items()])


def losses(run_dir):
    return [r["train_loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def test_tiny_model_memorizes(tmp_path, tiny_llama):
    cfg = _config(
        tmp_path,
        tiny_llama,
        method="full",
        **{
            "hyperparameters.n_epochs": 30,
            "hyperparameters.batch_size": 4,
            "hyperparameters.learning_rate": 0.003,
            "hyperparameters.lr_scheduler": "constant",
        },
    )
    result = run(cfg)
    assert result.status == "succeeded"
    ls = losses(result.output_dir)
    assert ls[-1] < 0.1 * ls[0], ls
    out = result.output_dir
    for name in ("config.yaml", "metrics.jsonl", "events.jsonl", "results.csv", "loss.png", "run.json"):
        assert (out / name).exists(), name
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tunery.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "succeeded"
    messages = [e["message"] for e in read_jsonl(out / "events.jsonl")]
    assert any(m.startswith("Step 1/") and "training loss=" in m for m in messages)
    assert messages[-1] == "The job has successfully completed"


def test_lora_run_saves_peft_adapter(tmp_path, tiny_llama):
    result = run(_config(tmp_path, tiny_llama, **{"hyperparameters.n_epochs": 1, "lora.r": 4}))
    assert (result.model_dir / "adapter_config.json").exists()
    assert json.loads((result.model_dir / "adapter_config.json").read_text())["r"] == 4


def test_gradient_accumulation_equals_big_batch(tmp_path, tiny_llama):
    common = {
        "hyperparameters.n_epochs": 1,
        "hyperparameters.batch_size": 8,
        "hyperparameters.max_length": 64,
        "hyperparameters.learning_rate": 0.005,
        "n": 16,
    }
    big = run(_config(tmp_path / "a", tiny_llama, **common, **{"hyperparameters.micro_batch_tokens": 4096}))
    small = run(_config(tmp_path / "b", tiny_llama, **common, **{"hyperparameters.micro_batch_tokens": 1}))
    assert losses(big.output_dir) == pytest.approx(losses(small.output_dir), abs=1e-5)


def test_packed_equals_padded_training(tmp_path, tiny_qwen2):
    common = {
        "hyperparameters.n_epochs": 1,
        "hyperparameters.batch_size": 4,
        "hyperparameters.learning_rate": 0.005,
    }
    packed = run(_config(tmp_path / "a", tiny_qwen2, **common))
    padded = run(_config(tmp_path / "b", tiny_qwen2, **common, **{"hyperparameters.packing": False}))
    # what really ran: packing on one side only (a silent fallback would compare padded with padded),
    # the fused LoRA layers and fp32 on both
    assert levers(packed.output_dir) == {
        "packed": True,
        "fused": True,
        "precision": "fp32",
        "shared_prefix": True,
    }
    assert levers(padded.output_dir) == {
        "packed": False,
        "fused": True,
        "precision": "fp32",
        "shared_prefix": False,
    }
    assert losses(packed.output_dir) == pytest.approx(losses(padded.output_dir), abs=1e-5)


def test_benchmark_levers_change_how_not_what(tmp_path, tiny_qwen2):
    """Each lever the benchmark undoes (train/levers.py) reaches the run and leaves the losses."""
    from tunery.train.levers import Levers

    common = {
        "hyperparameters.n_epochs": 1,
        "hyperparameters.batch_size": 4,
        "hyperparameters.learning_rate": 0.005,
    }
    default = run(_config(tmp_path / "a", tiny_qwen2, **common))
    undone = Levers(attention="mask", supervised_head_only=False, fused_lora=False, shared_prefix=False)
    other = run(_config(tmp_path / "b", tiny_qwen2, **common), levers=undone)
    assert levers(other.output_dir) == {
        "packed": True,
        "fused": False,
        "precision": "fp32",
        "shared_prefix": False,
    }
    assert losses(other.output_dir) == pytest.approx(losses(default.output_dir), abs=1e-5)


def test_shared_prefix_computes_less_and_trains_the_same(tmp_path, tiny_qwen2):
    """Every example starts with one system prompt and user-turn header: a packed micro-batch lays it
    once (modeling/prefix.py), so each step runs fewer positions, and the losses are the same."""
    from tunery.train.levers import Levers

    common = {
        "hyperparameters.n_epochs": 1,
        "hyperparameters.batch_size": 4,
        "hyperparameters.learning_rate": 0.005,
        "data.system_prompt": "Answer with the colour of the item named, in one word and nothing else.",
    }
    shared = run(_config(tmp_path / "a", tiny_qwen2, **common))
    whole = run(_config(tmp_path / "b", tiny_qwen2, **common), levers=Levers(shared_prefix=False))
    assert levers(shared.output_dir)["shared_prefix"] and not levers(whole.output_dir)["shared_prefix"]
    assert losses(shared.output_dir) == pytest.approx(losses(whole.output_dir), abs=1e-5)
    ran, computed = (metric(r.output_dir, "batch_positions") for r in (shared, whole))
    assert shared.trained_tokens == whole.trained_tokens  # the examples' tokens, counted whole
    # all of a step's rows share the prompt (>= 16 tokens): 3 of 4 copies of it are not computed
    assert all(w - s >= 3 * 16 for s, w in zip(ran, computed, strict=True)), (ran, computed)


@pytest.mark.parametrize("arch, method", [("mixtral", "lora"), ("llama", "moe_lora")])
def test_no_shared_prefix_under_a_token_averaged_loss(arch, method, tmp_path):
    """An MoE balancing loss averages over every token the forward runs: a prefix computed once would
    count once instead of once per row and change the loss, so those runs compute every row whole."""
    from tests.helpers.tiny import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / arch, arch)
    sets = {"method": method, "hyperparameters.max_steps": 1, "hyperparameters.batch_size": 4}
    result = run(
        _config(tmp_path / "run", model, **sets, **{"data.system_prompt": "Name the colour, one word."})
    )
    assert levers(result.output_dir) == {
        "packed": True,
        "fused": method == "lora",
        "precision": "fp32",
        "shared_prefix": False,
    }


def metric(run_dir, name: str) -> list:
    return [r[name] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")]


def levers(run_dir) -> dict:
    """What the run's start event records as in effect."""
    events = read_jsonl(Path(run_dir) / "events.jsonl")
    (start,) = [e for e in events if e["message"] == "Fine-tuning job started"]
    return {k: start["data"][k] for k in ("packed", "fused", "precision", "shared_prefix")}


def _train_cmd(tmp_path, model, out, *extra):
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=24)
    return [
        sys.executable,
        "-m",
        "tunery.cli",
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--set",
        "hyperparameters.precision=fp32",
        "--set",
        "hyperparameters.n_epochs=3",  # 72 steps: the kill after step 40 leaves 32 to resume
        "--set",
        "hyperparameters.batch_size=1",
        "--set",
        "hyperparameters.save_steps=20",
        "--set",
        "hyperparameters.learning_rate=0.003",
        *extra,
    ]


def _sets_of(cmd: list[str]) -> list[str]:
    """The `--set` assignments a `_train_cmd` command line makes, flags included."""
    args, sets = cmd[cmd.index("train") + 1 :], []
    flags = {"--model": "model", "--data": "data.train", "--output": "output"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        sets.append(f"{flags[flag]}={value}" if flag in flags else value)
    return sets


@pytest.mark.slow  # two `tunery train` processes and one run in this process
def test_resume_after_sigkill_matches_uninterrupted(tmp_path, tiny_llama):
    # The uninterrupted reference runs in this process, on one thread as the `tunery train` processes
    # below do: the same settings through the same `run`, without a third process's start-up.
    cmd = _train_cmd(tmp_path, tiny_llama, tmp_path / "ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run(load_config(sets=_sets_of(cmd)))
    finally:
        torch.set_num_threads(threads)
    assert ref.status == "succeeded"
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(tmp_path, tiny_llama, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ONE_THREAD,
    )
    ckpts = out / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        ckpts.exists() and any(p.name == "step-000040" for p in ckpts.iterdir())
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(
        _train_cmd(tmp_path, tiny_llama, out, "--resume"), capture_output=True, text=True, env=ONE_THREAD
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == pytest.approx(losses(tmp_path / "ref"), abs=1e-6)
    assert len(losses(out)) == 72


@pytest.mark.slow  # heavy for the developer loop: a training subprocess signalled
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, tiny_llama):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(tmp_path, tiny_llama, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ONE_THREAD,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    from tunery.train.checkpoint import list_checkpoints

    last = list_checkpoints(out / "checkpoints")[-1]
    assert json.loads((last / "meta.json").read_text())["step"] == len(losses(out))
    assert (last / "model" / "adapter_config.json").exists()
    # `tunery train` re-executed itself on jemalloc where installed; SIGTERM still reached it (same pid).
    from tunery.train.memory import find_jemalloc

    started = next(e for e in read_jsonl(out / "events.jsonl") if "allocator" in (e.get("data") or {}))
    assert started["data"]["allocator"] == ("jemalloc" if find_jemalloc() else "system")


# Trains in its own process and SIGTERMs itself when it sees the event named by argv[1].
_SIGTERM_AT = """
import os, signal, sys
from tunery.plugins import load_config
from tunery.train import run

def at(event):
    data = event["data"]
    last_step = event["type"] == "metrics" and data["step"] == data["total_steps"]
    if (sys.argv[1] == "last_step" and last_step) or sys.argv[1] == data.get("kind"):
        os.kill(os.getpid(), signal.SIGTERM)

print(run(load_config(sets=sys.argv[2:]), subscribers=[at]).status)
"""


@pytest.mark.slow  # heavy for the developer loop: a training subprocess signalled
@pytest.mark.parametrize("when", ["last_step", "model"])
def test_a_signal_after_the_last_step_ends_succeeded_with_run_json(tmp_path, tiny_llama, when):
    """A cancel, or an orphaned worker whose server died, can SIGTERM a run after its last step: during
    the last evaluation (`last_step`) or after the final save (`model`, before run.json). Every step
    has run, so the run ends succeeded with its model and run.json: never killed with no run.json
    (a kill -9 recovery test caught that), nor "interrupted" with nothing left to resume."""
    data = write_chat_jsonl(tmp_path / "train.jsonl", n=10)
    out = tmp_path / "run"
    sets = [f"model={tiny_llama}", f"data.train={data}", f"output={out}", "hyperparameters.precision=fp32"]
    sets += ["method=lora", "hyperparameters.n_epochs=1", "hyperparameters.batch_size=2"]
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_AT, when, *sets], capture_output=True, text=True, env=ONE_THREAD
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "succeeded"
    assert json.loads((out / "run.json").read_text())["status"] == "succeeded"
    assert (out / "model" / "adapter_config.json").exists()
    messages = [e["message"] for e in read_jsonl(out / "events.jsonl")]
    assert not any(m.startswith("Training interrupted") for m in messages)


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path, tiny_llama):
    """A kill mid-save leaves only a .tmp-* directory: resume must use the last complete checkpoint."""
    cfg = _config(
        tmp_path,
        tiny_llama,
        **{"hyperparameters.n_epochs": 2, "hyperparameters.batch_size": 10, "hyperparameters.save_steps": 1},
    )
    first = run(cfg)
    ckpts = first.output_dir / "checkpoints"
    from tunery.train.checkpoint import list_checkpoints, load_state

    complete = list_checkpoints(ckpts)
    assert complete, "no checkpoint was written"
    torn = ckpts / ".tmp-step-000099-12345"
    (torn / "model").mkdir(parents=True)
    (torn / "trainable.safetensors").write_bytes(b"\x00" * 10)  # what a kill mid-write leaves
    assert list_checkpoints(ckpts) == complete
    for path in complete:  # every listed checkpoint is whole and loads
        assert load_state(path, "state")["optimizer"]["state"]
    cfg.resume = True
    again = run(cfg)
    assert again.status == "succeeded"
    assert not torn.exists(), "stale half-written checkpoints are cleaned on the next save"


@pytest.mark.slow
def test_lora_on_smollm2_then_chat(tmp_path):
    """A few LoRA steps on the real embedded model, then a chat turn through the generation path."""
    from tunery.generation.generate import chat_prompt, generate_batch
    from tunery.generation.sequence import GenerationParams
    from tunery.methods import load_trained

    data = write_chat_jsonl(tmp_path / "train.jsonl", n=12)
    cfg = load_config(
        sets=[
            f"data.train={data}",
            f"output={tmp_path / 'run'}",
            "model=smollm2-135m",
            "hyperparameters.max_steps=3",
            "hyperparameters.batch_size=4",
            "hyperparameters.learning_rate=0.001",
            "hyperparameters.max_length=64",
        ]
    )
    result = run(cfg)
    assert result.status == "succeeded" and len(losses(result.output_dir)) == 3
    model, tok = load_trained("smollm2-135m", str(result.model_dir))
    prompt = chat_prompt(tok, [{"role": "user", "content": "What colour is item 2?"}])
    reply = generate_batch(model, tok, [prompt], GenerationParams(max_new_tokens=8))[0]
    assert reply.completion_tokens > 0 and reply.text.strip()


# OpenAI's `auto` rules at their boundaries: epochs 3, raised below 100 example-passes (100 // n, at
# most 25), lowered above 25,000 (25,000 // n, at least 1); batch 0.2% of n rounded, in [1, 256];
# learning-rate multiplier 0.05 for batches up to 2, 0.1 below 64, 0.2 from 64.
@pytest.mark.parametrize(
    ("n", "epochs"),
    [
        (1, 25),
        (3, 25),
        (4, 25),
        (5, 20),
        (20, 5),
        (33, 3),
        (34, 3),
        (8333, 3),
        (8334, 2),
        (12501, 1),
        (10**6, 1),
    ],
)
def test_auto_epochs_at_openai_boundaries(n, epochs):
    from tunery.train.hparams import auto_epochs

    assert auto_epochs(n) == epochs


@pytest.mark.parametrize(
    ("n", "batch"),
    [(1, 1), (249, 1), (749, 1), (750, 2), (1000, 2), (1500, 3), (4000, 8), (32_000, 64), (128_000, 256)]
    + [(128_250, 256), (128_750, 256), (10**7, 256)],
)
def test_auto_batch_size_at_boundaries_and_the_256_clamp(n, batch):
    from tunery.train.hparams import auto_batch_size

    assert auto_batch_size(n) == batch


@pytest.mark.parametrize(
    ("batch", "multiplier"),
    [(1, 0.05), (2, 0.05), (3, 0.1), (7, 0.1), (8, 0.1), (63, 0.1), (64, 0.2), (256, 0.2)],
)
def test_auto_learning_rate_multiplier(batch, multiplier):
    from tunery.train.hparams import auto_multiplier

    assert auto_multiplier(batch) == multiplier


def test_resolve_combines_the_rules_with_the_methods_base_rate():
    from tunery.config import Hyperparameters
    from tunery.train.hparams import resolve

    auto = Hyperparameters()
    # 32,000 examples: 1 epoch (25,000 // 32,000, at least 1), batch 64, multiplier 0.2 -> twice the
    # method's base rate
    assert resolve(auto, 32_000, 2e-4).as_dict() == {
        "n_epochs": 1,
        "batch_size": 64,
        "learning_rate_multiplier": 0.2,
        "learning_rate": pytest.approx(4e-4),
    }
    # 20 examples: 5 epochs, batch 1 (0.04 rounds to 0, clamped up), multiplier 0.05 -> half the base
    r = resolve(auto, 20, 1e-4)
    assert (r.n_epochs, r.batch_size, r.learning_rate_multiplier) == (5, 1, 0.05)
    assert r.learning_rate == pytest.approx(5e-5)
    # an explicit batch never exceeds the data; explicit values win over auto, a raw rate over both
    fixed = Hyperparameters(n_epochs=2, batch_size=16, learning_rate_multiplier=0.3)
    r = resolve(fixed, 10, 1e-4)
    assert (r.n_epochs, r.batch_size, r.learning_rate_multiplier) == (2, 10, 0.3)
    assert r.learning_rate == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("n", "device", "rule", "batch", "multiplier"),
    [
        (300, "cpu", "device", 8, 0.4),  # OpenAI: batch 1 at 0.05; a CPU takes 8 at 0.05 x 8
        (300, "cuda", "device", 1, 0.05),  # a GPU keeps OpenAI's rule
        (300, "cpu", "openai", 1, 0.05),  # the option that keeps it everywhere
        (99, "cpu", "device", 1, 0.05),  # too few examples to raise the batch
        (100, "cpu", "device", 8, 0.4),
        (750, "cpu", "device", 8, 0.2),  # OpenAI: batch 2 at 0.05 -> 8 at 0.05 x 4
        (1500, "cpu", "device", 8, pytest.approx(0.8 / 3)),  # OpenAI: batch 3 at 0.1 -> 8 at 0.1 x 8/3
        (4000, "cpu", "device", 8, 0.1),  # OpenAI's batch is already 8: its multiplier, unscaled
        (32_000, "cpu", "device", 64, 0.2),
    ],
)
def test_auto_on_a_cpu_takes_batch_8_with_the_rate_scaled(n, device, rule, batch, multiplier):
    """Issue 20's decision: batch 1 spent a CPU's minutes (docs/performance.md), so `auto_rule: device`
    raises the auto batch to 8 on a CPU and scales OpenAI's multiplier of its own batch linearly."""
    from tunery.config import Hyperparameters
    from tunery.train.hparams import resolve

    r = resolve(Hyperparameters(auto_rule=rule), n, 2e-4, device)
    assert (r.batch_size, r.learning_rate_multiplier) == (batch, multiplier)
    assert r.learning_rate == pytest.approx(2e-4 * r.learning_rate_multiplier / 0.1)
    # a batch the user sets keeps OpenAI's multiplier for it: only auto's own raise is scaled
    explicit = resolve(Hyperparameters(batch_size=8, auto_rule=rule), n, 2e-4, device)
    assert explicit.learning_rate_multiplier == 0.1


def test_recommend_proposes_what_auto_trains_with(tiny_llama, tmp_path):
    """`tunery recommend` names the batch and multiplier `auto` resolves to on its device, so following
    it trains the measured recipe rather than batch 8 at OpenAI's batch-8 rate."""
    import json

    from tunery.config import Hyperparameters
    from tunery.train.hparams import resolve
    from tunery.workflows.recommend import recommend

    data = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}
    data.write_text("\n".join(json.dumps(row) for _ in range(300)) + "\n")
    for device in ("cpu", "cuda"):
        rec = recommend(str(tiny_llama), str(data), 8 * 1024**3, device=device, gflops=10.0)
        auto = resolve(Hyperparameters(), 300, 2e-4, device)
        assert (rec.chosen.batch_size, rec.learning_rate_multiplier) == (
            auto.batch_size,
            auto.learning_rate_multiplier,
        ), device
        assert rec.to_dict()["recommendation"]["learning_rate_multiplier"] == auto.learning_rate_multiplier
    assert resolve(Hyperparameters(learning_rate=0.5), 10, 1e-4).learning_rate == 0.5


CPU_MODEL = "model name\t: Test CPU\n"
AVX512_BF16 = CPU_MODEL + "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
AMX_BF16 = CPU_MODEL + "flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n"
NO_BF16 = CPU_MODEL + "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"


@pytest.fixture
def cpu_bf16_probe(monkeypatch, tmp_path):
    """The CPU bf16 answer from a clean slate: fake `/proc/cpuinfo` (`state.cpuinfo`; None: unreadable),
    no override, an empty disk cache, and the matmul probe replaced by one that counts its calls
    (`state.calls`) and reports `state.speedup` (bf16 over fp32 throughput)."""
    import pathlib

    from tunery.models import cpu_bf16

    state = types.SimpleNamespace(cpuinfo=AVX512_BF16, speedup=2.0, calls=0, cache=tmp_path / "cache")
    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) != "/proc/cpuinfo":
            return real(self, *args, **kwargs)
        if state.cpuinfo is None:
            raise PermissionError(str(self))
        return state.cpuinfo

    def probe(*args, **kwargs):
        state.calls += 1
        return state.speedup

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    monkeypatch.setattr(cpu_bf16, "bf16_speedup", probe)
    monkeypatch.delenv(cpu_bf16.CPU_BF16_ENV, raising=False)
    monkeypatch.setenv("TUNERY_CACHE", str(state.cache))
    state.new_process = _clear_cpu_bf16_caches  # what a fresh process starts from: nothing in memory
    _clear_cpu_bf16_caches()  # the real answers may be cached already
    yield state
    _clear_cpu_bf16_caches()  # the next caller reads the real flags and cache


def _clear_cpu_bf16_caches():
    from tunery.models import cpu_bf16

    cpu_bf16.cpu_has_bf16.cache_clear()
    cpu_bf16.bf16_measured_faster.cache_clear()


@pytest.mark.parametrize(
    ("cpuinfo", "speedup", "auto_cpu", "probed"),
    [
        (AVX512_BF16, 2.0, "bf16", True),  # native and measured faster (e.g. AMX)
        (AVX512_BF16, 0.5, None, True),  # native but slower: AVX512-BF16 without AMX measured 0.5x
        (AVX512_BF16, 1.19, None, True),  # faster, but not by the 1.2x a switch must win by
        (AVX512_BF16, 1.2, "bf16", True),
        (AMX_BF16, 2.0, "bf16", True),
        (NO_BF16, 2.0, None, False),  # bf16 would be emulated: fp32, and nothing is measured
        (None, 2.0, None, False),  # /proc/cpuinfo unreadable
    ],
    ids=[
        "avx512-faster",
        "avx512-slower",
        "avx512-1.19x",
        "avx512-1.2x",
        "amx-faster",
        "no-flags",
        "unreadable",
    ],
)
def test_autocast_dtype_follows_the_cpu_flags(cpu_bf16_probe, cpuinfo, speedup, auto_cpu, probed):
    """`auto` on a CPU: bf16 only where the flags say native and the matmul probe measured bf16 at
    least 1.2x as fast as fp32; the probe runs once a process, and never without the flags."""
    import torch

    from tunery.train import precision

    cpu_bf16_probe.cpuinfo, cpu_bf16_probe.speedup = cpuinfo, speedup
    cpu = torch.device("cpu")
    expected = {"bf16": torch.bfloat16, None: None}[auto_cpu]
    assert precision.autocast_dtype("auto", cpu) == expected
    assert precision.autocast_dtype("auto", cpu) == expected  # from the process's cache
    assert cpu_bf16_probe.calls == int(probed)
    assert precision.cpu_has_bf16() is (cpuinfo in (AVX512_BF16, AMX_BF16))  # the flags alone
    # explicit choices never look at the flags or the probe
    _clear_cpu_bf16_caches()
    assert precision.autocast_dtype("fp32", cpu) is None
    assert precision.autocast_dtype("bf16", cpu) == torch.bfloat16
    assert precision.autocast_dtype("fp16", cpu) == torch.float16
    assert cpu_bf16_probe.calls == int(probed)
    # on CUDA, auto asks the GPU: bf16 where supported, else fp16; the CPU is not probed
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.cuda, "is_bf16_supported", lambda *a, s=supported, **k: s)
            assert precision.autocast_dtype("auto", torch.device("cuda")) == dtype
    assert cpu_bf16_probe.calls == int(probed)


def test_cpu_bf16_answer_is_kept_on_disk_and_the_override_wins(cpu_bf16_probe, monkeypatch):
    from tunery.errors import ConfigError
    from tunery.models import cpu_bf16, placement

    assert cpu_bf16.auto_bf16_on_cpu() is True and cpu_bf16_probe.calls == 1
    path = cpu_bf16_probe.cache / "cpu-bf16.json"
    (entry,) = json.loads(path.read_text()).values()
    assert entry["bf16"] is True and entry["speedup"] == 2.0 and entry["cpu"] == "Test CPU"
    assert [p.name for p in path.parent.iterdir() if "tmp" in p.name] == []  # written atomically
    # A later process reads the answer from disk: the probe, which would now say fp32, does not run.
    cpu_bf16_probe.new_process()
    cpu_bf16_probe.speedup = 0.5
    assert cpu_bf16.auto_bf16_on_cpu() is True and placement.bf16_supported("cpu") is True
    assert cpu_bf16_probe.calls == 1
    # Another CPU model is another key: measured again, and both answers are kept.
    cpu_bf16_probe.new_process()
    cpu_bf16_probe.cpuinfo = AVX512_BF16.replace("Test CPU", "Other CPU")
    assert cpu_bf16.auto_bf16_on_cpu() is False and cpu_bf16_probe.calls == 2
    assert sorted(e["bf16"] for e in json.loads(path.read_text()).values()) == [False, True]
    # A torn or foreign cache file is measured again, and rewritten.
    path.write_text("{not json")
    cpu_bf16_probe.new_process()
    assert cpu_bf16.auto_bf16_on_cpu() is False and cpu_bf16_probe.calls == 3
    assert len(json.loads(path.read_text())) == 1
    # TUNERY_CPU_BF16 wins over the flags, the probe and the cache, and is read on every call.
    for cpuinfo in (AVX512_BF16, NO_BF16):
        cpu_bf16_probe.cpuinfo = cpuinfo
        cpu_bf16_probe.new_process()
        for value, want in (("1", True), ("0", False), (" 1 ", True)):
            monkeypatch.setenv(cpu_bf16.CPU_BF16_ENV, value)
            assert cpu_bf16.auto_bf16_on_cpu() is want and placement.bf16_supported("cpu") is want
    assert cpu_bf16_probe.calls == 3
    monkeypatch.setenv(cpu_bf16.CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="TUNERY_CPU_BF16"):
        cpu_bf16.auto_bf16_on_cpu()


def test_tokens_per_second_leaves_evaluations_and_saves_out(tmp_path, tiny_llama, monkeypatch):
    """tokens/s is training throughput: a step that evaluates or checkpoints must not look slower. A
    fake clock advances 1 s per optimizer step and 1,000 s per evaluation and save, so every row's
    rate is exactly its step's tokens per second."""
    clock = [0.0]
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    tokens: list[int] = []
    step, evaluate, save = loop.run_step, loop.evaluate, loop.save_checkpoint

    def timed(fn, seconds, record=False):
        def wrapped(*args):
            clock[0] += seconds
            out = fn(*args)
            if record and out is not None:
                tokens.append(out["n_tokens"])
            return out

        return wrapped

    monkeypatch.setattr(loop, "run_step", timed(step, 1.0, record=True))
    monkeypatch.setattr(loop, "evaluate", timed(evaluate, 1000.0))
    monkeypatch.setattr(loop, "save_checkpoint", timed(save, 1000.0))
    sets = {"hyperparameters.n_epochs": 2, "hyperparameters.batch_size": 4, "n": 16}
    sets |= {"data.validation": str(write_chat_jsonl(tmp_path / "val.jsonl", n=4))}
    sets |= {"hyperparameters.eval_steps": 2, "hyperparameters.save_steps": 3}
    result = run(_config(tmp_path, tiny_llama, **sets))
    rows = read_jsonl(Path(result.output_dir) / "metrics.jsonl")
    assert len(rows) == len(tokens) == 8 and any("valid_loss" in r for r in rows)
    assert [r["tokens_per_second"] for r in rows] == pytest.approx([float(n) for n in tokens])


@pytest.mark.parametrize("value", ["evil", "../openai", "", 8, None])
def test_auto_rule_accepts_only_its_two_names(value):
    """A request's `auto_rule` is one of two names; anything else is refused, naming the field."""
    from pydantic import ValidationError

    from tunery.config import Hyperparameters

    with pytest.raises(ValidationError, match="auto_rule"):
        Hyperparameters(auto_rule=value)
