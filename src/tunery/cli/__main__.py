"""`python -m tunery.cli`: what the jemalloc re-exec and torchrun's ranks run."""

from tunery.cli import main

main()
