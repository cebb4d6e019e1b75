"""Running the CLI as a user does, as a subprocess, for the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "decision_router"]


def run(args: list[str], env: dict[str, str], cwd: Path, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, input=input_text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**settings: str) -> dict[str, str]:
    """This process's environment without the developer's DECISION_ROUTER_* settings, plus `settings`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DECISION_ROUTER_")}
    # This checkout's package, not whichever one the environment installed (an editable install
    # points at one checkout: tests run from a git worktree would otherwise run the main one's CLI).
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    # API port 0: each `serve` under test listens on a free port, never on a busy 8080.
    return {**base, "DECISION_ROUTER_LOG_FORMAT": "json", "DECISION_ROUTER_API_PORT": "0", **settings}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
