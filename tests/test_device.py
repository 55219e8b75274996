"""Device mistakes caught without a GPU: every inference entry point runs a model that lives on `cuda`.

On a machine with no GPU the model is put on a *fake* cuda device: its weights are CPU tensors of a
subclass that reports `cuda:0`, and a torch-function mode makes every tensor created with
`device=cuda` such a tensor too, while a plain CPU tensor (more than a scalar) meeting one raises
`DeviceMismatch`, as CUDA would. Values are real, so generation runs to the end and its output is
compared with the same model on the CPU. A CPU `torch.Generator` passed to `multinomial` with fake
cuda probabilities raises as well.

With `TUNERY_TEST_DEVICE=cuda` (bench/gpu_check.sh on a GPU) the same tests run on the real GPU.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from tests.helpers.tiny import chat_row, make_tiny_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

REAL = os.environ.get("TUNERY_TEST_DEVICE", "") == "cuda"
FAKE = torch.device("cuda", 0)
# Ops where CUDA itself accepts a CPU operand (copies into a CUDA tensor, CPU index tensors).
_CROSS_DEVICE_OK = {"__setitem__", "copy_", "__get__"}
_MOVES = {"to", "cuda", "cpu"}


class DeviceMismatch(AssertionError):
    pass


class OnFake(torch.Tensor):
    """A CPU tensor with real values that says it lives on `FAKE`."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:
        return FAKE

    @property
    def is_cuda(self) -> bool:
        return True


def _fake(t):
    return t.as_subclass(OnFake) if isinstance(t, torch.Tensor) and not isinstance(t, OnFake) else t


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, OnFake) else t


def _is_fake(device) -> bool:
    if device is None or isinstance(device, torch.dtype):
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == FAKE.type


class FakeGenerator(torch.Generator):
    """`torch.Generator(device=...)`: a CPU generator that reports the fake device when asked for it."""

    def __new__(cls, device="cpu"):
        self = super().__new__(cls, "cpu")
        self.fake = _is_fake(device)
        return self

    def __init__(self, device="cpu"):  # everything happened in __new__
        pass

    @property
    def device(self) -> torch.device:
        return FAKE if self.fake else torch.device("cpu")


