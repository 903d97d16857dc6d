"""How long a respawned service takes to accept again: spawn -> first accepted connection.

    .venv/bin/python bench/restart_bench.py [--rounds 7] [--service api]

A killed child costs the VMs the supervisor's backoff (`node.up.SERVICES`) plus this start
time: the requests meanwhile wait in the hop in front (connect retries 1 s apart,
`http.client.CONNECT_RETRY_DELAY_S`), so what matters is whether backoff + start fits in
those retries. Spawns `openimds api` (or `agent`: its Unix socket) with a config of its own
in a temp state_path (the registry it names is never up: start-up must not wait for it), and
times spawn -> a connect that succeeds, `--rounds` times. References measured in the same
run, interleaved: the interpreter alone (`python -c pass`, spawn -> exit) and `import` of
the service's modules (what the command imports before it binds). Prints the median and
min per step and the ratios to the bare interpreter.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PORT = 18775


def _config(tmp: Path) -> Path:
    cfg = tmp / "openimds.ini"
    cfg.write_text(
        f"[DEFAULT]\nstate_path = {tmp}\n"
        f"[api]\nmetadata_listen = 127.0.0.1\nmetadata_listen_port = {PORT}\n"
        "[registry]\nurl = http://127.0.0.1:9\nadmin_token = bench-admin\n"
        "reader_token = bench-reader\n"
        "[metrics]\nenabled = false\n"
    )
    return cfg


def _accepts(service: str, sock_path: str) -> bool:
    try:
        if service == "api":
            with socket.create_connection(("127.0.0.1", PORT), timeout=0.2):
                return True
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock_path)
            return True
    except OSError:
        return False


def time_start(argv: list[str], env: dict[str, str], service: str, sock_path: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not _accepts(service, sock_path):
            if proc.poll() is not None:
                assert proc.stderr is not None
                raise SystemExit(f"{service} exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.002)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait()


def time_run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--service", choices=("api", "agent"), default="api")
    args = ap.parse_args()
    py = sys.executable
    openimds = str(Path(py).with_name("openimds"))
    modules = {"api": "openimds.metadata.api_cli, openimds.metadata.api, "
                      "openimds.registry.client, openimds.registry.feed",
               "agent": "openimds.metadata.agent_cli, openimds.metadata.agent"}[args.service]
    with tempfile.TemporaryDirectory(prefix="openimds-restart-") as tmpdir:
        tmp = Path(tmpdir)
        cfg = _config(tmp)
        sock_path = str(tmp / "metadata_proxy")
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENIMDS_")}
        env["OPENIMDS_CONFIG"] = str(cfg)
        env["OPENIMDS_METADATA_PROXY_SOCKET"] = sock_path
        steps: dict[str, list[float]] = {"python -c pass": [], "import modules": [],
                                         f"openimds {args.service} accepts": []}
        time_start([openimds, args.service], env, args.service, sock_path)  # warm caches
        for _ in range(args.rounds):
            steps["python -c pass"].append(time_run([py, "-c", "pass"]))
            steps["import modules"].append(time_run([py, "-c", f"import {modules}"]))
            steps[f"openimds {args.service} accepts"].append(
                time_start([openimds, args.service], env, args.service, sock_path))
    bare = statistics.median(steps["python -c pass"])
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"
          f", load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name, values in steps.items():
        med = statistics.median(values)
        print(f"{name:<28} median {med * 1000:7.1f} ms  min {min(values) * 1000:7.1f} ms  "
              f"x{med / bare:5.1f} bare")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
