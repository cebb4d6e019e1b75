"""`decision-router` starts fast: importing the CLI registers every command but imports none of the heavy modules.

Every command is registered when decision_router.cli is imported (typer needs the signatures), so a
module-level import in cli*.py is paid by every command, even `--help`. The service, the API and the
store are imported in the command that uses them. Checked in a fresh interpreter, as `sys.modules` of
the test process already holds everything the other tests imported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

# Each pulls in a large import tree (or is the root of one); none is needed to parse arguments.
HEAVY = (
    "fastapi",
    "uvicorn",
    "httpx",
    "faststream",
    "redis",
    "sqlalchemy",
    "sqlmodel",
    "structlog",
    "pydantic",
    "rich.progress",
    "asyncio",
    "decision_router.settings",
    "decision_router.contracts",
    "decision_router.simulate",
    "decision_router.monitor",
    "decision_router.notify",
    "decision_router.channels",
    "decision_router.stats",
    "decision_router.store",
    "decision_router.service",
    "decision_router.api",
)

PROBE = """
import json, sys
import decision_router.cli as cli
names = sorted({c.name or c.callback.__name__ for c in cli.app.registered_commands}
               | {g.name for g in cli.app.registered_groups})
print(json.dumps({"modules": sorted(sys.modules), "commands": names}))
"""


def _probe() -> dict[str, list[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout)


def test_importing_the_cli_imports_no_heavy_module() -> None:
    loaded = set(_probe()["modules"])
    imported = sorted(name for name in HEAVY if name in loaded)
    assert not imported, f"imported by `import decision_router.cli`: {imported} (import them in the command)"


def test_importing_the_cli_still_registers_every_command() -> None:
    commands = set(_probe()["commands"])
    expected = {
        "serve", "demo", "publish", "outcome", "health", "audit", "reassign", "simulate", "api", "asyncapi", "bench",
        "rules", "stats", "tokens", "redrive",
    }
    assert expected <= commands, f"not registered: {sorted(expected - commands)}"


def test_help_of_every_command_works_without_the_heavy_modules() -> None:
    """`--help` resolves every signature's annotations (typer) with only what cli*.py import at module level."""
    # pydantic is left out here: typer (0.29+) imports it itself to build the parameters' converters.
    commands = [
        [], ["serve"], ["demo"], ["publish"], ["outcome"], ["health"], ["audit"], ["reassign"], ["simulate"],
        ["api"], ["asyncapi"], ["rules"], ["rules", "check"], ["rules", "test"], ["rules", "replay"], ["stats"],
        ["stats", "quality"], ["stats", "model"], ["stats", "drift"], ["tokens"], ["tokens", "create"],
        ["tokens", "list"], ["tokens", "revoke"], ["redrive"], ["redrive", "deliveries"],
    ]
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from decision_router.cli import app\n"
        f"for args in {commands!r}:\n"
        "    result = CliRunner().invoke(app, [*args, '--help'])\n"
        "    assert result.exit_code == 0, (args, result.output, result.exception)\n"
        "    assert 'Usage' in result.output, (args, result.output)\n"
        f"heavy = [m for m in {[m for m in HEAVY if m != 'pydantic']!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


# What every command imports once it runs: settings (and logs, which configures structlog from them), and
# for the rules and stats commands the rules package. Each is kept from a heavy module it has no use for.
LEAN_IMPORTS = {
    # PayloadLimits is defined in settings: importing it from the quality gate pulled in redis (streams.py).
    "decision_router.settings": ("redis", "decision_router.quality", "decision_router.streams",
                                 "decision_router.contracts"),
    "decision_router.logs": ("redis", "decision_router.quality", "decision_router.streams"),
    # The hot-reload watcher (structlog) is imported on first use of rules.RulesWatcher: `rules check DIR`
    # and the stats commands' loading of the holdouts need only the loader.
    "decision_router.rules": ("structlog", "decision_router.rules.watch", "redis"),
}


def _modules_after(statement: str) -> set[str]:
    script = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(done.stdout))


def test_settings_logs_and_rules_import_only_what_they_need() -> None:
    for module, unneeded in LEAN_IMPORTS.items():
        loaded = _modules_after(f"import {module}")
        imported = sorted(name for name in unneeded if name in loaded)
        assert not imported, f"imported by `import {module}`: {imported}"


def test_rules_watcher_and_payload_limits_are_still_importable_where_they_were() -> None:
    loaded = _modules_after(
        "from decision_router.rules import RulesWatcher\n"
        "from decision_router.rules.watch import RulesWatcher as Defined\n"
        "assert RulesWatcher is Defined\n"
        "from decision_router.quality import PayloadLimits\n"
        "from decision_router.settings import PayloadLimits as Setting\n"
        "assert PayloadLimits is Setting\n"
    )
    assert "decision_router.rules.watch" in loaded


# What `--help` lists, in order, as the installed CLI did when these tests were written.
HELP_ORDER = {
    (): ["serve", "demo", "publish", "outcome", "health", "audit", "reassign", "simulate", "api", "asyncapi",
         "bench", "rules", "redrive", "stats", "tokens"],
    ("rules",): ["check", "test", "replay"],
    ("stats",): ["quality", "model", "drift"],
}


def _listed(first: str, args: tuple[str, ...]) -> list[str]:
    """The command names of `decision-router ARGS --help`, in a process that imported `first` before the CLI."""
    script = (
        "import sys\n"
        f"import {first}\n"
        "from decision_router.cli import main\n"
        f"sys.argv = ['decision-router', *{list(args)!r}, '--help']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("Commands", 1)[1]
    return re.findall(r"^│ (\S+) ", commands, flags=re.MULTILINE)


@pytest.mark.parametrize("first", ["decision_router.cli", "decision_router.cli_stats", "decision_router.cli_simulate",
                                   "decision_router.cli_drift", "decision_router.cli_governance",
                                   "decision_router.cli_api"])
@pytest.mark.parametrize("args", list(HELP_ORDER), ids=lambda args: " ".join(args) or "top")
def test_help_lists_the_commands_in_one_order_whichever_module_was_imported_first(first, args) -> None:
    # A command module imported before cli.py registered its commands first: `stats` then came before `redrive`.
    assert _listed(first, args) == HELP_ORDER[args]


CTRL_C_WHILE_IMPORTING = """
import sys


class CtrlC:
    '''A Ctrl-C while the CLI's modules load (about half a second after the command starts).'''

    def find_spec(self, name, path, target=None):
        if name == "decision_router.cli":
            raise KeyboardInterrupt


sys.meta_path.insert(0, CtrlC())
from decision_router.entry import main

main()
"""


def test_ctrl_c_while_the_cli_loads_is_one_line_and_exit_130_not_a_traceback() -> None:
    done = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_IMPORTING], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr, done.stdout) == (130, "interrupted\n", "")


def test_the_console_script_and_python_m_start_through_the_entry_that_catches_it() -> None:
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"decision-router": "decision_router.entry:main"}
    assert "from decision_router.entry import main" in (root / "decision_router" / "__main__.py").read_text()
    # The entry imports nothing of the CLI's before its guard.
    done = subprocess.run([sys.executable, "-c", "import sys, decision_router.entry; print(sorted(m for m in sys.modules"
                           " if m.startswith('decision_router')))"], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "['decision_router', 'decision_router.entry']"
