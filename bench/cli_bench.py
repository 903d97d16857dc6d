"""Start-up of `openimds` CLI calls, spawn -> exit: this tree against another git ref.

    .venv/bin/python bench/cli_bench.py [--rounds 7] [--ref main]

The ref's `src/` is extracted to a temp dir and put first on PYTHONPATH; both trees run with
this interpreter and the same installed packages, so only openimds' own code differs. Each
round runs every command once per tree, alternated (this, ref; next command ref, this), after
a warm-up call of each that writes the bytecode (PYTHONDONTWRITEBYTECODE is unset: a CLI
call that compiles openimds again measures the compiler). The calls: top-level and
subcommand `--help`, `config show`, and `network list` against a registry that refuses the
connection (parse, settings, client, one refused connect, the one-line error). Prints per
command the median and range of wall ms per tree, the ratio of medians, and how many modules
(all, and openimds' own) one call of each tree has imported when it is done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

COMMANDS: list[list[str]] = [
    ["--help"],
    ["registry", "--help"],
    ["network", "list", "--help"],
    ["host", "list", "--help"],
    ["status", "--help"],
    ["api", "--help"],
    ["config", "show"],
    ["network", "list"],
]

# main(argv) as `openimds ARGV` runs it, then the names in sys.modules.
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


def _extract(ref: str, into: Path) -> Path:
    """`src/` of git ref `ref`, written under `into`."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _env(src: Path, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OPENIMDS_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(src)
    env["NO_PROXY"] = "*"
    env["OPENIMDS_CONFIG"] = str(state / "openimds.ini")
    return env


def _wall_ms(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "openimds", *argv], env=env, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    return (time.perf_counter() - start) * 1000


def _modules(argv: list[str], env: dict[str, str]) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], env=env, check=True,
                         capture_output=True, text=True, cwd="/").stdout
    names = json.loads(out)
    return len(names), sum(1 for n in names if n == "openimds" or n.startswith("openimds."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ref", default="main", help="the git ref to compare with")
    opts = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="cli-bench-") as tmp:
        state = Path(tmp)
        (state / "openimds.ini").write_text(
            f"[DEFAULT]\nstate_path = {state}\n"
            "[registry]\nurl = http://127.0.0.1:9\nadmin_token = bench-admin\n"
        )
        trees = {"this": _env(REPO / "src", state),
                 opts.ref: _env(_extract(opts.ref, state / "ref"), state)}
        for env in trees.values():
            for argv in COMMANDS:
                _wall_ms(argv, env)  # writes the bytecode
        wall: dict[tuple[str, str], list[float]] = {}
        for r in range(opts.rounds):
            for i, argv in enumerate(COMMANDS):
                order = list(trees) if (r + i) % 2 == 0 else list(trees)[::-1]
                for name in order:
                    wall.setdefault((name, " ".join(argv)), []).append(
                        _wall_ms(argv, trees[name]))

        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(f"# {platform.node()} {platform.python_version()} {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}, {now}, "
              f"{opts.rounds} rounds alternated; wall ms median (min-max); modules all/openimds")
        print(f"{'command':<22} {'this':>22} {opts.ref:>22} {'this/ref':>9}  modules this | ref")
        for argv in COMMANDS:
            cmd = " ".join(argv)
            cells = []
            for name in trees:
                xs = wall[(name, cmd)]
                cells.append(f"{statistics.median(xs):6.0f} ({min(xs):.0f}-{max(xs):.0f})")
            ratio = (statistics.median(wall[("this", cmd)])
                     / statistics.median(wall[(opts.ref, cmd)]))
            mods = [_modules(argv, env) for env in trees.values()]
            print(f"{cmd:<22} {cells[0]:>22} {cells[1]:>22} {ratio:9.2f}  "
                  f"{mods[0][0]}/{mods[0][1]} | {mods[1][0]}/{mods[1][1]}")


if __name__ == "__main__":
    main()
