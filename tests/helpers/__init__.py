"""Test helpers: tiny random models and tokenizers (`tiny`), a real `tunery serve` process (`server`).

They live with the tests, not in the package; the benchmarks and examples/flywheel import them from a
checkout of the repository.
"""
