"""`tunery keys create|list|revoke|rotate`: the server's API keys, straight on its data dir/database.

A running server sees a revocation or rotation at once (the store's key stamp drops its key cache),
so a leaked key can be killed without a restart. Keys are stored hashed: `create` and `rotate` print
the new key alone on their last line, the only time it is shown.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from tunery.errors import TuneryError

DEFAULT_DATA_DIR = os.environ.get("TUNERY_DATA_DIR") or str(Path.home() / ".tunery")

keys_app = typer.Typer(help="Manage the server's API keys.", no_args_is_help=True)

DataDir = typer.Option(DEFAULT_DATA_DIR, "--data-dir", help="The server's data dir.")
DatabaseUrl = typer.Option(None, "--database-url", envvar="TUNERY_DATABASE_URL", help="Its database URL.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _open(data_dir: Path, database_url: str | None):
    from tunery.jobs.store import Store

    try:
        return Store(data_dir, database_url)
    except TuneryError as exc:
        _fail(str(exc))


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Who the key is for; part of its fine-tuned model names."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
    admin: bool = typer.Option(False, help="Give the key admin rights."),
) -> None:
    """Create an API key; the key is printed alone on the last line (it is stored only hashed)."""
    store = _open(data_dir, database_url)
    try:
        row, key = store.create_key(name, admin=admin)
    finally:
        store.close()
    typer.echo(f"Created key {row.id} for {name!r}. Store it now: it is not shown again.", err=True)
    typer.echo(key)


@keys_app.command("list")
def keys_list(data_dir: Path = DataDir, database_url: str | None = DatabaseUrl) -> None:
    """List keys: id, name, prefix, admin, revoked (never the key)."""
    store = _open(data_dir, database_url)
    try:
        rows = store.list_keys()
    finally:
        store.close()
    for row in rows:
        revoked = f"revoked {row.revoked_at}" if row.revoked_at else ""
        typer.echo(f"{row.id}\t{row.name}\t{row.prefix}…\t{'admin' if row.is_admin else ''}\t{revoked}")


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="The key's id (key_…), as `tunery keys list` shows it."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Revoke a key for good; a running server refuses it from its next request on."""
    store = _open(data_dir, database_url)
    try:
        row = store.revoke_key(key_id)
    except TuneryError as exc:
        _fail(str(exc))
    finally:
        store.close()
    typer.echo(f"Revoked key {row.id} ({row.name!r}).")


@keys_app.command("rotate")
def keys_rotate(
    key_id: str = typer.Argument(..., help="The key's id (key_…), as `tunery keys list` shows it."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Give a key a new secret (same id, same files and models); the old one stops working at once.
    The new key is printed alone on the last line."""
    store = _open(data_dir, database_url)
    try:
        row, key = store.rotate_key(key_id)
    except TuneryError as exc:
        _fail(str(exc))
    finally:
        store.close()
    typer.echo(
        f"Rotated key {row.id} ({row.name!r}). Store the new key now: it is not shown again.", err=True
    )
    typer.echo(key)
