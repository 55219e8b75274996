"""Model aliases (issue 27, section 4): a stable name a key's apps call, switched from the old model to
the new one. The API and chat/completions through an alias in process on the tiny model, strict
per-key isolation, names that may not shadow a model, the `tunery aliases` CLI, and the table on
SQLite and PostgreSQL."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import openai
import pytest
from typer.testing import CliRunner

from tests.helpers.server import make_lora_adapter, register_model
from tunery.cli import app
from tunery.jobs.store import Store
from tunery.serve.alias_store import AliasTable
from tunery.serve.common import Settings

ASK = [{"role": "user", "content": "Say hi"}]
ALICE_FT, BOB_FT = "ft:tiny:alice::a1", "ft:tiny:bob::b1"


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama):
    from fastapi.testclient import TestClient

    from tunery.serve.app import create_app

    root = tmp_path_factory.mktemp("aliases")
    data = root / "data"
    store = Store(data)
    (alice_row, alice), (bob_row, bob) = store.create_key("alice"), store.create_key("bob")
    store.close()
    register_model(data, alice, ALICE_FT, tiny_llama, make_lora_adapter(tiny_llama, root / "a", seed=1))
    register_model(data, bob, BOB_FT, tiny_llama, make_lora_adapter(tiny_llama, root / "b", seed=2))
    settings = Settings(data_dir=data, run_executor=False, allow_local_models=True)
    with TestClient(create_app(settings)) as http:

        def sdk(key):
            return openai.OpenAI(
                base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0
            )

        yield SimpleNamespace(
            http=http,
            data=data,
            base=str(tiny_llama),
            alice=sdk(alice),
            bob=sdk(bob),
            alice_id=alice_row.id,
            bob_id=bob_row.id,
        )


def _api(client, method: str, path: str, **body) -> httpx.Response:
    """Tunery's alias endpoints through the SDK's HTTP client (the SDK has no methods for them)."""
    headers = {"Authorization": f"Bearer {client.api_key}"}
    return client._client.request(
        method,
        f"{client.base_url}tunery/aliases{path}",
        json=body if method == "POST" else None,
        headers=headers,
    )


def _reply(client, model: str) -> str:
    made = client.chat.completions.create(model=model, messages=ASK, max_tokens=6, temperature=0)
    assert made.model == model  # apps see the name they called
    return made.choices[0].message.content


def test_alias_serves_its_target_and_switches(env):
    old, new = _reply(env.alice, env.base), _reply(env.alice, ALICE_FT)
    assert old != new  # the random adapter changes the reply: what the alias serves is visible
    made = _api(env.alice, "POST", "/support-router", model=env.base)
    assert made.status_code == 200, made.text
    assert made.json()["model"] == env.base and made.json()["previous_model"] is None
    assert _reply(env.alice, "support-router") == old
    switched = _api(env.alice, "POST", "/support-router", model=ALICE_FT).json()
    assert (switched["model"], switched["previous_model"]) == (ALICE_FT, env.base)
    assert _reply(env.alice, "support-router") == new
    legacy = env.alice.completions.create(model="support-router", prompt="Hi", max_tokens=4, temperature=0)
    direct = env.alice.completions.create(model=ALICE_FT, prompt="Hi", max_tokens=4, temperature=0)
    assert legacy.choices[0].text == direct.choices[0].text
    listed = _api(env.alice, "GET", "").json()["data"]
    assert [a["name"] for a in listed] == ["support-router"]
    assert _api(env.alice, "GET", "/support-router").json()["model"] == ALICE_FT


def test_another_key_cannot_read_switch_delete_or_call_an_alias(env):
    assert _api(env.alice, "POST", "/router-x", model=ALICE_FT).status_code == 200
    assert _api(env.bob, "GET", "/router-x").status_code == 404
    assert _api(env.bob, "GET", "").json()["data"] == []
    assert _api(env.bob, "DELETE", "/router-x").status_code == 404
    with pytest.raises(openai.NotFoundError):
        env.bob.chat.completions.create(model="router-x", messages=ASK, max_tokens=2)
    # Bob's "router-x" is his own name: setting it leaves Alice's alias as it was.
    assert _api(env.bob, "POST", "/router-x", model=BOB_FT).json()["model"] == BOB_FT
    assert _api(env.alice, "GET", "/router-x").json()["model"] == ALICE_FT
    assert _reply(env.bob, "router-x") == _reply(env.bob, BOB_FT)
    assert _reply(env.alice, "router-x") == _reply(env.alice, ALICE_FT)


def test_an_alias_cannot_point_at_another_keys_model(env):
    theirs = _api(env.bob, "POST", "/steal", model=ALICE_FT)
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "model_not_found"
    assert _api(env.bob, "GET", "/steal").status_code == 404
    # Nor at an alias (no chains), nor at nothing.
    _api(env.bob, "POST", "/mine", model=BOB_FT)
    assert _api(env.bob, "POST", "/chain", model="mine").status_code == 404
    assert _api(env.bob, "POST", "/empty").json()["error"]["param"] == "model"


def test_an_alias_whose_model_was_deleted_is_a_clear_404(env):
    assert _api(env.bob, "POST", "/gone", model=BOB_FT).status_code == 200
    env.bob.models.delete(BOB_FT)
    with pytest.raises(openai.NotFoundError, match="The alias `gone` points to"):
        env.bob.chat.completions.create(model="gone", messages=ASK, max_tokens=2)


@pytest.mark.parametrize(
    "name, status",
    [("smollm2-135m", 400), (ALICE_FT, 400), ("-dash", 400), ("x" * 65, 400), ("ok.name_1-2", 200)],
)
def test_alias_names_never_shadow_a_model(env, name, status):
    r = _api(env.alice, "POST", f"/{name}", model=env.base)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["code"] == "invalid_alias"


def test_cli_set_list_rm(env):
    run = CliRunner().invoke
    where = ["--data-dir", str(env.data)]
    made = run(app, ["aliases", "set", "cli-router", env.base, "--key", env.alice_id, *where])
    assert made.exit_code == 0, made.output
    assert _reply(env.alice, "cli-router") == _reply(env.alice, env.base)  # the live server sees it
    again = run(app, ["aliases", "set", "cli-router", ALICE_FT, "--key", env.alice_id, *where])
    assert again.exit_code == 0 and f"(was {env.base})" in again.output
    theirs = run(app, ["aliases", "set", "cli-router", ALICE_FT, "--key", env.bob_id, *where])
    assert theirs.exit_code == 2 and "does not exist or you do not have access" in theirs.output
    listed = run(app, ["aliases", "list", "--key", env.alice_id, *where])
    assert "cli-router" in listed.output and "alice" in listed.output
    assert run(app, ["aliases", "rm", "cli-router", "--key", env.bob_id, *where]).exit_code == 2
    assert run(app, ["aliases", "rm", "cli-router", "--key", env.alice_id, *where]).exit_code == 0
    assert _api(env.alice, "GET", "/cli-router").status_code == 404


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_table_on_both_databases(db, request, tmp_path):
    url = request.getfixturevalue("postgres_url") if db == "postgresql" else None
    table = AliasTable(Store(tmp_path / "data", url))
    try:
        for row in table.list(None):  # the session's PostgreSQL is shared between tests
            table.delete(row.owner, row.name)
        table.set("key_a", "r", "m1")
        table.set("key_a", "r", "m2")
        table.set("key_b", "r", "other")
        assert [(a.owner, a.model, a.previous_model) for a in table.list("key_a")] == [("key_a", "m2", "m1")]
        assert table.find("key_b", "r").model == "other" and table.find("key_c", "r") is None
        table.delete("key_a", "r")
        assert [a.owner for a in table.list(None)] == ["key_b"]
    finally:
        table.store.close()
