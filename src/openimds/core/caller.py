"""Who is asking: the namespace proxy's headers -> a `Caller`, and registry ports -> an instance.

Rules of this module: it never sees a socket, a clock or the registry. It receives the header
list of one request (names lower-cased bytes, as `openimds.http.server.Request.headers`) and,
later, the ports the registry returned for that caller.

    parse_caller([(b"x-forwarded-for", b"::ffff:10.0.0.5"), (b"x-neutron-router-id", b"r1")])
        -> Caller(ip="10.0.0.5", router_id="r1", network_id=None)

Anti-spoofing, as Neutron (LP#1865036) but stricter where Neutron drops the connection:
- exactly one of X-Neutron-Router-ID / X-Neutron-Network-ID, present once, with a sane value;
  both, neither, or a repeated one -> `SpoofedRequest` (400);
- X-Forwarded-For: when several values arrive (repeated headers or a comma list), the LAST one
  is the one our proxy wrote (anything before it came from the VM); `::ffff:a.b.c.d` becomes
  `a.b.c.d`; an IPv6 zone (`%eth0`) is dropped; anything else that is not an IP -> `BadRequest`
  (400). Neutron instead raises inside netaddr and closes the socket (neutron.md §0.7).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from openimds.core.models import DEVICE_OWNER_DHCP
from openimds.errors import AmbiguousCaller, BadRequest, SpoofedRequest, UnknownCaller

__all__ = [
    "NETWORK_ID_HEADER",
    "ROUTER_ID_HEADER",
    "Caller",
    "Resolution",
    "normalise_ip",
    "parse_caller",
    "resolve",
]

FORWARDED_FOR_HEADER = b"x-forwarded-for"
ROUTER_ID_HEADER = b"x-neutron-router-id"
NETWORK_ID_HEADER = b"x-neutron-network-id"

# Registry IDs are UUID4 strings; accept any short token of ID characters so that a value can
# never smuggle separators into a query string or a log line.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_MAX_XFF_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Caller:
    """The VM asking: its (normalised) IP and the router or network its request came through."""

    ip: str
    router_id: str | None = None
    network_id: str | None = None

    @property
    def scope(self) -> tuple[str, str]:
        """("router", id) or ("network", id): where the IP is unique."""
        if self.router_id is not None:
            return ("router", self.router_id)
        assert self.network_id is not None
        return ("network", self.network_id)

    def describe(self) -> str:
        """`ip=10.0.0.5 router=<id>`: for log lines and error reasons."""
        kind, ident = self.scope
        return f"ip={self.ip} {kind}={ident}"


@dataclass(frozen=True, slots=True)
class Resolution:
    """The one port holding the caller's IP, reduced to what the API needs."""

    instance_id: str
    project_id: str
    port_id: str
    network_id: str


def normalise_ip(text: str) -> str:
    """Parse one address; `::ffff:a.b.c.d` -> `a.b.c.d`; raise `BadRequest` on anything else.

    >>> normalise_ip(" ::FFFF:10.0.0.5 ")
    '10.0.0.5'
    """
    value = text.strip()
    if "%" in value:  # IPv6 zone index: meaningless beyond the link, never part of a lookup
        value = value.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise BadRequest(f"X-Forwarded-For {_shown(text)} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _shown(value: str | bytes, limit: int = 64) -> str:
    """A value safe to put in a one-line reason: printable ASCII, bounded."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return repr(cleaned + ("..." if len(text) > limit else ""))


def _one_id(name: bytes, values: Sequence[bytes]) -> str | None:
    if not values:
        return None
    label = name.decode()
    if len(values) > 1:
        raise SpoofedRequest(f"{label} sent {len(values)} times")
    try:
        text = values[0].decode("ascii").strip()
    except UnicodeDecodeError:
        raise SpoofedRequest(f"{label} {_shown(values[0])} is not an ID") from None
    if not _ID_RE.fullmatch(text):
        raise SpoofedRequest(f"{label} {_shown(values[0])} is not an ID")
    return text


def parse_caller(headers: Iterable[tuple[bytes, bytes]]) -> Caller:
    """Build the Caller from one request's headers (names lower-case).

    Raises `SpoofedRequest` (router/network header both, neither, repeated or garbage) and
    `BadRequest` (X-Forwarded-For missing or not an IP).
    """
    forwarded: list[bytes] = []
    routers: list[bytes] = []
    networks: list[bytes] = []
    for name, value in headers:
        if name == FORWARDED_FOR_HEADER:
            forwarded.append(value)
        elif name == ROUTER_ID_HEADER:
            routers.append(value)
        elif name == NETWORK_ID_HEADER:
            networks.append(value)
    router_id = _one_id(ROUTER_ID_HEADER, routers)
    network_id = _one_id(NETWORK_ID_HEADER, networks)
    if router_id is not None and network_id is not None:
        raise SpoofedRequest(f"both network {network_id} and router {router_id} defined")
    if router_id is None and network_id is None:
        raise SpoofedRequest("neither X-Neutron-Router-ID nor X-Neutron-Network-ID present")
    return Caller(ip=_last_forwarded(forwarded), router_id=router_id, network_id=network_id)


def _last_forwarded(values: Sequence[bytes]) -> str:
    if not values:
        raise BadRequest("X-Forwarded-For missing")
    last = values[-1]
    if len(last) > _MAX_XFF_BYTES:
        raise BadRequest(f"X-Forwarded-For of {len(last)} bytes is too long")
    try:
        text = last.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(f"X-Forwarded-For {_shown(last)} is not an IP address") from None
    return normalise_ip(text.rsplit(",", 1)[-1])


def resolve(caller: Caller, ports: Sequence[Mapping[str, Any]]) -> Resolution:
    """The registry's ports for this caller -> the one instance (Neutron's 1-port rule).

    Raises `UnknownCaller` for zero ports (or one port without a device, or a DHCP port) and
    `AmbiguousCaller` naming the ports when more than one holds the IP.
    """
    if not ports:
        raise UnknownCaller(f"no port with {caller.describe()}")
    if len(ports) > 1:
        ids = ",".join(str(p.get("id")) for p in ports)
        raise AmbiguousCaller(f"{len(ports)} ports with {caller.describe()}: {ids}")
    port = ports[0]
    device_id = str(port.get("device_id") or "")
    if port.get("device_owner") == DEVICE_OWNER_DHCP:
        # a DHCP node's own address (its device_id names the node, not an instance)
        raise UnknownCaller(f"port {port.get('id')} with {caller.describe()} is a DHCP port")
    if not device_id:
        raise UnknownCaller(f"port {port.get('id')} with {caller.describe()} has no device")
    return Resolution(
        instance_id=device_id,
        project_id=str(port.get("project_id") or ""),
        port_id=str(port.get("id") or ""),
        network_id=str(port.get("network_id") or ""),
    )
