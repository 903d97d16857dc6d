"""Benchmark `openimds api` on the cloud-init request set against a minimal server.

    .venv/bin/python bench/api_bench.py [--duration 8] [--rounds 3] [--conns 10,100,1000]

What it does:
1. starts a real registry and a real `openimds api` (through the CLI, as the operator would),
   seeds one instance (key pair, user data, properties, one port);
2. crawls the API the way cloud-init does (`/openstack`, the five 2018-08-27 files, the
   recursive `latest/meta-data/` walk) to get the request set and every answer's bytes;
3. starts a minimal uvloop + httptools server that answers each of those paths with the same
   bytes (status line, Content-Type, Content-Length, ETag, body), nothing else; and the same
   lookup on our own HTTP layer (`openimds.http.server`, "layer"), to split the API's cost
   into the HTTP layer's and the handler's;
4. runs wrk (keep-alive, `-t min(2,c)`, a Lua script cycling through the request set with the
   agent's signed headers) against both, interleaved per round and per connection count, and
   prints requests/s, p50/p99 and server CPU µs per request, with per-round ratios API/minimal
   and their medians.

Both servers are single processes; wrk shares the machine's cores with them, so compare the
ratios (and CPU per request), not absolute figures.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import (  # noqa: E402
    PYTHON,
    Service,
    base_config,
    free_port,
    http_ready,
    openimds_service,
    tcp_ready,
    write_config,
)

from openimds.core.signing import sign_instance_id  # noqa: E402
from openimds.registry.client import RegistryClient  # noqa: E402

PUBKEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"
          " bench")

MINIMAL_SERVER = r'''
import asyncio, base64, json, sys
import httptools, uvloop

answers = {p: base64.b64decode(v) for p, v in json.load(open(sys.argv[1])).items()}
missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        self.p = httptools.HttpRequestParser(self)
        self.url = b""
    def data_received(self, data):
        try:
            self.p.feed_data(data)
        except httptools.HttpParserError:
            self.t.close()
    def on_url(self, url):
        self.url += url
    def on_message_complete(self):
        self.t.write(answers.get(self.url.decode(), missing))
        self.url = b""

async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(P, "127.0.0.1", int(sys.argv[2]), backlog=4096)
    await srv.serve_forever()

uvloop.install()
asyncio.run(main())
'''

LAYER_SERVER = r'''
import asyncio, base64, json, sys
from openimds.http.server import RawResponse, Response, bind_tcp, install_uvloop, serve

answers = {p: RawResponse(base64.b64decode(v)) for p, v in json.load(open(sys.argv[1])).items()}
missing = Response(404, b"")

def handle(req):
    return answers.get(req.path, missing)

async def main():
    await serve(handle, bind_tcp("127.0.0.1", int(sys.argv[2])))
    await asyncio.Event().wait()

install_uvloop()
asyncio.run(main())
'''

WRK_SCRIPT = """
local paths = {%(paths)s}
local headers = {%(headers)s}
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i], headers)
end
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    value = float(m.group(1))
    return {"us": value / 1000, "ms": value, "s": value * 1000}[m.group(2)]


def run_wrk(url: str, script: Path, conns: int, duration: int) -> dict[str, float]:
    threads = min(2, conns)
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration}s", "--timeout", "5s",
         "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s*(50|99)(?:\.0+)?%\s+(\S+)\s*$", out, re.M))
    if "50" not in lat or "99" not in lat:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return {"rps": rps, "p50": _ms(lat["50"]), "p99": _ms(lat["99"]), "errors": errors,
            "requests": total}


@contextlib.contextmanager
def stack(tmp: Path) -> Iterator[tuple[str, dict[str, str], Service]]:
    cfg = base_config(tmp / "state")
    config = write_config(tmp / "openimds.ini", cfg)
    reg = cfg["registry"]
    url = f"http://127.0.0.1:{reg['bind_port']}"
    with contextlib.ExitStack() as st:
        registry = openimds_service("registry", config, "registry", "serve", log_dir=tmp)
        st.callback(registry.stop)
        registry.start().wait_until(http_ready(url + "/v1/health"))
        client = RegistryClient(url, reg["admin_token"])
        st.callback(client.close)
        net = client.create_network("bench", project_id="bench")
        client.create_subnet("bench-v4", net["id"], "10.99.0.0/24",
                             dns_nameservers=["10.99.0.53"])
        client.create("keypair", {"name": "k", "project_id": net["project_id"],
                                  "public_key": PUBKEY})
        inst = client.create_instance(
            "bench-1", net["id"], key_name="k", project_id=net["project_id"],
            user_data=base64.b64encode(b"#cloud-config\nruncmd: [true]\n").decode(),
            metadata={"role": "bench"})
        headers = {
            "X-Forwarded-For": inst["ports"][0]["fixed_ips"][0]["ip_address"],
            "X-Instance-ID": inst["id"], "X-Tenant-ID": inst["project_id"],
            "X-Instance-ID-Signature": sign_instance_id(
                cfg["DEFAULT"]["metadata_proxy_shared_secret"].encode(), inst["id"]),
        }
        api = openimds_service("api", config, "api", log_dir=tmp)
        st.callback(api.stop)
        host, port = cfg["api"]["metadata_listen"], int(cfg["api"]["metadata_listen_port"])
        api.start().wait_until(tcp_ready(host, port))
        yield f"http://{host}:{port}", headers, api


