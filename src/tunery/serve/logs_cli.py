"""`tunery logs list|show|rate|export`: the stored chat completions, straight on the server's data
dir/database (the operator's view: every key's rows, each shown with the key that made it).

The server writes these rows (`store: true`, or `tunery serve --store always`); this command only
reads them, records ratings and writes exports, so it is safe to run beside a live server.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tunery.errors import TuneryError
from tunery.serve.keys_cli import DatabaseUrl, DataDir
from tunery.terminal import console, user_errors

logs_app = typer.Typer(help="Stored chat completions and their ratings.", no_args_is_help=True)

Model = typer.Option(None, "--model", "-m", help="Only completions of this model.")
Key = typer.Option(None, "--key", help="Only completions made with this key id (key_…).")
Rated = typer.Option(
    None, "--rated/--unrated", help="Only rated (or only unrated) completions.", show_default=False
)


def _open(data_dir: Path, database_url: str | None):
    from tunery.jobs.store import Store
    from tunery.serve.completions_store import CompletionLog

    return CompletionLog(Store(data_dir, database_url))


def _preview(text: Any, width: int = 48) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _last_user(row: Any) -> str:
    for m in reversed(row.request.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    return ""


@logs_app.command("list")
@user_errors()
def logs_list(
    model: str | None = Model,
    key: str | None = Key,
    rated: bool | None = Rated,
    limit: int = typer.Option(20, min=1, max=1000, help="How many, newest first."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """List stored chat completions, newest first, with their rating."""
    from tunery.serve.completions_store import Query, rating_value

    logs = _open(data_dir, database_url)
    try:
        rows, more = logs.page(Query(key, model=model, rated=rated), limit=limit, order="desc")
        feedback = logs.feedback([r.id for r in rows])
        names = {k.id: k.name for k in logs.store.list_keys()}
    finally:
        logs.store.close()
    if not rows:
        console.print("No stored chat completions match.")
        return
    table = Table()
    table.add_column("id", no_wrap=True)  # copied into `show` and `rate`: never split or cut
    for name in ("created", "key", "model", "rating", "prompt", "reply"):
        table.add_column(name)
    for r in rows:
        fb = feedback.get(r.id)
        reply = (r.response.get("choices") or [{}])[0].get("message", {}).get("content")
        table.add_row(
            r.id,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)),
            names.get(r.owner, r.owner),
            _preview(r.model, 32),
            str(rating_value(fb.rating)) if fb else "",
            _preview(_last_user(r)),
            _preview(reply),
        )
    console.print(table)
    if more:
        console.print(f"[dim]More than {limit}; raise --limit or filter.[/]")


@logs_app.command("show")
@user_errors()
def logs_show(
    completion_id: str = typer.Argument(..., help="A stored completion's id (chatcmpl-…)."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Print one stored completion as JSON: request, response, metadata, latency and feedback."""
    from tunery.serve.completions_store import record

    logs = _open(data_dir, database_url)
    try:
        row = logs.get(None, completion_id)
        out = record(row, logs.feedback([row.id]).get(row.id))
    finally:
        logs.store.close()
    typer.echo(json.dumps(out, indent=2, ensure_ascii=False))  # plain JSON: for jq as much as for eyes


def _parse_rating(value: str) -> str | int:
    from tunery.serve.completions_store import RATINGS

    rating: str | int = int(value) if value.isdigit() else value.lower()
    if rating not in RATINGS:
        raise TuneryError(f"--rating must be up, down or a score from 1 to 5, not {value!r}.")
    return rating


