"""`tunery export`: the typer command, mounted by `tunery/cli/__init__.py`. It lives here, not in
`export/`, because importing `tunery.export` imports torch (through `tunery.methods`): the command
imports it when it runs, so `tunery --help` stays fast."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape

from tunery.terminal import console, user_errors


@user_errors()
def export_command(
    model: str | None = typer.Option(
        None,
        "--model",
        help="Base model (default: the adapter's base). For --format adapter: the "
        "base name written into adapter_config.json (e.g. the hub id your server loads).",
    ),
    adapter: str | None = typer.Option(None, "--adapter", help="Saved model/adapter dir, or a run dir."),
    format: str = typer.Option(..., "--format", help="hf (merged safetensors) | gguf | adapter (PEFT)."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    dtype: str | None = typer.Option(
        None,
        "--dtype",
        help="f32 | f16 | bf16. hf: weight type (default: the base's). gguf: tensor "
        "type (default f16), or with --quant the type of tensors that cannot be quantized.",
    ),
    quant: str | None = typer.Option(None, "--quant", help="GGUF type: q8_0, q4_0, q4_1, q5_0, q5_1."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="hf: split weights above this."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
) -> None:
    """Export a fine-tuned model: merged HF safetensors, GGUF (+ Ollama Modelfile) or a PEFT adapter."""
    from tunery.export import export

    with console.status(f"Exporting {adapter or model} as {format}…"):
        path = export(model, adapter, format, out, dtype, quant, max_shard_size=max_shard_size, force=force)
    console.print(f"[green]Exported[/] to [bold]{escape(str(path))}[/]:")
    for f in sorted(path.iterdir()):
        console.print(f"  {f.name}  [dim]{f.stat().st_size / 1e6:.2f} MB[/]")
    if format == "adapter":
        from tunery.export.vllm import vllm_issues

        for issue in vllm_issues(json.loads((path / "adapter_config.json").read_text())):
            console.print(f"[yellow]vLLM:[/] {escape(issue)}")
    console.print(f"See {path / 'README.md'} for how to load it.")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
