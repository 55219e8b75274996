"""The model registry (issue 25, section 1): `tunery models add|list|info|rm|pull` on tiny models, the
sha256 of the weights and its check, the names and sources refused, the offline pull, and the server:
any key chats and trains with a registered model by name, only admin keys register or remove one,
and `/v1/models` lists it. The table on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import shutil
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from tunery.cli import app
from tunery.jobs.store import Store
from tunery.models.load import count_safetensors_params
from tunery.serve.alias_store import AliasTable
from tunery.serve.common import Settings
from tunery.serve.model_registry import ModelRegistry

ADMIN = "admin-key-0123456789"
ASK = [{"role": "user", "content": "Say hi"}]
CHAT = [
    {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
    for i in range(10)
]


def _cli(*args: str):
    return CliRunner().invoke(app, ["models", *args])


def _said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _names(data) -> list[str]:
    registry = ModelRegistry(Store(data))
    try:
        return [r.name for r in registry.list()]
    finally:
        registry.store.close()


@pytest.fixture
def own_model(tmp_path, tiny_llama):
    """A copy of the tiny model a test may change (the session's `tiny_llama` is shared)."""
    return shutil.copytree(tiny_llama, tmp_path / "my-model")


def test_add_list_info_rm(tmp_path, own_model):
    where = ("--data-dir", str(tmp_path / "data"))
    added = _cli("add", "tiny-chat", str(own_model), *where)
    assert added.exit_code == 0, added.output
    registry = ModelRegistry(Store(tmp_path / "data"))
    row = registry.get("tiny-chat")
    registry.store.close()
    # The directory's sha256 is `sha256sum *.safetensors | sha256sum`'s.
    file_hash = hashlib.sha256((own_model / "model.safetensors").read_bytes()).hexdigest()
    assert row.sha256 == hashlib.sha256(f"{file_hash}  model.safetensors\n".encode()).hexdigest()
    config = json.loads((own_model / "config.json").read_text())
    assert (row.source, row.kind, row.architecture) == (str(own_model), "local", "LlamaForCausalLM")
    assert row.parameters == count_safetensors_params(own_model)
    assert row.context_length == config["max_position_embeddings"]
    assert row.chat_template is True

    listed = _cli("list", *where)
    assert listed.exit_code == 0 and "tiny-chat" in _said(listed)

    info = _cli("info", "tiny-chat", *where)
    assert info.exit_code == 0, info.output
    assert "LlamaForCausalLM" in _said(info) and f"({row.parameters})" in _said(info)
    assert f"context length: {row.context_length}" in _said(info)
    assert "match the sha256" in _said(info) and "changed" not in info.output
    for method in ("full", "lora", "qlora", "ia3"):  # what each method would train, with memory
        assert f"│ {method} " in _said(info)
    assert "rank-16 adapters" in _said(info) and " GB " in _said(info)

    files = {p.name: p.read_bytes() for p in own_model.iterdir()}
    removed = _cli("rm", "tiny-chat", *where)
    assert removed.exit_code == 0, removed.output
    assert _names(tmp_path / "data") == []
    assert {p.name: p.read_bytes() for p in own_model.iterdir()} == files  # the user's files stay
    assert _cli("info", "tiny-chat", *where).exit_code == 2  # gone from the registry


def test_info_detects_changed_weights(tmp_path, own_model):
    where = ("--data-dir", str(tmp_path / "data"))
    assert _cli("add", "tiny-chat", str(own_model), *where).exit_code == 0
    weights = own_model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor: the header, and so every count, stays valid
    weights.write_bytes(bytes(data))
    info = _cli("info", "tiny-chat", *where)
    assert info.exit_code == 0, info.output
    assert "changed since added" in _said(info) and "match the sha256" not in info.output


@pytest.mark.parametrize(
    "name, says",
    [
        ("smollm2-135m", "builtin"),  # a builtin chat model
        ("minilm-l6", "builtin"),  # a builtin encoder
        ("ft:tiny:me::x", "never ':' or '/'"),
        ("org/model", "never ':' or '/'"),
        ("router", "alias"),  # a key's alias: the registered name would hide it
    ],
)
def test_names_that_shadow_or_break_the_rules_are_refused(tmp_path, tiny_llama, name, says):
    store = Store(tmp_path / "data")
    AliasTable(store).set("key_a", "router", "smollm2-135m")
    store.close()
    out = _cli("add", name, str(tiny_llama), "--data-dir", str(tmp_path / "data"))
    assert out.exit_code == 2 and says in _said(out), out.output
    assert _names(tmp_path / "data") == []


def test_a_name_is_registered_once(tmp_path, tiny_llama):
    where = ("--data-dir", str(tmp_path / "data"))
    assert _cli("add", "tiny-chat", str(tiny_llama), *where).exit_code == 0
    again = _cli("add", "tiny-chat", str(tiny_llama), *where)
    assert again.exit_code == 2 and "registered already" in _said(again)


def test_pickle_only_and_custom_code_sources_are_refused(tmp_path, tiny_llama):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_llama / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded: it could run code")
    out = _cli("add", "pickled", str(pickled), "--data-dir", str(tmp_path / "data"))
    assert out.exit_code == 2 and "pickle" in _said(out) and "safetensors only" in _said(out)

    custom = shutil.copytree(tiny_llama, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="my_own_arch", auto_map={"AutoConfig": "modeling.MyConfig"})
    (custom / "config.json").write_text(json.dumps(config))
    out = _cli("add", "custom", str(custom), "--data-dir", str(tmp_path / "data"))
    assert out.exit_code == 2 and "trust_remote_code" in _said(out)
    assert _names(tmp_path / "data") == []


def test_pull_offline_is_a_clear_error(tmp_path, monkeypatch):
    import importlib

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def never(*_args, **_kwargs):
        raise AssertionError("the test tried to download")

    # (`tunery.models.resolve` the attribute is the function; the module is imported by name.)
    monkeypatch.setattr(importlib.import_module("tunery.models.resolve"), "_download", never)
    where = ("--data-dir", str(tmp_path / "data"))
    out = _cli("pull", "remote", "tunery-tests/not-a-real-model", *where)
    assert out.exit_code == 2, out.output
    assert "Cannot pull 'tunery-tests/not-a-real-model': this machine is offline" in _said(out)
    # `add` of a hub id that was never pulled says to pull it.
    out = _cli("add", "remote", "tunery-tests/not-a-real-model", *where)
    assert out.exit_code == 2 and "tunery models pull NAME tunery-tests/not-a-real-model" in _said(out)
    assert _names(tmp_path / "data") == []


def test_pull_offline_registers_a_model_already_in_the_hub_cache(tmp_path, monkeypatch, tiny_llama):
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    repo = cache / "models--tunery-tests--tiny"  # the hub cache's layout: refs/main -> snapshots/<sha>
    shutil.copytree(tiny_llama, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = _cli("pull", "tiny-hub", "tunery-tests/tiny", "--data-dir", str(tmp_path / "data"))
    assert out.exit_code == 0, out.output
    registry = ModelRegistry(Store(tmp_path / "data"))
    row = registry.get("tiny-hub")
    registry.store.close()
    assert (row.source, row.kind) == ("tunery-tests/tiny", "hub")
    file_hash = hashlib.sha256((tiny_llama / "model.safetensors").read_bytes()).hexdigest()
    assert row.sha256 == hashlib.sha256(f"{file_hash}  model.safetensors\n".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    from fastapi.testclient import TestClient

    from tunery.serve.app import create_app

    data = tmp_path_factory.mktemp("registry") / "data"
    assert _cli("add", "tiny-chat", str(tiny_llama), "--data-dir", str(data)).exit_code == 0
    store = Store(data)
    _, user = store.create_key("user")
    store.close()
    # Keys share this server, so local models are off (the default): only registered names reach disk.
    settings = Settings(data_dir=data, api_key=ADMIN, run_executor=False)
    assert settings.allow_local_models is False
    with TestClient(create_app(settings)) as http:
        yield SimpleNamespace(http=http, user=user, base=str(tiny_llama))


def _call(server, method: str, path: str, key: str, body=None):
    return server.http.request(method, path, headers={"Authorization": f"Bearer {key}"}, json=body)


def test_any_key_chats_with_a_registered_model_by_name(server):
    body = {"model": "tiny-chat", "messages": ASK, "max_tokens": 4, "temperature": 0}
    made = _call(server, "POST", "/v1/chat/completions", server.user, body)
    assert made.status_code == 200, made.text
    assert made.json()["model"] == "tiny-chat" and made.json()["choices"][0]["message"]["content"]
    # The same weights named by their path stay behind the operator switch.
    by_path = _call(server, "POST", "/v1/chat/completions", server.user, {**body, "model": server.base})
    assert by_path.status_code == 404 and server.base not in by_path.text


def test_models_lists_registered_models(server):
    listed = _call(server, "GET", "/v1/models", server.user).json()["data"]
    entry = next(m for m in listed if m["id"] == "tiny-chat")
    assert entry["owned_by"] == "tunery" and "engine" in entry["tunery"]
    assert _call(server, "GET", "/v1/models/tiny-chat", server.user).json()["id"] == "tiny-chat"
    # A key cannot delete it through OpenAI's model endpoint either.
    assert _call(server, "DELETE", "/v1/models/tiny-chat", server.user).status_code == 403


def test_an_alias_cannot_take_a_registered_models_name(server):
    # Registered names win over aliases in resolution, so such an alias would never be served.
    made = _call(server, "POST", "/v1/tunery/aliases/tiny-chat", server.user, {"model": "smollm2-135m"})
    assert made.status_code == 400 and "registered model" in made.json()["error"]["message"]


def test_jobs_accept_a_registered_model(server):
    data = "".join(json.dumps(r) + "\n" for r in CHAT).encode()
    upload = server.http.post(
        "/v1/files",
        headers={"Authorization": f"Bearer {server.user}"},
        files={"file": ("t.jsonl", data)},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    body = {"model": "tiny-chat", "training_file": upload.json()["id"], "hyperparameters": {"n_epochs": 1}}
    job = _call(server, "POST", "/v1/fine_tuning/jobs", server.user, body)
    assert job.status_code == 200, job.text
    assert job.json()["model"] == "tiny-chat"


def test_only_admin_keys_register_and_remove(server):
    new = {"name": "tiny-two", "source": server.base}
    for method, path, body in (
        ("GET", "/v1/tunery/models", None),
        ("GET", "/v1/tunery/models/tiny-chat", None),
        ("POST", "/v1/tunery/models", new),
        ("DELETE", "/v1/tunery/models/tiny-chat", None),
    ):
        refused = _call(server, method, path, server.user, body)
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.json()["error"]["code"] == "admin_key_required"
    assert "tiny-two" not in [m["id"] for m in _call(server, "GET", "/v1/models", server.user).json()["data"]]

    made = _call(server, "POST", "/v1/tunery/models", ADMIN, new)
    assert made.status_code == 200, made.text
    assert made.json()["architecture"] == "LlamaForCausalLM" and len(made.json()["sha256"]) == 64
    names = [m["name"] for m in _call(server, "GET", "/v1/tunery/models", ADMIN).json()["data"]]
    assert names == ["tiny-chat", "tiny-two"]
    chat = {"model": "tiny-two", "messages": ASK, "max_tokens": 2}
    assert _call(server, "POST", "/v1/chat/completions", server.user, chat).status_code == 200
    assert _call(server, "DELETE", "/v1/tunery/models/tiny-two", ADMIN).status_code == 200
    assert _call(server, "POST", "/v1/chat/completions", server.user, chat).status_code == 404


def test_bad_sources_are_a_400_without_server_paths(server, tmp_path):
    missing = str(tmp_path / "nowhere" / "model")
    for source in (missing, "relative/../dir", "smollm2-135m"):
        made = _call(server, "POST", "/v1/tunery/models", ADMIN, {"name": "broken", "source": source})
        assert made.status_code == 400, made.text
        assert made.json()["error"]["param"] == "source" and str(tmp_path) not in made.text
    taken = _call(server, "POST", "/v1/tunery/models", ADMIN, {"name": "smollm2-135m", "source": server.base})
    assert taken.status_code == 400 and taken.json()["error"]["param"] == "name"
    again = _call(server, "POST", "/v1/tunery/models", ADMIN, {"name": "tiny-chat", "source": server.base})
    assert again.status_code == 409


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_table_on_both_databases(db, request, tmp_path, tiny_llama):
    url = request.getfixturevalue("postgres_url") if db == "postgresql" else None
    registry = ModelRegistry(Store(tmp_path / "data", url))
    try:
        for row in registry.list():  # the session's PostgreSQL is shared between tests
            registry.remove(row.name)
        registry.register("tiny-b", str(tiny_llama))
        registry.register("tiny-a", str(tiny_llama))
        assert [r.name for r in registry.list()] == ["tiny-a", "tiny-b"]
        assert registry.find("tiny-a").parameters == count_safetensors_params(tiny_llama)
        registry.remove("tiny-a")
        assert registry.find("tiny-a") is None and [r.name for r in registry.list()] == ["tiny-b"]
    finally:
        registry.store.close()