@logs_app.command("rate")
@user_errors()
def logs_rate(
    completion_id: str = typer.Argument(..., help="A stored completion's id (chatcmpl-…)."),
    rating: str = typer.Option(..., "--rating", "-r", help="up, down, or a score from 1 to 5."),
    corrected: str | None = typer.Option(None, "--corrected", help="The reply it should have given."),
    note: str | None = typer.Option(None, "--note", help="Why, for whoever reads the logs next."),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Rate a stored completion (replacing an earlier rating), optionally with a corrected reply."""
    logs = _open(data_dir, database_url)
    try:
        logs.rate(None, completion_id, _parse_rating(rating), corrected, note)
    finally:
        logs.store.close()
    console.print(f"Rated {completion_id}: {rating}", highlight=False)


@logs_app.command("export")
@user_errors()
def logs_export(
    out: Path = typer.Option(..., "--out", "-o", help="The JSONL file to write."),
    model: str | None = Model,
    key: str | None = Key,
    rated: bool | None = Rated,
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Write stored completions as JSONL, oldest first: one line per completion, with its request,
    response, metadata, latency and feedback."""
    from tunery.serve.completions_store import Query, record

    logs = _open(data_dir, database_url)
    tmp = out.with_name(f".{out.name}.tmp")
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row, fb in logs.iterate(Query(key, model=model, rated=rated)):
                f.write(json.dumps(record(row, fb), ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)  # a reader never sees half a file
    finally:
        tmp.unlink(missing_ok=True)
        logs.store.close()
    console.print(f"Exported {count} stored completion(s) to {out}", highlight=False)


MAX_DATASET_ROWS = 200_000  # stored completions one build reads into memory


def metadata_pairs(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise TuneryError(f"--metadata takes KEY=VALUE, not {value!r}.")
        pairs[key] = val
    return pairs


RelabelWith = typer.Option(
    None,
    "--relabel-with",
    help="A stronger model (M, M:ADAPTER_DIR or a saved model dir; with --relabel-url, the endpoint's "
    "model name) that rewrites the train replies no reviewer corrected (SFT; the test slice stays "
    "as reviewed).",
)
RelabelUrl = typer.Option(
    None, "--relabel-url", help="An OpenAI-compatible endpoint (…/v1) serving --relabel-with."
)
RelabelKeyEnv = typer.Option(
    "OPENAI_API_KEY", "--relabel-api-key-env", help="Env var holding --relabel-url's key."
)
JudgeMinScore = typer.Option(
    None,
    "--judge-min-score",
    help="Drop a relabeled reply the judge (as in `tunery data judge`) scores below this.",
)
JudgeModel = typer.Option(
    None,
    "--judge-model",
    help="The judge: a local model, or with --judge-url the endpoint's model (default: the relabeler).",
)
JudgeUrl = typer.Option(None, "--judge-url", help="An OpenAI-compatible endpoint (…/v1) of the judge.")
JudgeKeyEnv = typer.Option("OPENAI_API_KEY", "--judge-api-key-env", help="Env var holding --judge-url's key.")
JudgeTemplate = typer.Option(
    None, "--judge-template", help="Judge prompt template file with {prompt} and {completion}."
)
JudgeMaxScore = typer.Option(10.0, "--judge-max-score", help="The judge template's top score.")


@user_errors()
def from_logs_command(
    output: Path = typer.Option(
        ..., "--output", "-o", help="The train .jsonl; the test slice goes beside it."
    ),
    shape: str = typer.Option("sft", "--shape", help="sft, dpo or kto."),
    rating: str = typer.Option(
        "rated", "--rating", help="up (accepted or corrected), down, rated, or any (unrated too)."
    ),
    model: str | None = Model,
    metadata: list[str] = typer.Option([], "--metadata", help="KEY=VALUE; repeat to require several."),
    since: str | None = typer.Option(None, "--since", help="Created on or after (ISO date, UTC)."),
    until: str | None = typer.Option(None, "--until", help="Created up to (ISO date: that whole day)."),
    key: str | None = Key,
    test_fraction: float = typer.Option(
        0.1, "--test-fraction", help="The most recent share of examples, held out as the test slice."
    ),
    relabel_with: str | None = RelabelWith,
    relabel_max_tokens: int = typer.Option(
        256, "--relabel-max-tokens", min=1, help="Longest rewritten reply."
    ),
    relabel_url: str | None = RelabelUrl,
    relabel_key_env: str = RelabelKeyEnv,
    judge_min_score: float | None = JudgeMinScore,
    judge_model: str | None = JudgeModel,
    judge_url: str | None = JudgeUrl,
    judge_key_env: str = JudgeKeyEnv,
    judge_template: Path | None = JudgeTemplate,
    judge_max_score: float = JudgeMaxScore,
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Build a validated training file from stored chat completions and their ratings.

    Writes OUTPUT (train) and OUTPUT with `.test` before the suffix (the most recent examples), and
    reports what it kept and dropped."""
    from tunery.data import from_logs
    from tunery.serve.completions_store import Query

    from_logs.check_options(shape, rating, test_fraction)
    relabeler = (relabel_with, relabel_url, relabel_key_env, relabel_max_tokens)
    judged = (judge_model, judge_url, judge_key_env, judge_template, judge_max_score)
    judge = _judge_options(relabeler, judge_min_score, *judged)
    query = Query(
        key,
        model=model,
        metadata=metadata_pairs(metadata) or None,
        since=from_logs.parse_time(since, "--since"),
        until=from_logs.parse_time(until, "--until", end=True),
    )
    logs = _open(data_dir, database_url)
    try:
        records = logs.records(query, MAX_DATASET_ROWS)
    finally:
        logs.store.close()
    built = from_logs.build(records, shape, rating, test_fraction)
    if relabel_with:
        _relabel(built, relabeler, judge, judge_min_score)
    for line in from_logs.report_lines(built.report):
        console.print(line, highlight=False)
    for path in from_logs.write(built, output):
        console.print(f"Wrote {path}", highlight=False)


def _judge_options(
    relabeler: tuple,
    min_score: float | None,
    model: str | None,
    url: str | None,
    key_env: str,
    template: Path | None,
    max_score: float,
) -> Any:
    """The judge of `--judge-min-score` as `JudgeOptions`, or None when no filter was asked for. With
    neither --judge-model nor --judge-url it is the relabeler itself (as `tunery data synth
    --min-judge-score` asks its teacher)."""
    from tunery.objectives.judge import JudgeOptions

    if min_score is None:
        if model or url:
            raise TuneryError(
                "--judge-model and --judge-url need --judge-min-score.", param="judge_min_score"
            )
        return None
    name, relabel_url, relabel_key_env, _ = relabeler
    if not name:
        raise TuneryError(
            "--judge-min-score filters relabeled replies; it needs --relabel-with.", param="judge_min_score"
        )
    if not (model or url):
        model, url, key_env = name, relabel_url, relabel_key_env
    common = {"template": str(template) if template else None, "max_score": max_score}
    if url:
        return JudgeOptions(base_url=url, model_name=model or name, api_key_env=key_env, **common)
    from tunery.evaluate.cli import _parse_model_arg

    spec, adapter = _parse_model_arg(model or name)
    return JudgeOptions(model=spec, adapter=adapter, **common)


def _relabel(built: Any, relabeler: tuple, judge: Any, min_score: float | None) -> None:
    """Rewrite the train replies no reviewer wrote, then let the judge drop the poor rewrites."""
    from tunery.data import from_logs
    from tunery.workflows import relabel

    name, url, key_env, max_tokens = relabeler
    if judge is not None:
        if min_score is None:  # _judge_options builds a judge only with a minimum score
            raise TuneryError("A judge needs --judge-min-score.", param="judge_min_score")
        relabel.check_min_score(min_score, judge.max_score)
    if built.report.shape != "sft":  # before loading any model
        raise TuneryError("--relabel-with applies to --shape sft only.", param="relabel_with")
    if url:
        reply = relabel.endpoint_reply(url, name, relabel.env_key(key_env), max_tokens)
    else:
        with console.status(f"Loading {name}…"):
            reply = relabel.local_reply(name, max_tokens)
    with console.status("Relabeling…"):
        rows = from_logs.relabel(built, reply)
    if judge is None or min_score is None:
        return
    from tunery.objectives.judge import Judge

    with console.status("Judging the relabeled replies…"):
        scorer = Judge(judge)
        from_logs.judge_relabeled(built, rows, scorer.score, min_score, judge.max_score)


def _contender(name: str, key: str | None, data_dir: Path, database_url: str | None) -> Any:
    """What `name` loads: an `ft:` model (of `--key`, else of whichever key owns it), or anything
    `tunery compare` takes (an alias, a path, M:ADAPTER_DIR, a run or model dir)."""
    from tunery.evaluate.cli import _parse_model_arg
    from tunery.evaluate.heldout import Contender
    from tunery.jobs.store import Store

    if not name.startswith("ft:"):
        return Contender(name, *_parse_model_arg(name))
    store = Store(data_dir, database_url)
    try:
        owner = key or store.model_owner(name)
        found = store.find_model(owner, name) if owner else None
        if found is None:
            raise TuneryError(
                f"No fine-tuned model {name!r} in {data_dir}" + (f" for key {key}." if key else "."),
                hint="List them with `GET /v1/models`; pass --data-dir (or --database-url) of the server.",
            )
        return Contender(name, found[0], str(store.path(found[1])))
    finally:
        store.close()


@logs_app.command("compare")
@user_errors()
def logs_compare(
    old: str = typer.Argument(..., help="The model serving now: an alias, ft: name, path or run dir."),
    new: str = typer.Argument(..., help="The model to compare it with (same forms)."),
    data: list[Path] = typer.Option(
        ...,
        "--data",
        help="The held-out slice: the OUTPUT.test.jsonl `tunery data from-logs` wrote. Repeat it for "
        "several tasks (each file is one; a row's `task` field wins).",
    ),
    sample_size: int | None = typer.Option(
        None, "--sample", min=1, help="Compare on this many examples (a fixed-seed sample)."
    ),
    key: str | None = typer.Option(None, "--key", help="The key id (key_…) owning the ft: models."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Default: from the references."
    ),
    labels: str | None = typer.Option(
        None, "--labels", help="Comma-separated label set (default: detected)."
    ),
    output: Path | None = typer.Option(
        None, "--output", help="Also write the comparison as JSON to this file ('-': stdout, no table)."
    ),
    data_dir: Path = DataDir,
    database_url: str | None = DatabaseUrl,
) -> None:
    """Old model against new on the held-out slice of the logs: exact match, classification
    metrics when the replies are labels, latency and prompt tokens per model."""
    from tunery.evaluate.heldout import compare_on_heldout, load_heldout, render_heldout, sample
    from tunery.generation.engine import Engine

    examples, skipped = load_heldout(data)
    total = len(examples)
    examples = sample(examples, sample_size)
    contenders = [_contender(n, key, data_dir, database_url) for n in (old, new)]
    if contenders[0].label == contenders[1].label:
        raise TuneryError("OLD and NEW are the same model; name two different ones.")
    wanted = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    engine = Engine()
    try:
        with console.status(f"Generating {len(examples)} replies per model…"):
            result = compare_on_heldout(
                engine, contenders, examples, max_new_tokens=max_new_tokens, labels=wanted
            )
    finally:
        engine.close()
    result["skipped"] = skipped
    if len(examples) < total:
        result["sampled_from"] = total
    text = json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    if output is not None and str(output) == "-":
        typer.echo(text, nl=False)
        return
    console.print(render_heldout(result))
    if skipped:
        console.print(f"[dim]{skipped} example(s) without a reference reply were skipped.[/]")
    if output is not None:
        output.write_text(text, encoding="utf-8")
        console.print(f"Wrote {output}", highlight=False)
