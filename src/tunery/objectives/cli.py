"""Typer commands of the objectives: `tunery score` (a reward model scores completions) and
`tunery data judge` (a judge model turns prompts + candidate generations into preference pairs).

The main CLI mounts them: `register(app)` adds `score`; `tunery/cli/data.py` mounts `judge_command`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from tunery.errors import DataError
from tunery.terminal import console, user_errors


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@user_errors()
def score_command(
    adapter: str = typer.Option(..., "--adapter", help="The reward model: a `reward` run's model/ dir."),
    input: Path = typer.Option(..., "--input", help="Chat conversations or preference pairs (JSONL, ...)."),
    model: str | None = typer.Option(
        None, "--model", help="Base model (default: the one it was trained on)."
    ),
    output: Path | None = typer.Option(None, "--output", help="Write each example with its score(s) here."),
) -> None:
    """Score completions with a reward model: each conversation's last assistant reply, or both
    replies of each preference pair (and how often the chosen one wins)."""
    import torch

    from tunery.data import load_dataset
    from tunery.data.types import PreferencePair
    from tunery.objectives.reward import load_reward_model, score_conversations

    dataset = load_dataset(input)
    if dataset.kind not in ("chat", "preference"):
        raise DataError(
            f"tunery score reads chat conversations or preference pairs, not {dataset.kind} data.",
            file=str(input),
        )
    with console.status(f"Loading {adapter}…"):
        rm, tokenizer = load_reward_model(adapter, model, dtype=torch.float32)
    rows: list[dict[str, Any]] = []
    if dataset.examples and isinstance(dataset.examples[0], PreferencePair):
        pairs = dataset.examples
        chosen = score_conversations(rm, tokenizer, [p.prompt + p.chosen for p in pairs])
        rejected = score_conversations(rm, tokenizer, [p.prompt + p.rejected for p in pairs])
        for p, c, r in zip(pairs, chosen, rejected, strict=True):
            rows.append({"line": p.line, "chosen_score": c, "rejected_score": r, "margin": c - r})
        wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
        console.print(
            f"Chosen scored above rejected in {wins}/{len(pairs)} pairs ({wins / max(1, len(pairs)):.1%})."
        )
    else:
        convs = dataset.examples
        scores = score_conversations(rm, tokenizer, [c.messages for c in convs])
        rows = [{"line": c.line, "score": s} for c, s in zip(convs, scores, strict=True)]
        mean = sum(scores) / max(1, len(scores))
        console.print(f"Scored {len(scores)} conversations; mean score {mean:.4f}.")
    if output is not None:
        _write_jsonl(output, rows)
        console.print(f"Wrote scores to [bold]{output}[/]")
    else:
        for row in rows[:20]:
            console.print(json.dumps(row))


def read_candidates(path: Path) -> list[tuple[int, list[dict[str, Any]], list[str]]]:
    """(line, prompt messages, candidate replies) of each `{"prompt", "completions"}` JSONL row;
    `prompt` is a string or a message list, `completions` (or `candidates`) a list of strings."""
    if not path.is_file():
        raise DataError("File not found.", file=str(path))
    out = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"Not valid JSON: {exc.msg}.", file=str(path), line=line_no) from None
        prompt = rec.get("prompt") if isinstance(rec, dict) else None
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not all(isinstance(m, dict) and "role" in m for m in prompt):
            raise DataError(
                "'prompt' must be a string or a list of messages.",
                file=str(path),
                line=line_no,
                field="prompt",
            )
        key = "completions" if "completions" in rec else "candidates"
        cands = rec.get(key)
        if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) for c in cands):
            raise DataError(
                f"'{key}' must list at least two candidate replies (strings).",
                file=str(path),
                line=line_no,
                field=key,
            )
        out.append((line_no, prompt, cands))
    return out


def judge_pairs(
    judge: Any, rows: list[tuple[int, list[dict[str, Any]], list[str]]]
) -> tuple[list[dict], int]:
    """OpenAI-format preference pairs (best vs worst candidate per prompt) and how many ties were skipped."""
    pairs, ties = [], 0
    for _line, prompt, cands in rows:
        scores = judge.score([prompt] * len(cands), cands)
        best = max(range(len(cands)), key=lambda i: scores[i])
        worst = min(range(len(cands)), key=lambda i: scores[i])
        if scores[best] == scores[worst]:
            ties += 1  # the judge has no preference: no pair to learn from
            continue
        pairs.append(
            {
                "input": {"messages": prompt},
                "preferred_output": [{"role": "assistant", "content": cands[best]}],
                "non_preferred_output": [{"role": "assistant", "content": cands[worst]}],
                "scores": {"preferred": scores[best], "non_preferred": scores[worst]},
            }
        )
    return pairs, ties


@user_errors()
def judge_command(
    input: Path = typer.Argument(..., help='JSONL of {"prompt": ..., "completions": [...]} rows.'),
    output: Path = typer.Option(..., "--output", help="Preference JSONL to write (OpenAI DPO format)."),
    judge_model: str | None = typer.Option(None, "--judge-model", help="Local judge model (spec)."),
    judge_adapter: str | None = typer.Option(None, "--judge-adapter", help="Adapter on the local judge."),
    base_url: str | None = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint of the judge."),
    model_name: str | None = typer.Option(None, "--judge-name", help="The endpoint's judge model name."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Env var with the endpoint key."),
    template: Path | None = typer.Option(
        None, "--template", help="Judge prompt template file with {prompt} and {completion}."
    ),
    max_score: float = typer.Option(10.0, "--max-score", help="The template's top score."),
    show_template: bool = typer.Option(False, "--show-template", help="Print the default template and exit."),
) -> None:
    """Label preference pairs with a judge: for each prompt, the best- and worst-scored candidates."""
    from tunery.objectives.judge import DEFAULT_JUDGE_TEMPLATE, Judge, JudgeOptions

    if show_template:
        console.print(DEFAULT_JUDGE_TEMPLATE, markup=False, highlight=False)
        raise typer.Exit(0)
    rows = read_candidates(input)
    options = JudgeOptions(
        model=judge_model,
        adapter=judge_adapter,
        base_url=base_url,
        model_name=model_name,
        api_key_env=api_key_env,
        template=str(template) if template else None,
        max_score=max_score,
    )
    with console.status("Loading the judge…"):
        judge = Judge(options)
    pairs, ties = judge_pairs(judge, rows)
    _write_jsonl(output, pairs)
    console.print(
        f"Wrote {len(pairs)} preference pairs to [bold]{output}[/]"
        + (f"; skipped {ties} prompt(s) the judge scored all candidates equal" if ties else "")
        + (f"; {judge.unparsed} judge replies had no score" if judge.unparsed else "")
    )


def register(app: typer.Typer) -> None:
    """Mount `tunery score` on the main app."""
    app.command("score")(score_command)
