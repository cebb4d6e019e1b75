"""Every module of the package imports on its own, in a fresh interpreter.

An import cycle passes unnoticed while some other import happens to run first: cli_stats imported cli,
which imported cli_stats back before it was defined, so `import decision_router.cli_stats` (and a test
file importing it first) failed with ImportError, while the CLI itself worked.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import decision_router

ROOT = Path(__file__).resolve().parents[2]

# One new interpreter imports the third-party packages, none of ours, then forks a child per module: each
# child starts with no module of the package loaded, as a fresh interpreter would, and pays only for the
# package's own imports, as many at a time as there are cores (an interpreter per module took ~50 s on a
# loaded machine).
CHECK = r"""
import importlib, os, sys, traceback
for name in ("sqlalchemy", "sqlmodel", "pydantic", "typer", "rich", "redis", "fastapi", "starlette", "structlog",
             "yaml", "faststream", "httpx", "uvicorn", "psycopg", "orjson", "jinja2", "fakeredis", "prometheus_client"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
loaded = [m for m in sys.modules if m == "decision_router" or m.startswith("decision_router.")]
if loaded:
    sys.exit(f"the check's parent loaded {loaded}: the children would not start fresh")
failed, running, modules = 0, 0, sys.argv[1:]
while modules or running:
    if modules and running < (os.cpu_count() or 2):
        module = modules.pop()
        sys.stdout.flush()
        if os.fork() == 0:
            try:
                importlib.import_module(module)
            except BaseException as exc:  # SystemExit too: a module that runs something when imported
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                print(f"{module}: {last}", flush=True)
                os._exit(1)
            os._exit(0)
        running += 1
        continue
    _, status = os.wait()
    running -= 1
    failed += status != 0
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(decision_router.__path__, "decision_router."))


def test_every_module_is_listed() -> None:
    # walk_packages finds the subpackages' modules too: a broken listing would make the test below vacuous.
    modules = _modules()
    assert {"decision_router.cli", "decision_router.cli_stats", "decision_router.rules.load",
            "decision_router.api.app", "decision_router.__main__"} <= set(modules)


def test_every_module_imports_on_its_own() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK, *_modules()], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
