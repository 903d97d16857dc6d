"""The API's keep-alive hit path in-process, cycling over 100 or over N cached instances.

    .venv/bin/python bench/api_locality.py [--instances 10000] [--rounds 3] [--requests 100000]
                                           [--phases first100,all,copies]

The real `HttpProtocol` and `MetadataApi` (a fake registry, a transport that drops what is
written), driven by `data_received` with one request at a time: the user-space work per
request without the event loop and the sockets. `first100` cycles over the first 100
instances, `all` over every instance in a scattered order, `copies` over the first 100's
requests held as N distinct buffers (what reading the bench's own N request buffers costs).
Same code path in all three (every request is a cache hit): the difference is where the
objects a request touches are, i.e. the memory hierarchy (issue 13, docs/benchmarks.md).
`--phases` runs only the sets named (`--rounds 0`: none, the warm-up alone): under
`valgrind --tool=cachegrind`, one set's run less the warm-up's, over `--requests`, is its
instructions and simulated cache misses per request, which the machine's load does not move.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import uvloop  # noqa: E402
from tests.unit.test_metadata_documents import PROJECT, make_view  # noqa: E402

from openimds.config import ApiSettings, Settings  # noqa: E402
from openimds.core.signing import sign_instance_id  # noqa: E402
from openimds.http.server import HttpProtocol, Limits  # noqa: E402
from openimds.metadata.api import MetadataApi  # noqa: E402
from openimds.metadata.vendordata import VendorData  # noqa: E402

SECRET = "s3cret"
PATH = "/openstack/latest/meta_data.json"


class Registry:
    def __init__(self) -> None:
        self.views: dict[str, dict[str, Any]] = {}

    async def get_view(self, instance_id: str) -> dict[str, Any]:
        return copy.deepcopy(self.views[instance_id])

    async def set_password(self, instance_id: str, password: str) -> dict[str, Any]:
        raise NotImplementedError  # the bench only reads


class Sink:
    """A transport that counts writes."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, data: Any) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


def request(iid: str, i: int) -> bytes:
    sig = sign_instance_id(SECRET.encode(), iid)
    return (f"GET {PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/24.1\r\n"
            f"Accept: */*\r\nX-Forwarded-For: 10.{i // 2560}.{i // 10 % 256}.{10 + i % 10}\r\n"
            f"X-Instance-ID: {iid}\r\nX-Tenant-ID: {PROJECT}\r\n"
            f"X-Instance-ID-Signature: {sig}\r\n\r\n").encode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=100000, help="per phase and round")
    p.add_argument("--phases", default="first100,all,copies",
                   help="the request sets to run, comma-separated")
    a = p.parse_args()
    n = a.instances
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    settings = Settings(metadata_proxy_shared_secret=SECRET,
                        api=ApiSettings(cache_size=max(n, 100)))
    reg = Registry()
    api = MetadataApi(settings, reg, VendorData(settings.api), wall_clock=lambda: 1000.0)
    ids = [str(uuid.UUID(int=(0x1234 << 64) + i * 7919)) for i in range(n)]
    for i, iid in enumerate(ids):
        reg.views[iid] = make_view(id=iid, name=f"vm{i}", hostname=f"vm{i}",
                                   metadata={"role": "scale", "n": str(i)})
    proto = HttpProtocol(api.handle_observed, Limits(), loop)
    sink = Sink()
    proto.connection_made(sink)  # type: ignore[arg-type]
    raws = [request(iid, i) for i, iid in enumerate(ids)]

    async def warm() -> None:  # one miss per instance: its view fetched and cached
        for raw in raws:
            before = sink.writes
            proto.data_received(raw)
            while sink.writes == before:
                await asyncio.sleep(0)

    loop.run_until_complete(warm())
    api.access_log = False
    gc.collect()
    gc.freeze()
    stride = 7919  # coprime with n (a prime): a scattered order through every instance
    order = [(j * stride) % n for j in range(n)]
    sets = {"first100": [raws[i % 100] for i in order],
            "all": [raws[i] for i in order],
            "copies": [bytes(bytearray(raws[i % 100])) for i in order]}
    wanted = [name.strip() for name in a.phases.split(",") if name.strip()]
    if unknown := set(wanted) - set(sets):
        p.error(f"--phases: unknown {sorted(unknown)}")
    sets = {name: reqs for name, reqs in sets.items() if name in wanted}
    res: dict[str, list[float]] = {k: [] for k in sets}
    for _ in range(a.rounds):
        for name, reqs in sets.items():
            feed, m = proto.data_received, len(reqs)
            t0 = time.process_time()
            for j in range(a.requests):
                feed(reqs[j % m])
            res[name].append((time.process_time() - t0) / a.requests * 1e6)
    misses = api.stats["misses"]
    for name, xs in res.items():
        print(f"{name:9} " + " ".join(f"{x:.2f}" for x in xs) + " us/request")
    for name in ("all", "copies"):
        if name not in res or "first100" not in res or not a.rounds:
            continue
        ratios = " ".join(f"{x / y:.3f}" for x, y in zip(res[name], res["first100"],
                                                          strict=True))
        print(f"{name} / first100: {ratios}")
    print(f"cache misses after the warm-up: {misses - n} (every request a hit)")
    loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
