"""Evaluation: metrics, evaluation runs, and the eval/compare/chat/generate commands.

Generation itself (the decode loop, the serving engine, loading a model for inference) is
`tunery.generation`, which evaluation shares with GRPO, RLAIF, data synthesis and the server.

    metrics.py   exact match, classification metrics, chrF, ROUGE-L, perplexity
    run.py       evaluate, build_few_shot, compare, forgetting, classification_eval (training hook)
    scoring.py   replies against references, overall and per task (run.py and heldout.py share it)
    heldout.py   old model against new on the held-out slice of the logs
    classify.py  classification heads: load, predict, evaluate with calibration
    report.py    rich tables;  cli.py, classify_cli.py  typer commands, mounted by `tunery.cli`

Nothing is imported here, so `import tunery.evaluate` stays cheap for the CLI.
"""
