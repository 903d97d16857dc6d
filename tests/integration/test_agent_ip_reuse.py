"""IP reuse with the agent's change feed held back: the new VM gets the new instance.

A relay between the agent and the registry holds every feed answer that carries changes
until the test lets it go, so the agent cannot have seen the old instance's deletion when
the new instance's first request arrives. The registry acknowledges the reusing create only
after the agent's feed lease has lapsed (registry/reuse.py, metadata/feed_lease.py), so the
agent asks the registry instead of serving its cached (old) identity."""

from __future__ import annotations

import copy
import http.client
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from openimds.registry.reuse import LEASE_S
from tests.integration.agent_support import (
    Stack,
    make_network,
    stack,
    unix_ready,
    unix_request,
    via_router,
)
from tests.support import openimds_service, write_config

HOLD_S = 4.0  # [registry] reuse_hold: short, the create below waits it out
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class FeedHoldingRelay:
    """HTTP relay to the registry; while `holding`, every /v1/changes answer that carries
    changes (the feed's long-poll, its retries, the agent's lease probe) waits for
    `release()`. Everything else (lookups, health) passes at once."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.holding = threading.Event()
        self.released = threading.Event()
        self.held = 0
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                conn = http.client.HTTPConnection(*relay.upstream, timeout=90)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in _HOP_BY_HOP}
                    conn.request(self.command, self.path, body or None, headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                finally:
                    conn.close()
                if (self.path.startswith("/v1/changes") and relay.holding.is_set()
                        and resp.status == 200 and json.loads(data).get("changes")):
                    relay.held += 1
                    relay.released.wait(60)
                self.send_response(resp.status)
                for k, v in out:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FeedHoldingRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def hold(self) -> None:
        self.released.clear()
        self.holding.set()

    def release(self) -> None:
        self.holding.clear()
        self.released.set()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with stack(tmp_path, metadata_agent={"cache_size": 1000},
               registry={"reuse_hold": HOLD_S}) as st, \
            FeedHoldingRelay(st.registry_url) as relay:
        cfg = copy.deepcopy(st.cfg)
        cfg["registry"]["url"] = relay.url  # the agent's feed and lookups go through it
        config = write_config(tmp_path / "agent.ini", cfg)
        st.agent = openimds_service("agent", config, "agent", log_dir=tmp_path)
        st.services.append(st.agent)
        st.agent.start().wait_until(unix_ready(st.socket))
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.40.0.0/24", r["id"])
        st.wait_feed(True)
        yield {"st": st, "relay": relay, "r": r, "net": net}


def seen(st: Stack, headers: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    ans = unix_request(st.socket, headers=headers)
    if ans.status != 200:
        return None, None
    assert st.api is not None
    h = st.api.last_headers()
    return h["x-instance-id"][0], h["x-tenant-id"][0]


def test_ip_reuse_while_the_feed_is_held_back(world: dict[str, Any]) -> None:
    st: Stack = world["st"]
    relay: FeedHoldingRelay = world["relay"]
    ip = "10.40.0.50"
    hdrs = via_router(world["r"]["id"], ip)
    old = st.admin.create_instance("old", world["net"]["id"], fixed_ip=ip, project_id="p-old")
    st.wait_feed_caught_up()
    hits = st.stats()["cache_hits"]
    for _ in range(3):
        assert seen(st, hdrs) == (old["id"], old["project_id"])
    assert st.stats()["cache_hits"] > hits  # the cache is trusted: the old identity is in it

    relay.hold()  # from now on the agent hears of no change
    st.admin.delete("instance", old["id"])
    t0 = time.monotonic()
    new = st.admin.create_instance("new", world["net"]["id"], fixed_ip=ip,
                                   project_id="p-new")
    took = time.monotonic() - t0
    queries = st.stats()["registry_queries"]
    # the new VM's first request: the new instance, though the agent never saw the delete
    assert seen(st, hdrs) == (new["id"], new["project_id"])
    assert relay.held >= 1  # the deletion really was held back from the agent
    assert st.stats()["registry_queries"] > queries  # it asked: its lease had lapsed
    assert st.stats()["feed_lease_s"] == LEASE_S
    assert took >= HOLD_S - 0.05  # the reusing create waited out the agents' lease and hold
    for _ in range(3):
        assert seen(st, hdrs) == (new["id"], new["project_id"])

    relay.release()
    st.wait_feed_caught_up()
    hits = st.stats()["cache_hits"]
    assert seen(st, hdrs) == (new["id"], new["project_id"])
    assert st.stats()["cache_hits"] > hits, st.stats()  # trusted again once the feed answers


def test_delete_then_create_picks_another_address_at_once(world: dict[str, Any]) -> None:
    # the address the deleted VM had is quarantined: a create that asks for no address gets
    # another one and is answered without the hold
    st: Stack = world["st"]
    old = st.admin.create_instance("old", world["net"]["id"], project_id="p-old")
    st.admin.delete("instance", old["id"])
    t0 = time.monotonic()
    new = st.admin.create_instance("new", world["net"]["id"], project_id="p-new")
    took = time.monotonic() - t0
    old_ip, ip = (str(i["ports"][0]["fixed_ips"][0]["ip_address"]) for i in (old, new))
    assert ip != old_ip
    assert took < HOLD_S - 1  # generous; held, it would take at least HOLD_S
    hdrs = via_router(world["r"]["id"], ip)
    assert seen(st, hdrs) == (new["id"], new["project_id"])
