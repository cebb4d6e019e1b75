"""The `decision-router` console script. The CLI's imports take about half a second (FastAPI,
SQLAlchemy, pydantic); a Ctrl-C meanwhile would print Python's traceback, so this module, which
imports nothing heavy, catches it: exit 130 with one line, as a Ctrl-C during a command."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from decision_router.cli import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    run_cli()
