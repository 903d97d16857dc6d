"""`openimds` imports only the chosen command's module, and still lists every command.

The import checks run the real CLI in a child process (a fresh `sys.modules`) and assert on
what it imported, not on how long it took.
"""

from __future__ import annotations

import argparse
import json
import subprocess

import pytest

from openimds.cli import COMMAND_MODULES, COMMANDS, build_parser
from tests.support import PYTHON, clean_env

# Runs main(argv) as `openimds ARGV...` would, then prints the names in sys.modules.
_PROBE = """
import contextlib, io, json, sys
from openimds.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""

# What no command's --help, and no resource command, needs.
HEAVY = ("sqlalchemy", "aiohttp", "alembic", "cryptography", "uvloop",
         "openimds.metadata.api", "openimds.metadata.agent")


def imported(*argv: str) -> set[str]:
    """The modules a fresh `openimds ARGV...` has imported when it is done."""
    proc = subprocess.run([PYTHON, "-c", _PROBE, *argv], capture_output=True, text=True,
                          timeout=60, env=clean_env(), check=True)
    return set(json.loads(proc.stdout))


def loaded(modules: set[str], name: str) -> bool:
    return any(m == name or m.startswith(name + ".") for m in modules)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str | None]]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [(c.dest, c.help) for c in action._choices_actions]


@pytest.mark.parametrize(("argv", "own", "also_absent"), [
    (["--help"], None, ("httpx", "httptools")),
    (["config", "show", "-f", "json"], None, ("httpx", "httptools")),
    (["registry", "--help"], "openimds.registry.cli", ("httpx", "httptools")),
    (["registry", "migrate", "--help"], "openimds.registry.cli", ("httpx",)),
    (["network", "list", "--help"], "openimds.registry.cli", ("httptools",)),
    (["server", "create", "--help"], "openimds.registry.cli", ("httptools",)),
    (["host", "list", "--help"], "openimds.node.host_cli", ("httptools",)),
    (["status", "--help"], "openimds.metrics.status_cli", ("httpx",)),
    (["trace", "--help"], "openimds.node.cli", ("httpx",)),
    (["identity", "--help"], "openimds.metadata.identity_cli", ("httpx",)),
])
def test_a_command_imports_only_its_own_module(
    argv: list[str], own: str | None, also_absent: tuple[str, ...],
) -> None:
    modules = imported(*argv)
    if own is not None:
        assert own in modules
    others = [m for m in COMMAND_MODULES if m != own and m in modules]
    assert others == [], f"openimds {' '.join(argv)} imported {others}"
    heavy = [h for h in (*HEAVY, *also_absent) if loaded(modules, h)]
    assert heavy == [], f"openimds {' '.join(argv)} imported {heavy}"


def test_a_service_command_still_imports_what_it_serves_with() -> None:
    modules = imported("api", "--help")
    assert {"openimds.metadata.api_cli", "openimds.metadata.api"} <= modules
    assert not {"openimds.registry.cli", "openimds.metadata.agent"} & modules


def test_the_table_lists_each_module_s_commands_in_order_with_their_help() -> None:
    full = build_parser(COMMAND_MODULES)
    expected = [("config", "show the effective settings"),
                *((name, help) for name, (_, help) in COMMANDS.items())]
    assert _subcommands(full) == expected
    # The stubs' top level is the full parser's, so `openimds --help` reads the same.
    assert build_parser(()).format_help() == full.format_help()


def test_each_command_is_registered_in_full_by_its_table_module() -> None:
    for module in COMMAND_MODULES:
        parser = build_parser((module,))
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        # A stub has no -h of its own; a registered command has.
        full = {name for name, sub in action.choices.items() if sub.add_help} - {"config"}
        assert full == {name for name, (m, _) in COMMANDS.items() if m == module}
