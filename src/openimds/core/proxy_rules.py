"""Rules of the namespace metadata proxy: listener specs and the request header rewrite.

This module never sees a socket or a file: it receives bytes and plain values.

Listener specs are the JSON files the L3 and DHCP agents drop into `[proxy] listeners_dir`
(docs/architecture.md, "Proxy listener specs"):

    {"netns": "qrouter-<id>", "host": "::", "port": 9697,
     "router_id": "<id>", "network_id": null}

`host` "::" is one dual-stack listener (Neutron's `bind :::9697`); a link-local host needs
`interface` (Neutron's `bind [fe80::a9fe:a9fe]:80 interface tapX`), which is optional otherwise.

The rewrite is Neutron's haproxy listener (`del-header` + `set-header` of the router/network
ID, `option forwardfor`) made strict, because a VM controls every header it sends:
- every X-Neutron-*, X-Instance-ID*, X-Tenant-ID, X-Forwarded-* and Forwarded header is
  removed, whatever its case, and also when spelled with underscores (`X_Forwarded_For`), which
  some servers fold into the same variable;
- X-Forwarded-For is *set* to the TCP peer, never appended: a VM-sent value neither survives
  nor breaks the request (Neutron's appended header made webob see "spoofed, real" and fail);
- exactly one X-Neutron-Router-ID or X-Neutron-Network-ID names the listener;
- when the VM sent any X-Forwarded-* or Forwarded header (a forwarding proxy inside the
  guest), `X-Openimds-Guest-Forwarded: 1` tells the API (which then issues no IMDSv2 token,
  as AWS refuses a token PUT carrying X-Forwarded-For); a VM-sent header of that name is
  removed like the other spoofable ones;
- hop-by-hop headers (and those the client's Connection header lists) stay on the client's
  hop; the body is re-framed by the upstream client, so Content-Length, Transfer-Encoding and
  Expect are dropped too.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from openimds.errors import BadRequest

SPEC_SUFFIX = ".json"
ROUTER_ID_HEADER = b"X-Neutron-Router-ID"
NETWORK_ID_HEADER = b"X-Neutron-Network-ID"
FORWARDED_FOR_HEADER = b"X-Forwarded-For"
GUEST_FORWARDED = (b"X-Openimds-Guest-Forwarded", b"1")
REQUEST_ID_HEADER = b"X-Openimds-Request-Id"
# A guest's own X-Request-Id is kept as the request ID only if it looks like an ID (it goes
# into every hop's log line): letters, digits and . _ : - , at most 64 characters.
_GUEST_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")

# Compared after lower-casing and mapping "_" to "-". X-Openimds-* are set by the proxy only.
_STRIPPED_PREFIXES = (b"x-neutron-", b"x-instance-id", b"x-forwarded-", b"x-openimds-")
_STRIPPED_NAMES = frozenset({b"x-tenant-id", b"forwarded", b"x-openimds-guest-forwarded"})
_FORWARDING = frozenset({b"forwarded"})  # plus every x-forwarded-*
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"content-length", b"expect",
})
# IDs end up in a header value and a file name: no spaces, no control characters.
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_NETNS_RE = re.compile(r"[A-Za-z0-9._:@+-]{1,255}")
_SPEC_KEYS = ("netns", "host", "port", "router_id", "network_id")
_IFNAME_RE = re.compile(r"[A-Za-z0-9._@+-]{1,15}")


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    """One listener: where to listen and which router or network it speaks for."""

    name: str
    netns: str
    host: str
    port: int
    router_id: str | None
    network_id: str | None
    interface: str | None = None  # SO_BINDTODEVICE; required for a link-local host

    @property
    def identity_header(self) -> tuple[bytes, bytes]:
        """The one header naming this listener's router or network."""
        if self.router_id is not None:
            return ROUTER_ID_HEADER, self.router_id.encode("ascii")
        return NETWORK_ID_HEADER, (self.network_id or "").encode("ascii")

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host


def is_spec_filename(filename: str) -> bool:
    """Whether a directory entry is a spec (`<name>.json`); dot-files are temp files."""
    return (
        filename.endswith(SPEC_SUFFIX)
        and not filename.startswith(".")
        and len(filename) > len(SPEC_SUFFIX)
    )


def spec_name(filename: str) -> str:
    return filename[: -len(SPEC_SUFFIX)]


def parse_listener_spec(name: str, data: bytes | str) -> ListenerSpec:
    """Parse and validate one spec file's content. Raises BadRequest naming the field."""
    try:
        raw: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"listener spec {name}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BadRequest(f"listener spec {name}: not a JSON object")
    return listener_spec_from_dict(name, raw)


