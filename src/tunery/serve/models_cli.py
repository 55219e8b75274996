"""`tunery models list|add|rm|info|pull`: the model registry, straight on the server's data
dir/database (the operator's view, like `tunery keys` and `tunery aliases`). A registered model is
named like a builtin one by every key, in chat, completions, classifications and jobs; a running
server sees a change on its next request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from tunery.serve.keys_cli import DatabaseUrl, DataDir
from tunery.terminal import console, user_errors

models_app = typer.Typer(
    help="The model registry: models registered by name for the CLI and the server.", no_args_is_help=True
)
Name = typer.Argument(..., help="The name requests and jobs use, e.g. qwen-0.5b (no ':' or '/').")
# What `info` estimates each method's peak memory at: one example of this many tokens per step.
INFO_TOKENS = 1024


def _open(data_dir: Path, database_url: str | None):
    from tunery.jobs.store import Store
    from tunery.serve.model_registry import ModelRegistry

    return ModelRegistry(Store(data_dir, database_url))


@models_app.command("add")
@user_errors()
def models_add(
    name: str = Name,
    source: str = typer.Argument(
        ..., help="A Hugging Face directory (safetensors), a .gguf file, or a hub id already pulled."
    ),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Register a model: its files are checked (safetensors only, no custom code) and hashed."""
    registry = _open(data_dir, database_url)
    try:
        row = registry.register(name, source)
    finally:
        registry.store.close()
    _print_added(row)


@models_app.command("pull")
@user_errors()
def models_pull(
    name: str = Name,
    hub_id: str = typer.Argument(..., help="The Hugging Face hub id, org/name."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Download a hub model (config, tokenizer, safetensors; never pickle) and register it."""
    from tunery.models.registry import pull

    registry = _open(data_dir, database_url)
    try:
        registry.check_new(name)  # before a download that may take a while
        pull(hub_id)
        row = registry.register(name, hub_id)
    finally:
        registry.store.close()
    _print_added(row)


@models_app.command("list")
@user_errors()
def models_list(data_dir: Path = DataDir, database_url: str | None = DatabaseUrl) -> None:
    """List registered models: name, architecture, parameters, context, license, source."""
    registry = _open(data_dir, database_url)
    try:
        rows = registry.list()
    finally:
        registry.store.close()
    if not rows:
        console.print("No registered models. Add one with: tunery models add NAME SOURCE")
        return
    out = Table()
    for col in ("name", "architecture", "parameters", "context", "license", "chat template", "source"):
        out.add_column(col, overflow="fold")
    for r in rows:
        out.add_row(
            r.name,
            r.architecture or r.model_type or "?",
            _count(r.parameters),
            str(r.context_length or "?"),
            r.license or "unknown",
            "yes" if r.chat_template else "no",
            r.source,
        )
    console.print(out)


@models_app.command("rm")
@user_errors()
def models_rm(name: str = Name, data_dir: Path = DataDir, database_url: str | None = DatabaseUrl) -> None:
    """Forget a registered model. Its files are never deleted."""
    registry = _open(data_dir, database_url)
    try:
        row = registry.get(name)
        registry.remove(name)
    finally:
        registry.store.close()
    console.print(f"Removed {name} from the registry; {row.source} is untouched.", highlight=False)


@models_app.command("info")
@user_errors()
def models_info(
    name: str = Name,
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
    max_length: int = typer.Option(
        INFO_TOKENS, "--max-length", min=1, help="Tokens per example the memory estimate assumes."
    ),
) -> None:
    """Show a registered model, whether its weights changed since added, and each method's cost."""
    from tunery.models.registry import current_sha256

    registry = _open(data_dir, database_url)
    try:
        row = registry.get(name)
    finally:
        registry.store.close()
    for label, value in _facts(row):
        console.print(f"{label + ':':<16}{value}", highlight=False)
    now = current_sha256(row.source, row.kind)
    if now is None:
        missing = escape(str(row.source))
        console.print(f"[bold red]Weights missing:[/] nothing is at {missing} any more.", highlight=False)
        return
    if now != row.sha256:
        console.print(
            f"[bold red]Weights changed since added:[/] sha256 is now {now}. Check the files, then "
            f"register them again (tunery models rm {name}; tunery models add {name} …).",
            highlight=False,
        )
    else:
        console.print("[green]Weights match the sha256 recorded when added.[/]")
    _print_methods(row.source, min(max_length, row.context_length or max_length))


def _facts(row: Any) -> list[tuple[str, str]]:
    return [
        ("name", row.name),
        ("source", f"{row.source} ({row.kind})"),
        ("architecture", f"{row.architecture or '?'} ({row.model_type or '?'}, {row.model_kind})"),
        ("parameters", f"{_count(row.parameters)} ({row.parameters or '?'})"),
        ("context length", str(row.context_length or "unknown")),
        ("license", row.license or "unknown (not in the model card)"),
        ("chat template", "yes" if row.chat_template else "no (a base model: prompts are plain text)"),
        ("sha256", row.sha256),
    ]


def _print_methods(source: str, tokens: int) -> None:
    """Each method's trainable parameters (`Method.trainable_parameters`, at its default options) and
    `tunery recommend`'s peak-memory estimate for one example of `tokens` tokens per step, in fp32."""
    from tunery.methods import METHODS
    from tunery.train.estimate import trainable_parameters
    from tunery.workflows.recommend import GB, DataFacts, estimate, model_facts, model_shape

    facts = model_facts(source)
    shape = model_shape(facts)
    data = DataFacts(path="", n_examples=1, lengths=[tokens], supervised=[tokens])
    out = Table(title=f"Fine-tuning, one example of {tokens} tokens per step, fp32")
    for col in ("method", "trains", "trainable parameters", "peak memory"):
        out.add_column(col, overflow="fold")
    for method, m in METHODS.items():
        rank = m.options.model_fields.get("r")
        r = int(rank.default) if rank is not None else 8  # the estimate's rank, as the method's own
        trainable, what = trainable_parameters(method, shape, {"r": r})
        peak = estimate(
            facts, data, method=method, precision="fp32", max_length=tokens, batch_size=1, lora_r=r
        )
        share = f" ({100 * trainable / facts.n_params:.3g}%)" if facts.n_params else ""
        out.add_row(method, what, f"{_count(trainable)}{share}", f"{peak.peak_bytes / GB:.2f} GB")
    console.print(out)
    console.print(
        "Estimates from the model's config, made as `tunery recommend` makes them; "
        "qlora's 4-bit weights need a CUDA GPU.",
        highlight=False,
    )


def _print_added(row: Any) -> None:
    console.print(
        f"Registered {row.name}: {row.architecture or row.model_type or '?'}, "
        f"{_count(row.parameters)} parameters, sha256 {row.sha256[:16]}…",
        highlight=False,
    )
    if row.license is None:
        console.print("[yellow]No license found in its model card; check its terms before use.[/]")


def _count(n: int | None) -> str:
    if not n:
        return "?"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
