"""The agent behind its real server with known heads cut at the caller's identity lines
(`Limits.identity_lines`, as agent_cli serves it): many VMs share one kept head per request
shape, and each must get its own identity and answer, the bytes the full parse gives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from openimds.core.signing import sign_instance_id
from openimds.http import server as server_mod
from openimds.http.server import Limits, bind_unix, serve
from openimds.metadata.agent import IDENTITY_LINES, MetadataAgent
from tests.unit.test_agent_handler import SECRET, N, R, make

Caller = tuple[str, str | None, str | None]  # (X-Forwarded-For, router, network)


@pytest.fixture(autouse=True)
def _fresh_heads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_mod, "_tables", {})
    monkeypatch.setattr(server_mod, "_search", server_mod._Credit(server_mod._PROBE))


def head(ip: str, router: str | None, network: str | None, rid: str, path: str = "/a",
         before: bytes = b"", after: bytes = b"") -> bytes:
    """A request as the proxy sends it (its spelling of the identity lines)."""
    lines = [b"GET %s HTTP/1.1" % path.encode(), b"Host: 169.254.169.254", b"Accept: */*"]
    lines += [before] if before else []
    lines.append(b"X-Forwarded-For: " + ip.encode())
    if router is not None:
        lines.append(b"X-Neutron-Router-ID: " + router.encode())
    if network is not None:
        lines.append(b"X-Neutron-Network-ID: " + network.encode())
    lines += [after] if after else []
    lines.append(b"X-Openimds-Request-Id: " + rid.encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def answers(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    """The bodies of the next `n` answers on the connection."""
    bodies = []
    for _ in range(n):
        top = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(int(line.split(b":")[1]) for line in top.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        bodies.append(await reader.readexactly(length))
    return bodies


class Served:
    """`agent.handle` on a Unix socket, with or without known heads."""

    def __init__(self, agent: MetadataAgent, path: Path, limits: Limits) -> None:
        self.agent, self.path, self.limits = agent, path, limits

    async def __aenter__(self) -> Served:
        self.server = await serve(self.agent.handle, bind_unix(str(self.path)), self.limits)
        self.reader, self.writer = await asyncio.open_unix_connection(str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def ask(self, stream: bytes, n: int) -> list[bytes]:
        self.writer.write(stream)
        return await answers(self.reader, n)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Served, Served, Any, Any]]:
    """One agent behind two servers: known heads cut at its identity lines, and none."""
    agent, reg, api = make()
    async with (Served(agent, tmp_path / "on.sock",
                       Limits(known_heads=True, identity_lines=IDENTITY_LINES)) as on,
                Served(agent, tmp_path / "off.sock", Limits()) as off):
        yield on, off, reg, api


CALLERS: list[Caller] = ([(f"10.0.0.{i}", R, None) for i in range(10, 40)]
                         + [(f"10.0.1.{i}", None, N) for i in range(10, 20)]
                         + [(f"fd00::{i:x}", "router-2", None) for i in range(10, 20)])


async def test_vms_sharing_a_kept_head_each_get_their_own_identity_and_answer(
    served: tuple[Served, Served, Any, Any],
) -> None:
    on, _, reg, api = served
    for ip, router, network in CALLERS:
        reg.add(router or network or "", ip, f"inst-{ip}", f"proj-{ip}")
    # seen, kept (the shape), marked, made an exact entry, then made from that entry with
    # the caller and path its slot keeps (`Request.memo`)
    for n in range(6):
        order = CALLERS if n % 2 else CALLERS[::-1]
        stream = b"".join(head(ip, r, nw, rid=f"{n}-{k}") for k, (ip, r, nw) in enumerate(order))
        del api.seen[:]
        got = await on.ask(stream, len(order))
        assert got == [f"hello inst-{ip}".encode() for ip, _, _ in order]
        for (ip, _, _), (_, _, hs, _) in zip(order, api.seen, strict=True):
            sent = dict(hs)
            assert sent[b"X-Forwarded-For"] == ip.encode()
            assert sent[b"X-Instance-ID"] == f"inst-{ip}".encode()
            assert sent[b"X-Tenant-ID"] == f"proj-{ip}".encode()
            assert sent[b"X-Instance-ID-Signature"] == sign_instance_id(
                SECRET.encode(), f"inst-{ip}").encode()
    # Two shapes (router- and network-scoped) kept, not one per VM; one source per VM.
    assert len(server_mod._tables[IDENTITY_LINES].known) == 2
    assert len(on.agent._hits) == 2
    assert len(on.agent._sources) == len(CALLERS)
    # each VM's exact entry keeps its own caller: the one its identity lines name
    exact = server_mod._tables[IDENTITY_LINES].exact.values()
    assert len(exact) == len(CALLERS)
    # The agent's key for a caller is the entry's identity tuple itself, one per caller,
    # where its first request was cut (not parsed: the first two of each shape's, which made
    # their source from the parsed headers).
    keys = {id(k): k for gen in (on.agent._sources.young, on.agent._sources.old) for k in gen}
    shared = sum(keys.get(id(entry.identity)) is entry.identity for entry in exact)
    assert shared == len(CALLERS) - 2 * 2
    for entry in exact:
        src, path = entry.caller, entry.shape
        assert entry.identity is not None
        assert dict(entry.identity)[b"x-forwarded-for"] == src.caller.ip.encode()
        assert path is on.agent._hits.get(entry.known.key)


# Heads the proxy never sends (it drops every VM-sent identity header): whatever the agent
# makes of them, the kept-head path must make the same, every time.
ODD = {
    "another VM's address first": dict(before=b"X-Forwarded-For: 10.0.0.11"),
    "another VM's address last": dict(after=b"X-Forwarded-For: 10.0.0.11"),
    "another VM's address in lower case, first": dict(before=b"x-forwarded-for: 10.0.0.11"),
    "another VM's address in lower case, last": dict(after=b"x-forwarded-for: 10.0.0.11"),
    "a second router": dict(after=b"X-Neutron-Router-ID: router-2"),
    "a second router in lower case": dict(before=b"x-neutron-router-id: router-2"),
    "a network too": dict(after=b"X-Neutron-Network-ID: " + N.encode()),
}


@pytest.mark.parametrize("name", sorted(ODD))
async def test_duplicate_or_odd_identity_lines_get_what_the_full_parse_gives(
    served: tuple[Served, Served, Any, Any], name: str,
) -> None:
    on, off, reg, _ = served
    for ip in ("10.0.0.10", "10.0.0.11", "10.0.0.12"):
        reg.add(R, ip, f"inst-{ip}")
        reg.add("router-2", ip, f"inst-{ip}-r2")
    odd = ODD[name]
    stream = b"".join([head("10.0.0.10", R, None, "p1"), head("10.0.0.10", R, None, "p2")]
                      + [head(ip, R, None, f"o{k}", **odd)
                         for k, ip in enumerate(("10.0.0.10", "10.0.0.12") * 3)])
    expected = await off.ask(stream, 8)
    for _ in range(3):
        assert await on.ask(stream, 8) == expected
    assert expected[:2] == [b"hello inst-10.0.0.10"] * 2