def fetch_raw(base: str, path: str, headers: dict[str, str]) -> tuple[int, bytes, bytes]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        head = f"HTTP/1.1 {resp.status} {resp.reason}\r\n"
        for name in ("Content-Type", "Content-Length", "ETag"):
            if resp.getheader(name) is not None:
                head += f"{name}: {resp.getheader(name)}\r\n"
        return resp.status, (head + "\r\n").encode("latin-1") + body, body
    finally:
        conn.close()


def cloud_init_paths(base: str, headers: dict[str, str]) -> list[str]:
    """The requests cloud-init's OpenStack datasource makes (read_v2 + EC2 crawl)."""
    paths = ["/openstack", "/openstack"]
    paths += [f"/openstack/2018-08-27/{n}" for n in (
        "meta_data.json", "user_data", "vendor_data.json", "vendor_data2.json",
        "network_data.json")]

    def crawl(path: str) -> None:
        paths.append(path)
        status, _, body = fetch_raw(base, path, headers)
        assert status == 200, (path, status)
        for entry in body.decode().split("\n"):
            if "=" in entry:  # public-keys: 0=name -> 0/openssh-key
                idx = entry.split("=", 1)[0]
                crawl(f"{path}{idx}/")
            elif entry.endswith("/"):
                crawl(path + entry)
            else:
                paths.append(path + entry)

    crawl("/latest/meta-data/")
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", default="10,100,1000")
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    with tempfile.TemporaryDirectory(prefix="api-bench-") as tmpdir:
        tmp = Path(tmpdir)
        with stack(tmp) as (api_url, headers, api):
            paths = cloud_init_paths(api_url, headers)
            answers: dict[str, str] = {}
            for path in paths:
                status, raw, _ = fetch_raw(api_url, path, headers)
                assert status == 200, (path, status)
                answers[path] = base64.b64encode(raw).decode()
            (tmp / "answers.json").write_text(json.dumps(answers))
            mport = free_port()
            minimal = Service("minimal", [PYTHON, "-c", MINIMAL_SERVER,
                                          str(tmp / "answers.json"), str(mport)], tmp)
            minimal.start().wait_until(tcp_ready("127.0.0.1", mport))
            lport = free_port()
            layer = Service("layer", [PYTHON, "-c", LAYER_SERVER, str(tmp / "answers.json"),
                                      str(lport)], tmp, env={"PYTHONPATH": str(REPO / "src")})
            layer.start().wait_until(tcp_ready("127.0.0.1", lport))
            try:
                script = tmp / "set.lua"
                script.write_text(WRK_SCRIPT % {
                    "paths": ", ".join(json.dumps(p) for p in paths),
                    "headers": ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}"
                                         for k, v in headers.items()),
                })
                servers = {"api": (api_url, api.pid),
                           "layer": (f"http://127.0.0.1:{lport}", layer.pid),
                           "minimal": (f"http://127.0.0.1:{mport}", minimal.pid)}
                print(f"request set: {len(paths)} requests per cloud-init boot; "
                      f"{args.rounds} rounds x {conns} connections, {args.duration}s each",
                      flush=True)
                results: dict[tuple[str, int], list[dict[str, float]]] = {}
                for rnd in range(args.rounds):
                    for c in conns:
                        for name, (url, pid) in servers.items():
                            run_wrk(url, script, c, args.warmup)
                            cpu0 = cpu_seconds(pid)
                            r = run_wrk(url, script, c, args.duration)
                            r["cpu_us"] = (cpu_seconds(pid) - cpu0) * 1e6 / max(
                                r["requests"], 1)
                            results.setdefault((name, c), []).append(r)
                            print(f"round {rnd + 1} c={c:<4} {name:<8} rps={r['rps']:>9.0f} "
                                  f"p50={r['p50']:.2f}ms p99={r['p99']:.2f}ms "
                                  f"cpu={r['cpu_us']:.1f}us/req errors={int(r['errors'])}",
                                  flush=True)
                report(results, conns, args.rounds)
            finally:
                minimal.stop()
                layer.stop()
    return 0


def report(results: dict[tuple[str, int], list[dict[str, float]]], conns: list[int],
           rounds: int) -> None:
    print()
    print("| conns | server | req/s (median, min-max) | p50 ms | p99 ms | CPU µs/req | errors |")
    print("|---|---|---|---|---|---|---|")
    for c in conns:
        for name in ("api", "layer", "minimal"):
            rs = results[(name, c)]
            rps = [r["rps"] for r in rs]
            print(f"| {c} | {name} | {statistics.median(rps):,.0f} "
                  f"({min(rps):,.0f}-{max(rps):,.0f}) "
                  f"| {statistics.median(r['p50'] for r in rs):.2f} "
                  f"| {statistics.median(r['p99'] for r in rs):.2f} "
                  f"| {statistics.median(r['cpu_us'] for r in rs):.1f} "
                  f"| {int(sum(r['errors'] for r in rs))} |")
    for num, den in (("api", "minimal"), ("api", "layer"), ("layer", "minimal")):
        print()
        print(f"| conns | {num}/{den} req/s (median of per-round ratios, min-max) "
              "| CPU/req ratio | p99 ratio |")
        print("|---|---|---|---|")
        for c in conns:
            a, m = results[(num, c)], results[(den, c)]
            ratios = [a[i]["rps"] / m[i]["rps"] for i in range(rounds)]
            cpu = [a[i]["cpu_us"] / m[i]["cpu_us"] for i in range(rounds)]
            p99 = [a[i]["p99"] / m[i]["p99"] for i in range(rounds)]
            print(f"| {c} | {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) "
                  f"| {statistics.median(cpu):.2f} | {statistics.median(p99):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
