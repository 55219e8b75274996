"""`tunery classify`: label texts with a trained classification head (evaluate/classify.py), mounted
by `tunery/cli/__init__.py`. The heads' code imports torch, so the command imports it when it runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tunery.errors import DataError
from tunery.terminal import console, user_errors


def read_texts(path: Path) -> list[str]:
    """Texts of a JSONL (`text`, or chat `messages`: the last user message) or a plain-text file."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix not in {".jsonl", ".json"}:
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise DataError("Not valid JSON.", file=str(path), line=n) from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            texts.append(rec["text"])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            users = [
                m.get("content") for m in rec["messages"] if isinstance(m, dict) and m.get("role") == "user"
            ]
            if not users:
                raise DataError("No user message to classify.", file=str(path), line=n, field="messages")
            texts.append(str(users[-1] or ""))
        else:
            raise DataError(
                "Expected a 'text' string or chat 'messages'.", file=str(path), line=n, field="text"
            )
    return texts


@user_errors()
def classify_command(
    model: str | None = typer.Option(None, "--model", help="Base model (default: the adapter's base)."),
    adapter: str | None = typer.Option(None, "--adapter", help="Saved model dir of a classify run."),
    input: Path = typer.Option(
        ..., "--input", help="JSONL with 'text' (or chat) rows, or one text per line."
    ),
    output: Path | None = typer.Option(None, "--output", help="Write JSONL here (default: stdout)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
) -> None:
    """Label each text with a classification head; writes {text, label, probabilities} per line."""
    from tunery.evaluate.classify import load_classifier, predict_proba, prediction_row

    clf, tok, info = load_classifier(model, adapter)
    texts = read_texts(input)
    probs = predict_proba(clf, tok, texts, multi_label=bool(info["multi_label"]), batch_size=batch_size)
    rows = [prediction_row(t, p, info) for t, p in zip(texts, probs, strict=True)]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output is None:
        typer.echo(body, nl=False)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(body, encoding="utf-8")
        console.print(f"Wrote {len(rows)} labels to [bold]{output}[/]")


def register(app: typer.Typer) -> None:
    """Mount `tunery classify` on the main app."""
    app.command("classify")(classify_command)
