"""Every module of the package imports on its own, in a fresh interpreter.

An import cycle passes unnoticed while some other import happens to run first: cli_stats imported cli,
which imported cli_stats back before it was defined, so `import decision_router.cli_stats` (and a test
file importing it first) failed with ImportError, while the CLI itself worked.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import decision_router

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(decision_router.__path__, "decision_router."))


def _import_alone(module: str) -> str | None:
    """None when `import module` exits 0 in a new interpreter, else its last line of error."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return f"{module}: exit {done.returncode}: {lines[-1] if lines else '(no output)'}"


def test_every_module_is_listed() -> None:
    # walk_packages finds the subpackages' modules too: a broken listing would make the test below vacuous.
    modules = _modules()
    assert {"decision_router.cli", "decision_router.cli_stats", "decision_router.rules.load",
            "decision_router.api.app", "decision_router.__main__"} <= set(modules)


def test_every_module_imports_on_its_own() -> None:
    # One interpreter per module (each pays its imports again), a few at a time: ~70 modules.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failed = [problem for problem in pool.map(_import_alone, _modules()) if problem]
    assert not failed, "\n".join(failed)