def listener_spec_from_dict(name: str, raw: Mapping[str, Any]) -> ListenerSpec:
    def bad(key: str, reason: str) -> BadRequest:
        return BadRequest(f"listener spec {name}: {key}={raw.get(key)!r} {reason}")

    netns = raw.get("netns")
    if not isinstance(netns, str) or not _NETNS_RE.fullmatch(netns) or netns in (".", ".."):
        raise bad("netns", "is not a namespace name")
    host = raw.get("host")
    if not isinstance(host, str):
        raise bad("host", "is not an IP address")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise bad("host", "is not an IP address") from None
    port = raw.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise bad("port", "is not a port number (1-65535)")
    ids: dict[str, str | None] = {}
    for key in ("router_id", "network_id"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not _ID_RE.fullmatch(value)):
            raise bad(key, "is not an ID")
        ids[key] = value
    if (ids["router_id"] is None) == (ids["network_id"] is None):
        raise BadRequest(
            f"listener spec {name}: exactly one of router_id and network_id must be set "
            f"(router_id={ids['router_id']!r}, network_id={ids['network_id']!r})"
        )
    interface = raw.get("interface")
    if interface is not None and (not isinstance(interface, str)
                                  or not _IFNAME_RE.fullmatch(interface)):
        raise bad("interface", "is not an interface name")
    addr = ipaddress.ip_address(host)
    if interface is None and addr.version == 6 and addr.is_link_local:
        raise bad("interface", f"is required with the link-local host {host}")
    return ListenerSpec(name, netns, host, port, ids["router_id"], ids["network_id"],
                        interface)


def render_listener_spec(spec: ListenerSpec) -> str:
    """The JSON text of a spec, as the agents write it (name is the file name)."""
    data = {k: getattr(spec, k) for k in _SPEC_KEYS}
    if spec.interface is not None:
        data["interface"] = spec.interface
    return json.dumps(data, sort_keys=True) + "\n"


def plan_listeners(
    desired: Mapping[str, ListenerSpec], current: Mapping[str, ListenerSpec],
) -> tuple[list[ListenerSpec], list[str]]:
    """(specs to open, names to close) turning `current` into `desired`; a changed spec is both."""
    to_close = [n for n, spec in current.items() if desired.get(n) != spec]
    to_open = [spec for n, spec in desired.items() if current.get(n) != spec]
    return sorted(to_open, key=lambda s: s.name), sorted(to_close)


def peer_address(host: str) -> str:
    """The client address as the agent expects it: IPv4-mapped IPv6 unwrapped, no scope."""
    host = host.split("%", 1)[0]
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def _canonical(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-")


def is_spoofable(name: bytes) -> bool:
    """Whether a client-sent header must never reach the agent."""
    canon = _canonical(name)
    return canon in _STRIPPED_NAMES or canon.startswith(_STRIPPED_PREFIXES)


def _connection_tokens(value: bytes) -> set[bytes]:
    tokens = {t.strip().lower() for t in value.split(b",")}
    tokens.discard(b"")
    # A client may not make us drop the Host header by listing it in Connection.
    tokens.discard(b"host")
    return tokens


_KEEP, _DROP, _CONNECTION, _FORWARDED = 0, 1, 2, 3
# Decisions per header name as sent (names repeat: host, user-agent, accept ...). A pure
# function's memo, bounded because the names come from VMs.
_DECISIONS: dict[bytes, int] = {}
_MAX_DECISIONS = 4096


def _decide(name: bytes) -> int:
    low = name.lower()
    if low == b"connection":
        decision = _CONNECTION
    elif _canonical(name) in _FORWARDING or _canonical(name).startswith(b"x-forwarded-"):
        decision = _FORWARDED
    elif low in _HOP_BY_HOP or is_spoofable(name):
        decision = _DROP
    else:
        decision = _KEEP
    if len(_DECISIONS) >= _MAX_DECISIONS:
        _DECISIONS.clear()
    _DECISIONS[name] = decision
    return decision


def rewrite_headers(
    headers: Iterable[tuple[bytes, bytes]], added: Iterable[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """The client's headers minus spoofable and hop-by-hop ones, then `added`, in order.

    `added` is what the proxy sets: `proxy_headers(peer, spec)`.
    """
    out = []
    listed: set[bytes] | None = None
    forwarded = False
    decisions = _DECISIONS
    for item in headers:
        decision = decisions.get(item[0])
        if decision is None:
            decision = _decide(item[0])
        if decision == _KEEP:
            out.append(item)
        elif decision == _CONNECTION:
            listed = _connection_tokens(item[1]) | (listed or set())
        elif decision == _FORWARDED:
            forwarded = True
    if listed:
        out = [item for item in out if item[0].lower() not in listed]
    out.extend(added)
    if forwarded:
        out.append(GUEST_FORWARDED)
    return out


def guest_request_id(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The guest's X-Request-Id (the first one) if it is well-formed, else None."""
    for name, value in headers:
        if name == b"x-request-id":
            value = value.strip()
            return value if _GUEST_REQUEST_ID.fullmatch(value) else None
    return None


def proxy_headers(peer_host: str, spec: ListenerSpec) -> tuple[tuple[bytes, bytes], ...]:
    """The headers the proxy sets for one client connection (compute once per connection)."""
    return (
        (FORWARDED_FOR_HEADER, peer_address(peer_host).encode("ascii")),
        spec.identity_header,
    )