class FakeCuda(TorchFunctionMode):
    """Runs every torch call on plain CPU tensors, checking devices as CUDA would (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in _MOVES:
            return self._move(name, args, kwargs)
        made_here = _is_fake(kwargs.get("device"))
        if made_here:
            kwargs["device"] = "cpu"
        flat, _ = tree_flatten((args, kwargs))
        on = any(isinstance(t, OnFake) for t in flat)
        off = [
            tuple(t.shape)
            for t in flat
            if isinstance(t, torch.Tensor) and not isinstance(t, OnFake) and t.dim()
        ]
        gen = kwargs.get("generator")
        if gen is not None and (on or made_here) and not getattr(gen, "fake", False):
            raise DeviceMismatch(f"{name}: a CPU generator used with tensors on {FAKE}")
        if on and off and name not in _CROSS_DEVICE_OK:
            raise DeviceMismatch(f"{name}: CPU tensors of shape {off} meet tensors on {FAKE}")
        out = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
        return tree_map(_fake, out) if on or made_here else out

    @staticmethod
    def _move(name, args, kwargs):
        tensor, rest = _plain(args[0]), list(args[1:])
        target = {"cuda": FAKE, "cpu": torch.device("cpu")}.get(name, kwargs.pop("device", None))
        if name == "to" and rest:  # to(tensor, ...), to(device, dtype, ...) or to(dtype, ...)
            first = rest[0]
            if isinstance(first, torch.Tensor):
                target, rest[0] = first.device, first.dtype
            elif first is None or isinstance(first, str | torch.device) or type(first) is int:
                target = rest.pop(0)
        if name == "to":
            out = tensor.to("cpu", *tree_map(_plain, rest), **kwargs)
        else:
            out = tensor
        if target is None:
            return _fake(out) if isinstance(args[0], OnFake) else out
        return _fake(out) if _is_fake(target) else out


def to_fake(module: torch.nn.Module) -> torch.nn.Module:
    """Put `module`'s parameters and buffers on the fake device (call inside `FakeCuda`)."""
    for m in module.modules():
        if getattr(m, "_use_kernels", False):  # hub kernels ask the real GPU for its capability
            m._use_kernels = False
        for n, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[n] = torch.nn.Parameter(_fake(p.detach()), requires_grad=p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[n] = _fake(b)
    return module


@pytest.fixture
def device(monkeypatch):
    """The device under test, with its checking mode active (and the engine's worker thread's)."""
    monkeypatch.setenv("TUNERY_DEVICE", "cuda")
    if REAL:
        yield torch.device("cuda")
        return
    from tunery.generation.engine import Engine

    run = Engine._run

    def checked_run(self):  # torch-function modes are per thread
        with FakeCuda():
            run(self)

    monkeypatch.setattr(torch, "Generator", FakeGenerator)
    monkeypatch.setattr(Engine, "_run", checked_run)
    with FakeCuda():
        yield FAKE


def on(device: torch.device, model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` on `device`."""
    model = copy.deepcopy(model)
    return model.to(device) if REAL else to_fake(model)


def _on_device(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from tunery.models import load_model, load_tokenizer

    path = make_tiny_model_dir(tmp_path_factory.mktemp("dev-llama"), "llama")
    model = load_model(path, dtype=torch.float32).eval()
    return path, model, load_tokenizer(path)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]


def test_the_harness_catches_a_cpu_tensor(device, lm):
    """The check itself: a CPU input to a model on the device fails, a device input runs."""
    _, model, _ = lm
    moved = on(device, model)
    assert _on_device(next(moved.parameters()))
    with pytest.raises((DeviceMismatch, RuntimeError)):
        moved(input_ids=torch.tensor([PROMPTS[0]]))
    out = moved(input_ids=torch.tensor([PROMPTS[0]], device=device)).logits
    assert _on_device(out)


def test_greedy_and_sampled_generation_on_the_device(device, lm):
    from tunery.generation.generate import generate_batch, stream
    from tunery.generation.sequence import GenerationParams

    _, model, tok = lm
    moved = on(device, model)
    greedy = GenerationParams(max_new_tokens=6)
    sampled = GenerationParams(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=3, n=2, logprobs=True)
    got = generate_batch(moved, tok, PROMPTS, greedy, batch_size=2)
    got_sampled = generate_batch(moved, tok, PROMPTS, sampled, batch_size=8)
    text = "".join(stream(moved, tok, PROMPTS[0], GenerationParams(max_new_tokens=6)))
    assert len(got) == 3 and len(got_sampled) == 6
    if not REAL:  # the same arithmetic on the CPU: identical tokens, sampled ones included
        with _cpu():
            want = generate_batch(model, tok, PROMPTS, greedy, batch_size=2)
            want_sampled = generate_batch(model, tok, PROMPTS, sampled, batch_size=8)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.token_ids for r in got_sampled] == [r.token_ids for r in want_sampled]
        assert text == want[0].text


@contextlib.contextmanager
def _cpu():
    """Leave the fake device's mode for a reference run on the CPU."""
    with torch._C.DisableTorchFunction():
        yield


def test_eval_and_classification_metrics_on_the_device(device, lm, tmp_path):
    from tests.helpers.tiny import write_jsonl
    from tunery.evaluate.run import classification_eval, evaluate, load_conversations

    _, model, tok = lm
    moved = on(device, model)
    rows = [chat_row(f"Is item {i} good?", "positive" if i % 2 else "negative") for i in range(4)]
    convs = load_conversations(write_jsonl(tmp_path / "eval.jsonl", rows))
    res = evaluate(moved, tok, convs, max_new_tokens=3, progress=False, n_shown=0)
    assert res["loss"] > 0 and 0 <= res["exact_match"] <= 1
    flat = classification_eval(moved, tok, convs, max_new_tokens=3)
    assert "valid_accuracy" in flat


def test_grpo_rollout_on_the_device(device, lm, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.helpers.tiny import quick_run_config
    from tunery.objectives.base import Context
    from tunery.objectives.grpo import GRPOOptions, collate, rollout, scorers

    path, model, tok = lm
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    moved = on(device, peft)
    options = GRPOOptions(
        num_generations=2, max_new_tokens=4, reward_functions=[{"name": "contains", "word": "a"}]
    )
    config = quick_run_config(path, tmp_path / "d.jsonl", tmp_path / "out")
    ctx = Context(config=config, options=options, tokenizer=tok, reference=moved.disable_adapter)
    ctx.extra["scorers"] = scorers(options)
    for packed in (False, True):
        feats = [{"input_ids": p, "example": {"messages": []}} for p in PROMPTS[:2]]
        out = rollout(moved, collate(feats, tok.pad_token_id, packed), ctx)
        assert _on_device(out["ref_logps"]) and out["n_units"] == 4


def test_classifier_head_on_the_device(device, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tests.helpers.tiny import tiny_config, tiny_tokenizer
    from tunery.evaluate.classify import predict_proba

    tok = tiny_tokenizer()
    cfg = tiny_config("llama", vocab_size=len(tok), num_labels=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_config(cfg).eval()
    probs = predict_proba(on(device, clf), tok, ["a good film", "bad"])
    assert len(probs) == 2 and abs(sum(probs[0]) - 1) < 1e-4


def test_serve_engine_on_the_device(device, lm):
    from tunery.generation.engine import Engine
    from tunery.generation.sequence import GenerationParams

    path, model, tok = lm
    moved = on(device, model)
    engine = Engine(loader=lambda spec, adapter: (moved, tok), batch_wait=0)
    try:
        handles = [
            engine.submit(str(path), None, p, GenerationParams(max_new_tokens=4, temperature=t, seed=1))
            for p, t in zip(PROMPTS, (0.0, 0.7, 0.0), strict=True)
        ]
        results = [h.result(timeout=120)[0] for h in handles]
    finally:
        engine.close()
    assert all(1 <= r.completion_tokens <= 4 for r in results)


def test_place_follows_tunery_device(monkeypatch, lm):
    from tunery.models.placement import inference_device, model_device, place

    _, model, _ = lm
    monkeypatch.setenv("TUNERY_DEVICE", "cpu")
    assert inference_device() == torch.device("cpu")
    assert place(model) is model and model_device(model) == torch.device("cpu")
    monkeypatch.setenv("TUNERY_DEVICE", "meta")
    assert model_device(place(copy.deepcopy(model))).type == "meta"


def test_two_runs_at_different_precisions_in_one_process(tmp_path, tiny_llama):
    """accelerate keeps one AcceleratorState a process; a second run at another precision used to raise."""
    from tests.helpers.tiny import quick_run_config, write_chat_jsonl
    from tunery.train import run

    data = write_chat_jsonl(tmp_path / "train.jsonl", n=10)
    for precision in ("fp32", "bf16"):
        sets = {"hyperparameters.precision": precision, "hyperparameters.max_steps": 1, "method": "lora"}
        result = run(quick_run_config(tiny_llama, data, tmp_path / precision, **sets))
        assert result.status == "succeeded"


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
def test_fused_lora_keeps_no_copy_of_the_frozen_weight(base_dtype):
    """Under bf16 compute, backward holds the frozen weight itself: a bf16 base with no copy, and an
    fp32 base without the bf16 copy forward made (it is cast again in backward)."""
    from tunery.train.lora_kernel import _LoraLinearFn

    torch.manual_seed(0)
    weight = torch.randn(32, 16, dtype=base_dtype)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(32, 4, requires_grad=True)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    y = _LoraLinearFn.apply(x, weight, None, a, b, 0.5, torch.bfloat16)
    kept = [t for t in y.grad_fn.saved_tensors if t.shape == weight.shape]
    assert len(kept) == 1 and kept[0].data_ptr() == weight.data_ptr()
    y.float().sum().backward()
    # d/dx of sum(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) for every row: the column sums of W + s·B·A
    want = weight.float().sum(0) + 0.5 * (b.detach().sum(0) @ a.detach())
    torch.testing.assert_close(x.grad.float(), want.expand(3, -1), atol=0.3, rtol=0.05)


def test_varlen_packed_attention_equals_per_segment_attention(lm):
    """The varlen layout (one kernel call per layer for the packed row) gives the per-segment logits.
    On a CPU the kernel is the per-segment reference, so this checks the layout code; on a GPU
    (TUNERY_TEST_DEVICE=cuda) it is the real flash kernel, in bf16, and must not read the host."""
    from tunery.modeling import attention
    from tunery.modeling.forward import forward_kwargs, packed_inputs

    _, model, _ = lm
    model = copy.deepcopy(model)
    assert attention.use_packed_attention(model)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    batch = packed_inputs(rows)
    dtype = torch.bfloat16 if REAL else torch.float32
    if REAL:
        model, batch = (
            model.to("cuda", dtype),
            {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in batch.items()},
        )
    logits = {}
    for mode in ("segments", "varlen"):
        assert attention.use_packed_attention(model, mode)
        with torch.no_grad(), _host_reads() as reads:
            logits[mode] = model(**forward_kwargs(batch)).logits.float()
        if REAL and mode == "varlen":
            assert not reads, f"varlen attention read the host: {reads}"
    tol = 2e-2 if REAL else 1e-5
    torch.testing.assert_close(logits["varlen"], logits["segments"], atol=tol, rtol=tol)


@contextlib.contextmanager
def _host_reads():
    """Records device-to-host reads (`tolist`, `item`) made inside packed attention."""
    from tunery.modeling import attention

    reads: list[str] = []
    inner = attention.varlen_attention

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("tolist", "item", "__int__", "__bool__"):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def watched(*args, **kwargs):
        with Reads():
            return inner(*args, **kwargs)

    attention.varlen_attention = watched
    try:
        yield reads
    finally:
        attention.varlen_attention = inner


# --------------------------------------------------------------------------- multi-GPU checks


def test_local_rank_beyond_the_visible_gpus_is_a_clear_error():
    from tunery.train.launch import DistributedError, check_local_rank

    check_local_rank(1, 2)
    with pytest.raises(DistributedError, match="LOCAL_RANK=2 has no GPU: this process sees 2"):
        check_local_rank(2, 2)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_qlora_cannot_be_sharded(strategy):
    from tunery.errors import ConfigError
    from tunery.plugins import load_config
    from tunery.train.launch import check

    with pytest.raises(ConfigError, match="qlora cannot be sharded"):
        check(load_config(sets=["method=qlora", f"distributed.strategy={strategy}"]), cuda=True)
    check(load_config(sets=["method=qlora", "distributed.strategy=ddp"]), cuda=True)


@pytest.fixture
def one_rank(monkeypatch):
    """A process group of one rank (gloo), as a launched run would join."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}
    for key, value in {**env, "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)


def test_process_group_timeout_comes_from_the_config(one_rank, lm):
    from tunery.plugins import load_config
    from tunery.train import distributed

    config = load_config(sets=["distributed.timeout_minutes=7"])
    assert load_config().distributed.timeout_minutes == 60
    dist = distributed.start(config)
    try:
        backend = torch.distributed.group.WORLD._get_backend(torch.device("cpu"))
        assert backend.options._timeout.total_seconds() == 7 * 60
        # FSDP2 computes in the run's half precision: bf16 logits from an fp32 model.
        _, model, _ = lm
        root = distributed._fully_shard(
            distributed.LossModule(copy.deepcopy(model)), config.distributed.fsdp, dist.device, torch.bfloat16
        )
        logits = root(lambda m, ids: m(input_ids=ids).logits, torch.tensor([PROMPTS[0]]))
        assert logits.dtype == torch.bfloat16
    finally:
        dist.close()


# --------------------------------------------------------------------------- precision choices


def test_frozen_bf16_bases_load_in_bf16_on_a_gpu_with_bf16(monkeypatch):
    from tunery.models import placement

    monkeypatch.setattr(placement, "bf16_supported", lambda device=None: torch.device(device).type == "cuda")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert placement.load_dtype("bfloat16", cuda, frozen_base=True) == torch.bfloat16
    assert placement.load_dtype("torch.bfloat16", cuda, frozen_base=True) == torch.bfloat16
    assert placement.load_dtype("bfloat16", cuda, frozen_base=False) == torch.float32  # the optimizer's
    assert placement.load_dtype("float32", cuda, frozen_base=True) == torch.float32
    assert placement.load_dtype("bfloat16", cpu, frozen_base=True) == torch.float32


def test_training_loads_a_frozen_bf16_base_in_bf16_on_a_gpu(monkeypatch, tmp_path):
    from tests.helpers.tiny import quick_run_config
    from tunery.methods import METHODS
    from tunery.models import placement
    from tunery.train.setup import _base_dtype

    path = make_tiny_model_dir(tmp_path / "m", "llama", torch_dtype="bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(placement, "bf16_supported", lambda device=None: True)

    def dtype(method: str, precision: str = "auto") -> torch.dtype:
        sets = {"method": method, "hyperparameters.precision": precision}
        return _base_dtype(
            quick_run_config(path, tmp_path / "d.jsonl", tmp_path / "o", **sets), METHODS.get(method)
        )

    assert dtype("lora") == torch.bfloat16
    assert dtype("lora", "fp32") == torch.float32
    assert dtype("full") == torch.float32


@pytest.mark.parametrize(
    ("cuda", "native", "want"), [(True, True, "bfloat16"), (True, False, "float32"), (False, True, "float32")]
)
def test_qlora_computes_in_bf16_on_gpus_that_have_it(monkeypatch, cuda, native, want):
    from tunery.methods import qlora

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(qlora, "bf16_supported", lambda device=None: native)
    assert qlora.compute_dtype(qlora.QLoraOptions().compute_dtype) == getattr(torch, want)
    assert qlora.compute_dtype("float32") == torch.float32


@pytest.mark.skipif(not REAL, reason="the CUDA generator state exists only on a GPU")
def test_checkpoints_restore_the_gpu_random_state(tmp_path):
    from tunery.train import checkpoint as ckpt

    ckpt.save_state({"rng": ckpt.rng_state()}, tmp_path, "state")
    first = torch.rand(8, device="cuda")
    ckpt.set_rng_state(ckpt.load_state(tmp_path, "state")["rng"])
    torch.testing.assert_close(torch.rand(8, device="cuda"), first)


def test_a_gpu_checkpoint_resumes_on_a_cpu(tmp_path):
    """A state saved with CUDA generators restores where there is no GPU (they are skipped)."""
    from tunery.train import checkpoint as ckpt

    state = ckpt.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    ckpt.save_state({"rng": state}, tmp_path, "state")
    first = torch.rand(4)
    if not torch.cuda.is_available():
        ckpt.set_rng_state(ckpt.load_state(tmp_path, "state")["rng"])
        torch.testing.assert_close(torch.rand(4), first)


# --------------------------------------------------------------------------- install


@pytest.mark.parametrize(
    ("listing", "cuda", "want"),
    [
        ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)", "13.0", "CUDA build of torch (cu130)"),
        ("GPU 0: NVIDIA A10G (UUID: GPU-2)", "12.4", "CUDA build of torch (cu126)"),
        ("", "", "CPU build of torch"),
    ],
)
def test_install_picks_the_torch_build_for_the_machine(tmp_path, listing, cuda, want):
    import subprocess
    from pathlib import Path

    smi = tmp_path / "nvidia-smi"  # answers as the driver's tool does, with or without a GPU
    smi.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-L" ]; then [ -n "{listing}" ] && echo "{listing}" && exit 0; '
        'echo "No devices were found"; exit 6; fi\n'
        f'echo "| NVIDIA-SMI 580.65   Driver Version: 580.65   CUDA Version: {cuda}  |"\n'
    )
    smi.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "TUNERY_INSTALL_DRY_RUN": "1"}
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert want in out.stdout
    assert ("--index-url" in out.stdout) == bool(listing)
