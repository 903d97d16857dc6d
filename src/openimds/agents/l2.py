"""The L2 agent (`openimds l2-agent`): what a compute node runs so VMs can be plugged.

It keeps one bridge per registry network (`agents.fabric`, the same rule the L3 and DHCP
agents follow: create what the registry has, delete ours it no longer has once nothing is
attached; a VXLAN device per bridge when `[fabric] local_ip` is set), converging on every
network change of the feed and on resync, and heartbeats as
type `l2` so `openimds host list` shows the node with the compute role. Network nodes do not
need it: their L3 and DHCP agents make the bridges they plug into.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping
from typing import Any

from openimds.agents import fabric
from openimds.config import Settings
from openimds.errors import OpenImdsError
from openimds.host import links
from openimds.registry.client import AsyncRegistryClient
from openimds.registry.feed import ChangeFollower
from openimds.registry.heartbeat import Heartbeat

log = logging.getLogger(__name__)

RETRY_S = 2.0


def converge(topology: Mapping[str, Any],
             tunnel: fabric.Tunnel | None = None) -> fabric.FabricReport:
    """Bridges (and their VXLAN, with `[fabric] local_ip`) for every network of the
    topology. Blocking netlink: run in a thread."""
    with links.netlink() as here:
        return fabric.converge(here, topology.get("networks", []), delete_stale=True,
                               tunnel=tunnel)


async def follow(client: AsyncRegistryClient, tunnel: fabric.Tunnel | None = None) -> None:
    follower = ChangeFollower(client)
    try:
        async for batch in follower:
            if not batch.resync and not any(c.get("kind") == "network"
                                            for c in batch.changes):
                continue
            while True:
                try:
                    await asyncio.to_thread(converge, await client.topology(), tunnel)
                    break
                except (OpenImdsError, OSError) as exc:
                    log.warning("l2.converge_failed reason=%s retry_in_s=%.1f", exc, RETRY_S)
                    await asyncio.sleep(RETRY_S)
    finally:
        await follower.aclose()


def run_agent(settings: Settings) -> int:
    async def main() -> None:
        client = AsyncRegistryClient.from_settings(settings, admin=False)
        tunnel = fabric.tunnel_from(settings.fabric)
        tasks = [asyncio.create_task(follow(client, tunnel), name="l2-follow"),
                 asyncio.create_task(Heartbeat(client, settings, "l2").run(),
                                     name="l2-heartbeat")]
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("l2.started host=%s registry=%s", settings.host,
                 settings.registry.effective_url)
        try:
            waiter = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a crashed task is a bug: exit non-zero, the supervisor restarts
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
        log.info("l2.stopped")

    asyncio.run(main())
    return 0
