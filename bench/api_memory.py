"""What the API's document cache holds per instance, by tracemalloc, in-process.

    .venv/bin/python bench/api_memory.py [--instances 10000] [--cache-size 10000]
                                         [--prewarm 8] [--lines 0]

The real `MetadataApi` with a fake registry (the unit tests' view, one id per instance),
in the state a boot storm leaves: every instance created through the change feed and
prewarmed (view fetched, cloud-init's `BOOT_PATHS` answers kept; `--prewarm 0`: not, each
answer built on its first request), then every boot path asked once over keep-alive with
the agent's identity headers (what cloud-init reads). Printed: KiB per cached instance
(Python heap by tracemalloc, what the API allocated after its start and still holds; the
fake registry's own bytes left out), split by the source file that allocated it, then the
same after as many instances again (eviction past `--cache-size`: at most cache_size
instances, nothing of an evicted one). RSS is scale_bench's figure; this one names what
the bytes are.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import sys
import tracemalloc
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.unit.test_metadata_documents import PROJECT, make_view  # noqa: E402

from openimds.config import ApiSettings, Settings  # noqa: E402
from openimds.core.signing import sign_instance_id  # noqa: E402
from openimds.http.server import RawResponse, Request  # noqa: E402
from openimds.metadata.api import BOOT_PATHS, MetadataApi  # noqa: E402
from openimds.metadata.vendordata import VendorData  # noqa: E402

SECRET = "s3cret"


class Registry:
    """Views held as the JSON the registry's REST API answers: what the API keeps of one
    is allocated by the API (json.loads), not by the bench."""

    def __init__(self) -> None:
        self.views: dict[str, bytes] = {}

    async def get_view(self, instance_id: str) -> dict[str, Any]:
        view: dict[str, Any] = json.loads(self.views[instance_id])
        return view

    async def set_password(self, instance_id: str, password: str) -> dict[str, Any]:
        raise NotImplementedError  # the bench only reads


class Batch:
    def __init__(self, revision: int, changes: list[dict[str, Any]] | None = None,
                 resync: bool = False) -> None:
        self.revision, self.changes, self.resync = revision, changes or [], resync


def view_of(n: int, rev: int = 43) -> dict[str, Any]:
    iid = str(uuid.UUID(int=n + 1))
    v = make_view(id=iid, hostname=f"vm-{n}", name=f"vm-{n}", ec2_id=n + 1)
    v["revision"] = rev  # the registry answers at the create's revision
    v["instance"]["metadata"] = {"role": "scale", "n": str(n)}
    v["ports"][0]["fixed_ips"][0]["ip_address"] = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
    v["ports"][0]["id"] = str(uuid.UUID(int=(1 << 64) + n))
    v["ports"][0]["mac_address"] = f"fa:16:3e:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}"
    return v


async def boot(api: MetadataApi, iid: str) -> int:
    """Every boot path once, as the agent sends it; returns how many were kept hits."""
    headers = [(b"x-forwarded-for", b"10.0.0.5"), (b"x-instance-id", iid.encode()),
               (b"x-tenant-id", PROJECT.encode()),
               (b"x-instance-id-signature", sign_instance_id(SECRET.encode(), iid).encode())]
    hits = 0
    for path in BOOT_PATHS:
        result = api.handle(Request("GET", path, headers, b"", "1.1", True, None))
        if inspect.isawaitable(result):
            result = await result
        hits += isinstance(result, RawResponse)
    return hits


async def create(api: MetadataApi, reg: Registry, first: int, count: int, rev: int) -> int:
    ids = []
    for n in range(first, first + count):
        v = view_of(n, rev)
        iid = v["instance"]["id"]
        reg.views[iid] = json.dumps(v).encode()
        ids.append(iid)
    for at in range(0, len(ids), 500):
        api.apply_batch(Batch(rev, [{"revision": rev, "kind": "instance", "op": "create",
                                     "id": i, "attrs": {"project_id": PROJECT}}
                                    for i in ids[at:at + 500]]))
        while api._prewarmers:  # the prewarm queue drains (bounded by cache_size)
            await asyncio.sleep(0)
    hits = 0
    for iid in ids:
        hits += await boot(api, iid)
    return hits


def by_file(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> dict[str, int]:
    """Bytes allocated (and still held) between the snapshots, by source file; the bench's
    own (the fake registry's JSON, the requests) left out."""
    out: dict[str, int] = defaultdict(int)
    for stat in after.compare_to(before, "filename"):
        path = stat.traceback[0].filename
        if f"{REPO}/bench/" in path or f"{REPO}/tests/" in path:
            continue
        out[Path(path).name] += stat.size_diff
    return out


def report(title: str, before: tracemalloc.Snapshot, per: int, lines: int) -> None:
    gc.collect()
    now = tracemalloc.take_snapshot()
    files = by_file(before, now)
    print(f"{title}: {sum(files.values()) / per / 1024:.2f} KiB per cached instance")
    for name, size in sorted(files.items(), key=lambda kv: -kv[1])[:8]:
        print(f"    {name:<24} {size / per / 1024:6.2f} KiB")
    for stat in now.compare_to(before, "lineno")[:lines]:
        print(f"    {stat.size_diff / per:8.0f} B  {stat.count_diff / per:6.2f} objects"
              f"  {stat.traceback[0]}")


async def run(args: argparse.Namespace) -> None:
    settings = Settings(metadata_proxy_shared_secret=SECRET, api=ApiSettings(
        prewarm_concurrency=args.prewarm, cache_size=args.cache_size))
    reg = Registry()
    gc.collect()
    tracemalloc.start(1)
    api = MetadataApi(settings, reg, VendorData(settings.api), wall_clock=lambda: 1000.0)
    api.apply_batch(Batch(42, resync=True))
    gc.collect()
    before = tracemalloc.take_snapshot()
    n = args.instances
    hits = await create(api, reg, 0, n, 43)
    asked = n * len(BOOT_PATHS)
    how = "prewarmed" if args.prewarm else "not prewarmed"
    report(f"{n:,} instances created, {how} and booted ({len(BOOT_PATHS)} boot paths "
           f"each, {hits:,} of {asked:,} requests kept hits; {len(api._cache):,} cached)",
           before, len(api._cache), args.lines)
    # as many new instances again: the first ones are evicted (cache_size)
    hits = await create(api, reg, n, n, 44)
    report(f"{n:,} more ({hits:,} of {asked:,} kept hits; {len(api._cache):,} cached, "
           f"cache_size {args.cache_size:,})", before, len(api._cache), args.lines)
    tracemalloc.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=10000)
    p.add_argument("--cache-size", type=int, default=10000)
    p.add_argument("--prewarm", type=int, default=8,
                   help="[api] prewarm_concurrency (0: every answer built on its request)")
    p.add_argument("--lines", type=int, default=0, help="print the top allocation sites")
    asyncio.run(run(p.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
