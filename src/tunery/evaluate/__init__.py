"""Evaluation: metrics, evaluation runs, and the eval/compare/chat/generate commands.

Generation itself (the decode loop, the serving engine, loading a model for inference) is
`tunery.generation`, which evaluation shares with GRPO, RLAIF, data synthesis and the server.

    metrics.py   exact match, classification metrics, chrF, ROUGE-L, perplexity
    run.py       evaluate, build_few_shot, compare, forgetting, classification_eval (training hook)
    report.py    rich tables;  cli.py  typer commands, mounted by `tunery.cli` through `register(app)`

Nothing is imported here, so `import tunery.evaluate` stays cheap for the CLI.
"""
