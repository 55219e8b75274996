"""The rules of the code base hold: import contracts (pyproject.toml [tool.importlinter]: lower layers
never reach up), size limits, mypy over the plain-data packages, and ruff."""

from __future__ import annotations

import os
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


@pytest.mark.slow  # heavy for the developer loop: mypy over the package, cold
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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT / "src").with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_tunery_module(name: str) -> bool:
    where = ROOT / "src" / Path(*name.split("."))
    return name.startswith("tunery.") and (
        where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()
    )


def _function_local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for each import inside a function of the module at `path`; a relative
    import is resolved to its absolute name."""
    import ast

    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - child.level + 1] if child.level else []
                module = ".".join([*base, *([child.module] if child.module else [])])
                # `from tunery.train import setup` imports the module tunery.train.setup
                subs = [f"{module}.{a.name}" for a in child.names if _is_tunery_module(f"{module}.{a.name}")]
                found.extend((child.lineno, name) for name in subs or [module])
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(path.read_text()), False)
    return found


def _unlisted_local_imports() -> tuple[list[str], set[tuple[str, str]]]:
    """(function-local imports tunery/optional.py does not allow, as text; the exceptions in use)."""
    from tunery.optional import exception_for, is_cli_module, is_lazy

    bad, used = [], set()
    for path in sorted((ROOT / "src" / "tunery").rglob("*.py")):
        module = _module_name(path)
        for line, imported in _function_local_imports(path):
            if imported == "tunery" or imported.startswith("tunery."):
                if key := exception_for(module, imported):
                    used.add(key)
                    continue
                if is_cli_module(module):
                    continue
            elif is_lazy(imported):
                continue
            bad.append(f"{path.relative_to(ROOT).as_posix()}:{line} {imported}")
    return bad, used


def test_function_local_imports_are_only_the_listed_ones():
    """Imports sit at the top of their module. Inside a function only: a heavy or optional third-party
    module listed in tunery/optional.py, a `tunery` import in a CLI module (a command imports its
    implementation when it runs), or one of optional.EXCEPTIONS."""
    from tunery.optional import EXCEPTIONS

    bad, used = _unlisted_local_imports()
    assert not bad, "move to the top of its module (or list it in tunery/optional.py):\n" + "\n".join(bad)
    stale = sorted(set(EXCEPTIONS) - used)
    assert not stale, f"tunery/optional.py EXCEPTIONS no longer needed: {stale}"


# Imports each module named on stdin first, in a process forked from one that has imported only the
# heavy third-party modules: a fresh Tunery each time, so an import cycle fails whichever side starts.
_IMPORT_EACH = r"""
import importlib, os, sys, traceback
optional = set(sys.argv[1].split(","))
heavy_modules = (
    "torch", "numpy", "transformers", "transformers.modeling_utils", "peft", "accelerate", "datasets",
    "safetensors.torch", "tokenizers", "fastapi", "starlette", "uvicorn", "httpx", "sqlalchemy",
    "sqlalchemy.orm", "pydantic", "pydantic.v1", "typer", "rich", "rich.console", "rich.table", "yaml",
)
for heavy in heavy_modules:
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
for name in sys.stdin.read().split():
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] in optional:
                print(f"SKIP {name}: {exc.name} is not installed", flush=True)
                os._exit(0)
            traceback.print_exc()
            os._exit(1)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        print(f"FAIL {name}", flush=True)
"""


@pytest.mark.slow  # heavy for the developer loop: a forked import of every module
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="forks a process per module")
def test_every_module_imports_first_on_its_own():
    """`import tunery.x` works for every module as the first Tunery import of a process: a runtime
    import cycle (two modules each needing the other's names at import) fails here. A module whose
    optional dependency (tunery/optional.py OPTIONAL) is not installed is skipped."""
    import sys

    from tunery.optional import OPTIONAL

    names = [_module_name(p) for p in sorted((ROOT / "src" / "tunery").rglob("*.py"))]
    names = [n for n in names if not n.endswith("__main__")]  # `python -m` entry points run a command
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, ",".join(OPTIONAL)],
        input="\n".join(names),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not failed, "\n".join(failed) + "\n" + proc.stderr[-6000:]


def test_xdist_groups_reach_the_scheduler(request):
    """Under `-n` (the README's command) each test's xdist group must be in its node id, the key
    `--dist loadgroup` schedules by; tests/conftest.py adds the marks before pytest-xdist reads them.
    When they came after, every test was its own unit and a module's tests split across workers."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("groups apply only under pytest-xdist (-n)")
    assert request.node.nodeid.endswith(f"@{request.node.path.name}"), request.node.nodeid
