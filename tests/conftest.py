"""Test-session set-up.

As root, the whole pytest process moves into a private, anonymous network namespace before
any test runs (unshare(CLONE_NEWNET) while pytest is still single-threaded), then brings lo up.
Every service a test starts inherits it, so ports never collide with anything else on the
machine, and bridges or veths the agents under test create hang off this private namespace.
Named namespaces (`ip netns add`) are still global: tests give them unique names and delete
them in finalizers. Do not read /sys/class/net in code under test: sysfs shows the host's
namespace here; use netlink.

Start processes with tests.reaper.spawn (tests.support.Service does): they die with pytest,
however it dies, and a watchdog sweeps what they started (tests/reaper.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop

from tests import reaper

CLONE_NEWNET = 0x40000000
EPHEMERAL_LOW = 45000  # tests.support.free_port picks below this
IS_ROOT = os.geteuid() == 0


def _enter_private_netns() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Connections' own (ephemeral) ports come from above the range free_port() hands out,
    # so a port a test picked and a service binds later is never taken meanwhile by some
    # client's connect (seen: a restarted API's port, free for a moment, taken by one).
    # The setting is this namespace's own.
    with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as fh:
        fh.write(f"{EPHEMERAL_LOW} 60999\n")


if IS_ROOT and os.environ.get("NO_PRIVATE_NETNS") is None:
    _enter_private_netns()


@pytest.fixture(scope="session", autouse=True)
def _reap_on_exit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Whatever the tests start dies with the session, even if pytest is killed (-9 too):
    tests/reaper.py."""
    reaper.REAPER.start(tmp_path_factory.getbasetemp())
    yield
    reaper.REAPER.reap()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: real namespaces and services")
    for item in items:
        if "netns" in item.keywords or "integration" in str(item.fspath):
            item.add_marker(skip)


# The lean HTTP layer runs on uvloop in production, whose transports differ from asyncio's
# in small ways (they do not subclass asyncio.Transport): its tests run on both loops.
_BOTH_LOOPS = ("test_http_layer.py", "test_http_pipeline.py", "test_http_send.py",
               "test_http_concurrent.py",
               "test_http_sockets.py", "test_http_known_heads.py")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
