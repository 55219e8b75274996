"""Workflows built on the one training and evaluation path: `tunery quickstart`, `tunery sweep`,
`tunery recommend`.

    quickstart.py  evaluate smollm2-135m on sentiment, fine-tune LoRA, evaluate again
    sweep.py       many trainings of one config (data scaling, grids, Optuna), each evaluated
    recommend.py   method, batch size, precision and length for a model, data and memory budget
    cli.py         their typer commands, mounted by `tunery.cli` through `register(app)`
"""
