"""Prewarming with real processes: `openimds api` fetches a new instance's view when the
change feed announces it, before any request, and a property change is visible within 1 s
and never reverted by an older fetch still in flight."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tests.integration.test_api_server import api_stack


def test_created_instance_is_served_with_the_registry_gone(tmp_path: Path) -> None:
    with api_stack(tmp_path) as s:
        time.sleep(2.0)  # the feed's first (resync) batch; then it long-polls
        created = s.registry.create_instance(
            "boot-1", s.network["id"], project_id=s.network["project_id"],
            metadata={"role": "new"})
        time.sleep(2.0)  # the feed delivers the create; the API fetches in the background
        s.registry_service.stop()
        # no request was made for this instance: only a prewarmed view can answer it now
        status, _, body = s.request("GET", "/openstack/latest/meta_data.json",
                                    s.headers(created))
        assert status == 200, body
        md = json.loads(body)
        assert md["uuid"] == created["id"] and md["meta"] == {"role": "new"}
        # the seeded instance was created before the API started: not listed at startup,
        # fetched on its first request as before (which now cannot reach the registry)
        assert s.get("/latest/meta-data/instance-id")[0] == 503
        s.api.stop()
        stopped = [line for line in s.api.log().splitlines() if "api.stopped" in line]
        assert stopped and "'prewarmed': 1" in stopped[-1], stopped


def test_property_changes_visible_within_1s_never_reverted(tmp_path: Path) -> None:
    with api_stack(tmp_path) as s:
        iid = s.instance["id"]
        time.sleep(1.5)
        assert s.get("/openstack/latest/meta_data.json")[0] == 200
        seen: list[tuple[float, int]] = []  # (request start, meta n)
        visible: dict[int, float] = {}
        stop = threading.Event()
        errors: list[str] = []

        def reader() -> None:
            while not stop.is_set():
                began = time.monotonic()
                status, _, body = s.get("/openstack/latest/meta_data.json")
                if status != 200:
                    errors.append(f"{status} {body[:80]!r}")
                    continue
                seen.append((began, int(json.loads(body)["meta"].get("n", "0"))))

        threads = [threading.Thread(target=reader) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            for n in range(1, 21):
                start = time.monotonic()
                s.registry.update("instance", iid, {"metadata": {"n": str(n)}})
                while True:
                    status, _, body = s.get("/openstack/latest/meta_data.json")
                    if status == 200 and json.loads(body)["meta"].get("n") == str(n):
                        break
                    assert time.monotonic() - start < 1.0, f"n={n} not visible within 1 s"
                    time.sleep(0.005)
                visible[n] = time.monotonic()
                time.sleep(0.05 if n % 5 else 0.3)  # readers keep reading meanwhile
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:5]
        # once n was visible, no request started later saw anything older
        reverted = [(n, v) for n, at in visible.items() for began, v in seen
                    if began > at and v < n]
        assert not reverted, reverted[:5]
        assert len(visible) == 20 and len(seen) > 100


def test_registry_outage_keeps_documents_and_catches_up_without_a_resync(
    tmp_path: Path,
) -> None:
    with api_stack(tmp_path) as s:
        time.sleep(1.5)  # the feed's first batch
        status, _, body = s.request("GET", "/openstack/latest/meta_data.json",
                                    s.headers(s.instance))
        assert status == 200
        s.registry_service.stop()
        for _ in range(20):  # known: served all through the outage
            status, _, again = s.request("GET", "/openstack/latest/meta_data.json",
                                         s.headers(s.instance))
            assert status == 200
            assert json.loads(again)["meta"] == json.loads(body)["meta"]  # random_seed varies
        s.registry_service.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                s.registry.health()
                break
            except Exception:
                time.sleep(0.05)
        s.registry.update("instance", s.instance["id"], {"metadata": {"role": "after"}})
        deadline = time.monotonic() + 30  # the feed wakes at once; 30 s is for a loaded machine
        meta: dict[str, str] = {}
        while time.monotonic() < deadline:
            meta = json.loads(s.request("GET", "/openstack/latest/meta_data.json",
                                        s.headers(s.instance))[2])["meta"]
            if meta.get("role") == "after":
                break
            time.sleep(0.05)
        assert meta.get("role") == "after"  # the change made after the outage is seen
        s.api.stop()
        # caught up from where it was: one resync (the start), not one per outage
        assert s.api.log().count("api.cache_resync") == 1, s.api.log()[-3000:]
