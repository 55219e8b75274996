"""Evaluation and inference: the one generation path, metrics, and the eval/compare/chat/generate commands.

    generate.py  GenerationParams, generate_batch, stream, chat_prompt   (the decode loop everyone uses)
    engine.py    Engine: loaded bases + LRU of adapters, batching worker (server, `tunery chat`)
    metrics.py   exact match, classification metrics, chrF, ROUGE-L, perplexity
    run.py       evaluate, build_few_shot, compare, forgetting, classification_eval (training hook)
    report.py    rich tables;  cli.py  typer commands, mounted by `tunery.cli` through `register(app)`

Nothing is imported here, so `import tunery.evaluate` stays cheap for the CLI.
"""
