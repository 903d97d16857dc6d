"""Two registry processes behind one PostgreSQL serve the same change feed without polling:
a write committed through one wakes the other's long-polls within a second (LISTEN/NOTIFY;
the long-polls' own re-check is 5 s), also after the listening sessions were cut."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from sqlalchemy.engine import make_url

from openimds.registry.app import RECHECK_SLOW_S
from openimds.registry.client import RegistryClient
from openimds.registry.notify import APPLICATION_NAME
from tests.support import (
    PG_SOCKET_DIR,
    base_config,
    clean_env,
    free_port,
    http_ready,
    metric_samples,
    openimds_service,
    postgres_database,
    scrape,
    write_config,
)

pytestmark = pytest.mark.postgres


def psql(db: str, sql: str) -> str:
    return subprocess.run(
        ["psql", "-h", PG_SOCKET_DIR, "-d", db, "-qAtc", sql], check=True, text=True,
        capture_output=True, env=clean_env({"PGUSER": "root"})).stdout.strip()


OURS = ("FROM pg_stat_activity WHERE application_name = 'openimds-registry-listen' "
        "AND datname = current_database()")
assert APPLICATION_NAME == "openimds-registry-listen"


def listeners(db: str) -> int:
    return int(psql(db, "SELECT count(*) " + OURS))


class Pair(NamedTuple):
    """Two registry processes on one database."""

    db: str
    a: RegistryClient
    b: RegistryClient
    token: str  # the admin token both were configured with
    metrics: tuple[int, int]  # A's and B's /metrics ports


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """Registries A and B on one database, a client of each."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database())
        db = str(make_url(url).database)
        shared = base_config(tmp_path / "a" / "state", registry={"connection": url})
        clients, ports = [], []
        for name in ("a", "b"):
            cfg = base_config(tmp_path / name / "state",
                              registry={**shared["registry"], "bind_port": free_port()})
            (tmp_path / name).mkdir(parents=True, exist_ok=True)
            config = write_config(tmp_path / name / "openimds.ini", cfg)
            svc = openimds_service(f"registry-{name}", config, "registry", "serve",
                                   log_dir=tmp_path / name)
            stack.callback(svc.stop)
            base = f"http://127.0.0.1:{cfg['registry']['bind_port']}"
            svc.start().wait_until(http_ready(base + "/v1/health"))
            client = RegistryClient(base, cfg["registry"]["admin_token"])
            stack.callback(client.close)
            clients.append(client)
            ports.append(int(cfg["metrics"]["registry_port"]))
        deadline = time.monotonic() + 10
        while listeners(db) < 2:
            assert time.monotonic() < deadline, "the registries never LISTENed"
            time.sleep(0.1)
        yield Pair(db, clients[0], clients[1], shared["registry"]["admin_token"],
                   (ports[0], ports[1]))


def wake_latency(waiter: RegistryClient, writer: RegistryClient) -> float:
    """Seconds from a write through `writer` to the answer of a long-poll on `waiter`."""
    since = waiter.health()["revision"]
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer.update(waiter.changes(since, wait=20))
        answer["at"] = time.monotonic()

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.3)  # the long-poll is parked
    assert "at" not in answer
    t0 = time.monotonic()
    net = writer.create("network", {"name": f"n-{t0}"})
    thread.join(25)
    assert [c["id"] for c in answer["changes"] if c["kind"] == "network"] == [net["id"]]
    return float(answer["at"] - t0)


def test_two_registries_wake_each_other_within_a_second(pair: Pair) -> None:
    db, a, b = pair.db, pair.a, pair.b
    times = [wake_latency(a, b) for _ in range(3)] + [wake_latency(b, a) for _ in range(3)]
    print("wake latencies s:", [f"{t:.3f}" for t in times])
    assert max(times) < 1.0, times
    assert RECHECK_SLOW_S >= 5 * max(times), "the re-check, not NOTIFY, answered"

    # Cut both LISTEN sessions: they come back, and wake each other again.
    killed = psql(db, "SELECT count(pg_terminate_backend(pid)) " + OURS)
    assert killed == "2"
    deadline = time.monotonic() + 10
    while listeners(db) < 2:
        assert time.monotonic() < deadline, "the registries did not LISTEN again"
        time.sleep(0.1)
    time.sleep(0.3)
    again = [wake_latency(a, b), wake_latency(b, a)]
    assert max(again) < 1.0, again


def follow(client: RegistryClient, since: int, nets: int, out: list[dict[str, Any]],
           done: dict[str, float]) -> None:
    """Long-poll from `since` as an agent does, appending every change, until `nets`
    network creates came."""
    rev = since
    while sum(c["kind"] == "network" for c in out) < nets:
        answer = client.changes(rev, wait=20)
        out.extend(answer["changes"])
        rev = int(answer["revision"])
    done["at"] = time.monotonic()


def test_followers_of_one_registry_get_both_registries_writes_exactly(pair: Pair) -> None:
    """Long-polls woken by their own registry's writes (answered from the write's rows) and
    by the other's (read from the database), several at the same revision: each gets every
    change once, in order, the same as a plain read of the feed, and the last one at once
    (a lost wake would wait for the 5 s re-check)."""
    a, b = pair.a, pair.b
    since = int(a.health()["revision"])
    nets = 31  # the last through B: only B's notification can wake A's followers for it
    got: list[list[dict[str, Any]]] = [[] for _ in range(3)]
    done: list[dict[str, float]] = [{} for _ in got]
    # each its own connection (a client of its own, with the token A was configured with)
    clients = [RegistryClient(a.base_url, pair.token) for _ in got]
    threads = [threading.Thread(target=follow, args=(c, since, nets, g, d))
               for c, g, d in zip(clients, got, done, strict=True)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # parked at `since`
    for i in range(nets):
        (a if i % 3 else b).create("network", {"name": f"exact-{i}"})
    last = time.monotonic()
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    head = int(a.health()["revision"])
    expected: list[dict[str, Any]] = []
    rev = since
    while rev < head:
        page = a.changes(rev)
        expected.extend(page["changes"])
        rev = int(page["revision"])
    assert [c["kind"] for c in expected].count("network") == nets
    for g, d in zip(got, done, strict=True):
        assert g == expected[:len(g)]
        assert sum(c["kind"] == "network" for c in g) == nets
        assert d["at"] - last < RECHECK_SLOW_S / 2, "a follower waited for its re-check"


def test_a_long_poll_woken_by_the_other_registry_counts_its_wake_and_its_read(
        pair: Pair) -> None:
    """A's /metrics: a long-poll parked on A, woken by B's write (A's LISTEN session), is
    a wake and a read of the store on A (A holds no rows of B's write)."""
    def counters() -> tuple[float, float]:
        got = metric_samples(scrape(pair.metrics[0]))
        return (got[("openimds_registry_feed_wakes_total", frozenset())],
                got[("openimds_registry_feed_reads_total", frozenset())])

    since = int(pair.a.health()["revision"])
    answer: dict[str, Any] = {}

    def poll() -> None:
        with RegistryClient(pair.a.base_url, pair.token) as c:
            answer.update(c.changes(since, wait=20))

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.3)  # parked at `since`
    wakes, reads = counters()
    assert not answer
    net = pair.b.create("network", {"name": "woken-from-b"})
    thread.join(25)
    assert [c["id"] for c in answer["changes"] if c["kind"] == "network"] == [net["id"]]
    woken, read = counters()
    assert woken >= wakes + 1
    assert read >= reads + 1
