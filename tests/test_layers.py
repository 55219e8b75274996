"""The rules of the code base hold: import contracts (pyproject.toml [tool.importlinter]: lower layers
never reach up), size limits, mypy over the plain-data packages, and ruff."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450


def _sizes() -> tuple[list[str], list[str]]:
    """(modules over MAX_MODULE_LINES, functions over MAX_FUNCTION_LINES) of src/tunery, as text."""
    import ast

    modules, functions = [], []
    for path in sorted((ROOT / "src" / "tunery").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            modules.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # the def line to the last line, decorators aside
                if n > MAX_FUNCTION_LINES:
                    functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    return modules, functions


def test_no_module_over_450_lines():
    modules, _ = _sizes()
    assert not modules, "split by concept:\n" + "\n".join(modules)


def test_no_function_over_80_lines():
    _, functions = _sizes()
    assert not functions, "split or simplify:\n" + "\n".join(functions)


def test_mypy_finds_no_errors_in_the_plain_data_packages():
    """config, data, jobs and serve ([tool.mypy] in pyproject.toml) type-check cleanly."""
    exe = shutil.which("mypy")
    if exe is None:
        pytest.fail("mypy is not installed: pip install -e '.[test]'")
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_ruff_finds_nothing_to_fix():
    """`ruff check` and `ruff format --check` over the code, the tests, the benchmarks and the examples."""
    exe = shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    paths = ["src", "tests", "bench", "examples"]
    for args in (["check", *paths], ["format", "--check", *paths]):
        proc = subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
