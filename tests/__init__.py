"""Tunery's tests. A package, so `tests.helpers` imports the same way here, in bench/ and in examples/."""
