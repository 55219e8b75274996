import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Under pytest-xdist (`-n auto`, the README's command) each worker, and every process a test starts,
# computes on one thread: the workers already fill the cores, and two torch threads per process
# fighting the other worker for 2 cores run tiny models several times slower. Set before torch loads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402

from tests.helpers.server import free_port  # noqa: E402
from tunery.models.unwrap import unwrap  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# rich wraps at 80 columns when not on a terminal; a temp path (longer under xdist: .../popen-gw0/...)
# would be cut across lines, and a test looking for it in the output would fail on the wrap alone.
os.environ.setdefault("COLUMNS", "200")


# Whole modules of heavy tests, marked `slow` here rather than test by test, so that `-m "not slow"`
# (the developer loop) stays under five minutes; the README's command still runs them.
HEAVY_MODULES = {
    "test_serve_recovery.py": "a server killed mid-job, then a second one resuming the job",
    "test_ray_executor.py": "a local Ray head with its job server, and jobs on it",
}


# Scheduling under pytest-xdist (`--dist loadgroup`, set in pyproject.toml): each module is one group,
# so its module-scoped fixtures (servers, engines, models) are built once, on one worker. Tests that
# start several busy processes of their own (torchrun ranks, a Ray head, a killed and restarted
# server) share one group, so they run one after another and never beside each other. Groups start
# longest first (measured with --durations; the rest follow in file order), so no long group starts
# last and leaves the other worker idle.
MULTIPROCESS = "multiprocess"
GROUP_OF_MODULE = {
    "test_distributed.py": MULTIPROCESS,
    "test_ray_executor.py": MULTIPROCESS,
    "test_serve_recovery.py": MULTIPROCESS,
}
LONGEST_FIRST = [
    "test_quickstart.py",  # 154 s on an AVX512-BF16 machine, 692 s in fp32 on an AVX2 one
    MULTIPROCESS,
    "test_serve_engines.py",
    "test_memory.py",
    "test_models.py",
    "test_flywheel_e2e.py",
    "test_classify.py",
    "test_layers.py",
    "test_train.py",
    "test_serve.py",
    "test_jobs_store.py",
    "test_benchmarks.py",
    "test_architectures.py",
    "test_ui.py",
    "test_export.py",
    "test_serve_load.py",
]


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, up to 4 (more would hold a torch each and fight over the
    multi-process tests' cores)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def _group(item) -> str:
    return GROUP_OF_MODULE.get(item.path.name, item.path.name)


# tryfirst: pytest-xdist's own collection hook turns each item's xdist_group mark into the "@group"
# suffix of its node id, which is what `--dist loadgroup` schedules by. Run after it (the default
# order: conftest hooks register first and so run last), these marks came too late: every test was its
# own unit, a module's tests went to both workers and built its module fixtures (servers, engines,
# trained models) once on each, and the multi-process tests ran beside each other.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in HEAVY_MODULES:
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(_group(item)))

    def rank(item) -> int:
        group = _group(item)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: file order within a group and among the rest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tests.helpers.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from tests.helpers.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tokenization and model caches go to a per-session temp dir, never the user's home. Under xdist
    # the workers of one session share it (their basetemps' parent, pytest-N/): a builtin model is then
    # converted once, not once per worker (smollm2 ~20 s, gemma3 ~50 s). The cache's file locks make
    # concurrent workers wait for one writer; a test that needs a cold cache sets its own TUNERY_CACHE.
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    monkeypatch.setenv("TUNERY_CACHE", str(root / "tunery-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    machine's 2 cores are shared, and two threads fighting other processes run tiny models ~5x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _ChatStub:
    """A tiny OpenAI-compatible chat endpoint on loopback whose replies a test decides
    (`reply(messages) -> str`): a judge or teacher whose answers are known, so the test can assert
    exact outcomes. Every request's messages are kept in `requests`."""

    def __init__(self, reply):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub = self
        self.reply, self.requests = reply, []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                stub.requests.append(body["messages"])
                text = stub.reply(body["messages"])
                out = json.dumps(
                    {
                        "id": f"chatcmpl-{len(stub.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": text},
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_stub():
    """`chat_stub(reply)` starts a stub OpenAI-compatible chat server (see `_ChatStub`); stopped after."""
    stubs = []

    def start(reply):
        stubs.append(_ChatStub(reply))
        return stubs[-1]

    yield start
    for stub in stubs:
        stub.close()


def _check_4bit_nf4(model) -> None:
    """Every quantizable Linear of the base is a bitsandbytes `Linear4bit` holding NF4 weights with
    double quantization, at 4 bits a weight: 1/8 of fp32 (a quarter of bf16) plus the quantization
    constants. A base that bitsandbytes left in full precision fails here, loudly."""
    import bitsandbytes as bnb
    import torch

    base = unwrap(model)
    # transformers keeps the output head in full precision, and the adapter's own matrices train in it
    linears = [(n, m) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    full = [n for n, m in linears if n.endswith("lm_head") or ".lora_" in n]
    plain = [n for n, m in linears if not isinstance(m, bnb.nn.Linear4bit) and n not in full]
    quantized = [m for _, m in linears if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and not plain, f"not 4-bit: {plain[:3]}"
    packed = fp32 = 0
    for m in quantized:
        w = m.weight
        state = w.quant_state
        assert isinstance(w, bnb.nn.Params4bit) and w.dtype == torch.uint8, type(w)
        assert state is not None and state.quant_type == "nf4" and state.nested  # double quantization
        packed += w.numel() * w.element_size() + state.absmax.numel() * state.absmax.element_size()
        fp32 += 4 * state.shape.numel()
    assert 0.12 <= packed / fp32 <= 0.15, packed / fp32


@pytest.fixture(scope="session")
def check_4bit_nf4():
    """The assertion that a QLoRA model's base really is in 4-bit NF4 (see `_check_4bit_nf4`)."""
    return _check_4bit_nf4


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster on loopback for the whole session (initdb + pg_ctl under a temp
    dir); its URL. Tests that need empty tables drop and create them."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) are not installed; "
            "scripts/ci-services.sh installs them (apt-get install -y postgresql)"
        )
    pytest.importorskip(
        "psycopg", reason="the psycopg driver is not installed (pip install 'psycopg[binary]')"
    )
    root = Path(tempfile.mkdtemp(prefix="tunery-pg-"))
    # initdb refuses to run as root; run the cluster as the `postgres` user the package creates.
    prefix: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    pgdata = root / "pgdata"
    subprocess.run(
        [*prefix, initdb, "-D", str(pgdata), "-U", "tunery", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*prefix, pg_ctl, "-D", str(pgdata), "-o", opts, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://tunery@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(pgdata), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
