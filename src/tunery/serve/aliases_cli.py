"""`tunery aliases set|list|rm`: the keys' model aliases, straight on the server's data dir/database
(the operator's view, like `tunery keys` and `tunery logs`). A running server sees a switch on its
next request: aliases are read from the database on every request."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import typer
from rich.table import Table

from tunery.errors import TuneryError
from tunery.serve.keys_cli import DatabaseUrl, DataDir
from tunery.terminal import console, user_errors

aliases_app = typer.Typer(help="Model aliases: stable model names apps call.", no_args_is_help=True)
Key = typer.Option(..., "--key", help="The key id (key_…) the alias belongs to.")


def _open(data_dir: Path, database_url: str | None):
    from tunery.jobs.store import Store
    from tunery.serve.alias_store import AliasTable

    return AliasTable(Store(data_dir, database_url))


@aliases_app.command("set")
@user_errors()
def aliases_set(
    name: str = typer.Argument(..., help="The alias, e.g. support-router."),
    model: str = typer.Argument(..., help="What it serves: a builtin model, or an ft: model of the key."),
    key: str = Key,
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Create an alias, or switch it to another model (the old target is kept to switch back)."""
    from tunery.serve.aliases import check_alias
    from tunery.serve.common import Principal
    from tunery.serve.resolver import Resolver

    table = _open(data_dir, database_url)
    try:
        owner = table.store.get_key(key)
        if owner is None:
            raise TuneryError(f"No key {key!r}; list them with `tunery keys list`.")
        # The operator may name local models; the server still applies its own --allow-local-models.
        settings = SimpleNamespace(allow_local_models=True, judges={}, judge_key_envs={})
        who = Principal(owner.id, owner.name, owner.is_admin)
        check_alias(Resolver(settings, table.store), who, name, model)
        row = table.set(owner.id, name, model)
    finally:
        table.store.close()
    was = f" (was {row.previous_model})" if row.previous_model else ""
    console.print(f"{row.name} -> {row.model}{was}", highlight=False)


@aliases_app.command("list")
@user_errors()
def aliases_list(
    key: str | None = typer.Option(None, "--key", help="Only this key's aliases."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """List aliases: key, name, model, and the model it pointed at before."""
    table = _open(data_dir, database_url)
    try:
        rows = table.list(key)
        names = {k.id: k.name for k in table.store.list_keys()}
    finally:
        table.store.close()
    if not rows:
        console.print("No aliases.")
        return
    out = Table()
    for col in ("key", "alias", "model", "previous"):
        out.add_column(col, overflow="fold")
    for r in rows:
        out.add_row(f"{names.get(r.owner, '?')} ({r.owner})", r.name, r.model, r.previous_model or "")
    console.print(out)


@aliases_app.command("rm")
@user_errors()
def aliases_rm(
    name: str = typer.Argument(..., help="The alias to delete."),
    key: str = Key,
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Delete an alias; apps calling it get a 404 from then on."""
    table = _open(data_dir, database_url)
    try:
        table.delete(key, name)
    finally:
        table.store.close()
    console.print(f"Deleted alias {name}.", highlight=False)
