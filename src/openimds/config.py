"""Settings: one frozen object, built once at start and passed down explicitly.

Sources, later wins:
1. the defaults declared below (each with one line of help);
2. ``$state_path/secrets.ini`` if it exists (written 0600 by ``openimds up`` on first start);
3. the INI file (``--config``, default ``/etc/openimds/openimds.ini``; a missing default file
   is fine, a missing named file is an error);
4. environment overrides: ``OPENIMDS_<KEY>`` for ``[DEFAULT]``, ``OPENIMDS_<SECTION>_<KEY>``
   for the other sections (e.g. ``OPENIMDS_REGISTRY_CONNECTION``).

Option names follow Neutron (``[DEFAULT]`` metadata_proxy_*, nova_metadata_*, the DHCP and L3
metadata flags, ``[metadata_haproxy]`` timeouts, ``[AGENT]`` process monitoring) and Nova's
``[api]`` vendordata options, so an operator can carry a config over. ``$state_path`` is
interpolated in string values. Unknown sections, keys and bad values raise `ConfigError`
naming the source, section, key and reason.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from openimds.errors import ConfigError

DEFAULT_CONFIG_FILE = "/etc/openimds/openimds.ini"
ENV_PREFIX = "OPENIMDS_"
# Environment variables with our prefix that are not options.
_ENV_NOT_OPTIONS = frozenset({"OPENIMDS_CONFIG"})
DEFAULT_SECTION = "DEFAULT"


def opt(
    default: Any,
    help: str,
    *,
    secret: bool = False,
    choices: tuple[str, ...] = (),
    min: float | None = None,
    max: float | None = None,
    unix_path: bool = False,
) -> Any:
    """Declare one option: default, one line of help, and how to validate it. `unix_path`:
    empty or an absolute path a Unix socket can be bound at (checked after $state_path)."""
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "secret": secret, "choices": choices, "min": min, "max": max,
                  "unix_path": unix_path},
    )


# sun_path holds 108 bytes with its terminating NUL (unix(7)); a longer path fails to bind.
UNIX_PATH_MAX = 107


@dataclass(frozen=True, slots=True)
class RegistrySettings:
    connection: str = opt(
        "", "SQLAlchemy URL of the store; empty = sqlite:///$state_path/registry.sqlite",
        secret=True,
    )
    bind_host: str = opt("127.0.0.1", "Address the registry REST API listens on")
    bind_port: int = opt(9696, "Port the registry REST API listens on", min=1, max=65535)
    url: str = opt("", "URL clients use to reach the registry; empty = http://bind_host:bind_port")
    admin_token: str = opt("", "Bearer token allowed to read and write", secret=True)
    reader_token: str = opt("", "Bearer token allowed to read only (agents)", secret=True)
    change_retention: int = opt(10000, "How many changes the feed keeps before resync", min=10)
    max_page_size: int = opt(1000, "Largest page a list call returns", min=1)
    reuse_hold: float = opt(
        30.0, "Seconds a write that re-binds an address released within that time waits "
        "before it is answered, and so how long a metadata agent serves the VMs it knows while "
        "no registry answers (announced as hold_s); automatic allocation avoids such "
        "addresses, so only a requested fixed IP or a full pool waits. At least 3 (lease + 1)",
        min=3.0)
    sqlite_synchronous: str = opt(
        "full", "SQLite commit durability: full fsyncs each commit (survives power loss); "
        "normal only at checkpoints (survives kill -9, a power cut may lose the last commits)",
        choices=("full", "normal"))

    @property
    def effective_url(self) -> str:
        if self.url:
            return self.url.rstrip("/")
        host = f"[{self.bind_host}]" if ":" in self.bind_host else self.bind_host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.bind_port}"


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Nova's metadata API options (Nova keeps them in [api] and [DEFAULT])."""

    metadata_listen: str = opt("0.0.0.0", "Address the metadata API listens on")
    metadata_listen_port: int = opt(8775, "Port the metadata API listens on", min=1, max=65535)
    dhcp_domain: str = opt("novalocal", "Domain appended to hostnames; empty = none")
    vendordata_providers: tuple[str, ...] = opt(
        ("StaticJSON",), "Vendordata sources: StaticJSON, DynamicJSON"
    )
    vendordata_jsonfile_path: str = opt("", "JSON file served as vendor_data.json")
    vendordata_dynamic_targets: tuple[str, ...] = opt(
        (), "name@url targets POSTed for vendor_data2.json"
    )
    vendordata_dynamic_connect_timeout: float = opt(5.0, "Seconds to connect to a target", min=0.1)
    vendordata_dynamic_read_timeout: float = opt(5.0, "Seconds to wait for a target", min=0.1)
    vendordata_dynamic_failure_fatal: bool = opt(False, "A failing target fails the request")
    vendordata_dynamic_cache_ttl: float = opt(
        300.0, "Seconds to keep dynamic vendordata when the target sends no Cache-Control", min=0
    )
    imds_tokens: str = opt(
        "optional", "IMDSv2 session tokens: optional or required",
        choices=("optional", "required"),
    )
    openstack_tokens: str = opt(
        "optional", "IMDSv2 tokens on the /openstack tree (cloud-init's OpenStack datasource "
        "sends none): optional or required", choices=("optional", "required"),
    )
    token_hop_limit: int = opt(
        1, "IP TTL / hop limit of the token PUT answer, set by the namespace proxy (AWS's "
        "HttpPutResponseHopLimit; 2 lets containers behind a VM get tokens)", min=1, max=64,
    )
    region: str = opt("RegionOne", "Region in the instance identity document and JWT")
    architecture: str = opt(
        "", "architecture in the identity document; empty = this host's (x86_64, aarch64)"
    )
    identity_key_file: str = opt(
        "$state_path/identity/key.pem", "RSA key signing identity documents and JWTs "
        "(made on first start when missing)",
    )
    identity_cert_file: str = opt(
        "$state_path/identity/cert.pem", "Certificate of identity_key_file (made with it)"
    )
    identity_issuer: str = opt("openimds", "iss claim of the identity JWT")
    required_header: str = opt(
        "", "A header every request must carry, 'Name: value' (e.g. 'Metadata-Flavor: "
        "Google'); empty = none"
    )
    expose_tags: bool = opt(False, "Serve instance properties as AWS tags (meta-data/tags/)")
    max_waits_per_instance: int = opt(
        16, "wait_for_change requests one instance may hold at once (more get 429)", min=1,
    )
    max_wait_timeout: int = opt(
        3600, "Longest wait_for_change hold (timeout_sec is capped to it)", min=1, max=3600,
    )
    max_waits: int = opt(
        4096, "wait_for_change requests held at once on this node (503 beyond); also the "
        "size of the proxy's and the agent's long-poll pools", min=1,
    )
    client_timeout: float = opt(30.0, "Seconds a client may take to send a request", min=0.1)
    client_write_timeout: float = opt(
        30.0, "Seconds a client (the agent) that does not read may leave its answers untaken "
        "(over 16 KiB unsent) before its connection is reset", min=1.0, max=3600.0,
    )
    client_keepalive_timeout: float = opt(
        30.0, "Seconds an answered keep-alive connection of a client (the agent's pooled "
        "ones) may stay idle before it is closed", min=0.1, max=3600.0,
    )
    max_request_bytes: int = opt(65536, "Largest request body accepted", min=1024)
    cache_size: int = opt(10000, "Instances whose serialized documents are kept", min=1)
    registry_timeout: float = opt(5.0, "Seconds to wait for the registry's view", min=0.1)
    retry_after: int = opt(2, "Retry-After seconds sent with 503", min=1)
    prewarm_concurrency: int = opt(
        4, "Background view fetches for instances the change feed reports new or changed "
        "(0 = off: only fetch on a request)", min=0, max=64,
    )
    workers: int = opt(
        1, "API worker processes (SO_REUSEPORT listeners; each has its own document cache "
        "and follows the change feed); with more than one and unix_socket set, each also "
        "listens on its own unix_socket.w<N>, which the agent spreads its pool over",
        min=1, max=256,
    )
    unix_socket: str = opt(
        "", "openimds only: a Unix socket the API also listens on (the TCP listener stays), "
        "for an agent on this host (its nova_metadata_socket); empty = none", unix_path=True,
    )
    worker_port_base: int = opt(
        0, "openimds only: API worker N (0, 1, ...) also listens on metadata_listen:"
        "worker_port_base+N, which an agent given those ports (nova_metadata_worker_ports) "
        "spreads its pool over; 0 = none", min=0, max=65535,
    )
    unix_socket_mode: str = opt(
        "user", "Permissions of unix_socket: user (0644: only the API's user may connect), "
        "group (0664), all (0666)", choices=("user", "group", "all"),
    )
    access_log: bool = opt(
        False, "One openimds.access line per request, with the proxy's request ID "
        "(about 20 µs each; on with debug)"
    )


@dataclass(frozen=True, slots=True)
class MetadataAgentSettings:
    cache_size: int = opt(65536, "Entries in the (router|network, ip) -> instance cache", min=0)
    warm_index: bool = opt(
        True, "Keep every port's (network, ip) in memory from /v1/topology and the change "
        "feed, so a new VM's first request needs no registry lookup (about 1 KiB per port)")
    max_concurrency: int = opt(
        1024, "Requests in flight before the agent answers 503", min=1
    )
    upstream_pool_size: int = opt(64, "Keep-alive connections to the metadata API", min=1)
    upstream_pipeline_depth: int = opt(
        8, "Requests of one loop iteration written together on one pooled connection to the "
        "API (1: one at a time)", min=1, max=32)
    upstream_timeout: float = opt(60.0, "Seconds to wait for the metadata API", min=0.1)
    client_write_timeout: float = opt(
        30.0, "Seconds a client (the proxy) that does not read may leave its answers untaken "
        "(over 16 KiB unsent) before its connection is reset", min=1.0, max=3600.0,
    )
    client_keepalive_timeout: float = opt(
        30.0, "Seconds an answered keep-alive connection of a client (the proxy's pooled "
        "ones) may stay idle before it is closed", min=0.1, max=3600.0,
    )
    registry_timeout: float = opt(5.0, "Seconds to wait for the registry", min=0.1)
    registry_connections: int = opt(
        8, "Concurrent registry lookups (more only slows a sqlite registry down)", min=2
    )
    retry_after: int = opt(2, "Retry-After seconds sent with 503", min=1)
    access_log: bool = opt(True, "One openimds.access line per request (about 20 µs each)")


@dataclass(frozen=True, slots=True)
class HaproxySettings:
    """Neutron's [metadata_haproxy] timeouts, applied by our namespace proxy."""

    timeout_connect: float = opt(30.0, "Seconds to connect to the agent's socket", min=0.1)
    timeout_client: float = opt(32.0, "Seconds of client inactivity allowed", min=0.1)
    timeout_server: float = opt(32.0, "Seconds to wait for the agent's answer", min=0.1)
    timeout_http_request: float = opt(30.0, "Seconds to receive a whole request", min=0.1)
    timeout_http_keep_alive: float = opt(30.0, "Seconds an idle keep-alive may stay", min=0.1)


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Neutron's [metadata_rate_limiting], counted per instance (all its addresses) by the
    agent instead of per source IP by haproxy."""

    rate_limit_enabled: bool = opt(False, "Answer 429 to an instance over its request budget")
    ip_versions: tuple[str, ...] = opt(
        ("4",), "Address families whose requests count: 4, 6 or 4,6 (one shared budget)"
    )
    base_window_duration: float = opt(10.0, "Seconds of the base window", min=1)
    base_query_rate_limit: int = opt(10, "Requests per base window", min=1)
    burst_window_duration: float = opt(10.0, "Seconds of the burst window", min=1)
    burst_query_rate_limit: int = opt(10, "Requests per burst window", min=1)


@dataclass(frozen=True, slots=True)
class ProxySettings:
    upstream_pool_size: int = opt(64, "Keep-alive connections to the agent", min=1)
    upstream_pipeline_depth: int = opt(
        8, "Requests of one loop iteration written together on one pooled connection to the "
        "agent (1: one at a time)", min=1, max=32)
    listeners_dir: str = opt(
        "$state_path/proxy/listeners", "Directory of listener specs written by the agents"
    )
    rescan_interval: float = opt(1.0, "Seconds between listener directory scans", min=0.05)
    spawn_from_agents: bool = opt(
        True, "L3/DHCP agents start the proxy when none runs; false when up or systemd runs it"
    )
    max_connections_per_source: int = opt(
        32, "Open connections one VM address may hold per listener; more get 429 and close",
        min=1,
    )
    tarpit_delay: float = opt(
        0.25, "Seconds an over-limit or over-cap 429 is held before it is sent; 0 = at once",
        min=0, max=10,
    )
    tarpit_max_per_source: int = opt(
        128, "Answers held at once per VM address and listener; more are sent at once", min=1
    )
    tarpit_max: int = opt(4096, "Answers held at once in all; more are sent at once", min=1)
    max_header_bytes: int = opt(
        16384, "Largest request line plus headers a VM may send (431/414 beyond)", min=1024
    )
    max_body_bytes: int = opt(65536, "Largest request body a VM may send (413 beyond)", min=0)
    workers: int = opt(
        1, "Proxy worker processes, each with an SO_REUSEPORT listener in every namespace",
        min=1, max=256,
    )
    access_log: bool = opt(
        False, "One openimds.access line per request, with its request ID (a few µs each)"
    )


@dataclass(frozen=True, slots=True)
class L3Settings:
    firewall_driver: str = opt(
        "nft", "How router rules are written: nft (native) or iptables (iptables-nft)",
        choices=("nft", "iptables"),
    )
    resync_interval: float = opt(60.0, "Seconds between full resyncs with the registry", min=1)


@dataclass(frozen=True, slots=True)
class DhcpSettings:
    dnsmasq_binary: str = opt("dnsmasq", "dnsmasq executable (Debian package dnsmasq-base)")
    dhcp_confs: str = opt("$state_path/dhcp", "Where per-network dnsmasq files live")
    resync_interval: float = opt(60.0, "Seconds between full resyncs with the registry", min=1)
    dnsmasq_user: str = opt(
        "", "User dnsmasq drops to (--user); empty = its default, nobody, as under Neutron"
    )
    dnsmasq_lease_max: int = opt(2**24, "Cap on --dhcp-lease-max per network", min=1)


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """Prometheus /metrics on an operator-only listener, one port per service."""

    enabled: bool = opt(True, "Serve Prometheus metrics at /metrics on bind_host")
    bind_host: str = opt(
        "127.0.0.1", "Address of the metrics listeners (host namespace; never a VM's)"
    )
    registry_port: int = opt(9700, "Metrics port of the registry", min=1, max=65535)
    api_port: int = opt(9701, "Metrics port of the metadata API", min=1, max=65535)
    agent_port: int = opt(9702, "Metrics port of the metadata agent", min=1, max=65535)
    proxy_port: int = opt(9703, "Metrics port of the namespace proxy", min=1, max=65535)
    l3_agent_port: int = opt(9704, "Metrics port of the L3 agent", min=1, max=65535)
    dhcp_agent_port: int = opt(9705, "Metrics port of the DHCP agent", min=1, max=65535)

    def port(self, service: str) -> int:
        """The metrics port of one service (registry, api, agent, proxy, l3-agent, ...)."""
        value: int = getattr(self, service.replace("-", "_") + "_port")
        return value


@dataclass(frozen=True, slots=True)
class ProcessMonitorSettings:
    """Neutron's [AGENT] process-monitor options."""

    check_child_processes_interval: float = opt(
        1.0, "Seconds between child-process checks; 0 disables respawning", min=0
    )
    check_child_processes_action: str = opt(
        "respawn", "What to do when a child died", choices=("respawn", "exit")
    )
    report_interval: float = opt(
        2.0, "Seconds between an agent's heartbeats to the registry (keep it under "
        "agent_down_time / 3)", min=0.1
    )


@dataclass(frozen=True, slots=True)
class FabricSettings:
    """L2 between nodes: one VXLAN segment per network, as Neutron's linuxbridge agent."""

    local_ip: str = opt(
        "", "This node's tunnel (VTEP) address; empty = no VXLAN, networks stay on this host"
    )
    vxlan_group: str = opt(
        "", "Multicast group for flooding (vxlan_group); empty = unicast to flood_peers"
    )
    flood_peers: tuple[str, ...] = opt(
        (), "Tunnel addresses of the other nodes (head-end replication when no vxlan_group)"
    )
    vxlan_port: int = opt(4789, "UDP port of the VXLAN tunnels", min=1, max=65535)
    vxlan_ttl: int = opt(0, "TTL of tunnel packets; 0 = the kernel's default", min=0, max=255)


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration. [DEFAULT] options are attributes; sections are nested."""

    state_path: str = opt("/var/lib/openimds", "Where openimds keeps its state")
    debug: bool = opt(False, "Log at DEBUG, including request detail (never secrets)")
    log_file: str = opt("", "Log file; empty = stderr")
    log_format: str = opt(
        "text", "Log lines: text (key=value) or json (one object per line, fixed keys)",
        choices=("text", "json"),
    )
    metadata_proxy_shared_secret: str = opt(
        "", "HMAC key shared by the agent and the metadata API", secret=True
    )
    metadata_proxy_socket: str = opt(
        "$state_path/metadata_proxy", "Unix socket the agent listens on"
    )
    metadata_proxy_socket_mode: str = opt(
        "deduce", "Socket permissions: deduce, user (0644), group (0664), all (0666)",
        choices=("deduce", "user", "group", "all"),
    )
    metadata_proxy_user: str = opt("", "User the proxy runs as; empty = the agent's user")
    metadata_proxy_group: str = opt("", "Group the proxy runs as; empty = the agent's group")
    metadata_backlog: int = opt(4096, "listen() backlog of the agent's socket", min=1)
    metadata_workers: int = opt(
        1, "Agent worker processes sharing its socket (Neutron's option; each has its own "
        "cache and follows the change feed); with more than one, each also listens on "
        "its own metadata_proxy_socket.w<N>, which openimds' proxy spreads its pool over",
        min=1, max=256,
    )
    nova_metadata_host: str = opt("127.0.0.1", "Host of the metadata API")
    nova_metadata_port: int = opt(8775, "Port of the metadata API", min=1, max=65535)
    nova_metadata_protocol: str = opt(
        "http", "Protocol to the metadata API", choices=("http", "https")
    )
    nova_metadata_insecure: bool = opt(False, "Do not verify the metadata API's certificate")
    nova_metadata_socket: str = opt(
        "", "openimds only: the metadata API's Unix socket on this host ([api] unix_socket); "
        "when set the agent uses it instead of nova_metadata_host/port/protocol (no TLS on "
        "it); empty = TCP", unix_path=True,
    )
    nova_metadata_worker_ports: str = opt(
        "", "openimds only: the metadata API workers' own ports on nova_metadata_host, "
        "FIRST-LAST ([api] worker_port_base to worker_port_base + workers - 1); the agent "
        "spreads its pool over them, nova_metadata_port stays the fallback; empty = none "
        "(with nova_metadata_socket the workers' sockets beside it are found, no option)",
    )
    auth_ca_cert: str = opt("", "CA bundle for https to the metadata API")
    nova_client_cert: str = opt("", "Client certificate for https to the metadata API")
    nova_client_priv_key: str = opt("", "Client key for https to the metadata API")
    enable_metadata_proxy: bool = opt(True, "L3 agent serves metadata in router namespaces")
    metadata_port: int = opt(9697, "Port the router-namespace listener uses", min=1, max=65535)
    metadata_access_mark: str = opt("0x1", "Packet mark for metadata traffic (masked 0xffff)")
    enable_isolated_metadata: bool = opt(False, "Serve metadata on isolated subnets via DHCP")
    force_metadata: bool = opt(False, "Serve metadata via DHCP on every subnet")
    enable_metadata_network: bool = opt(
        False, "Router-scoped metadata on 169.254/16 metadata networks"
    )
    dhcp_lease_duration: int = opt(86400, "DHCP lease seconds; -1 = infinite", min=-1)
    metadata_ipv6_ula: bool = opt(
        False, "Also serve metadata on the routable ULA fd00:ec2::254 (AWS SDKs' IPv6 mode)"
    )
    external_pids: str = opt("$state_path/external/pids", "Pid files of spawned processes")
    host: str = opt("", "This node's name in the registry; empty = the machine's hostname")
    agent_down_time: float = opt(
        10.0, "Seconds without a heartbeat after which an agent is dead and what it serves "
        "moves to alive nodes", min=1.0
    )
    dhcp_agents_per_network: int = opt(
        1, "DHCP agents (nodes) serving each network, each with its own DHCP port and address "
        "(fewer while fewer DHCP nodes are alive)", min=1
    )

    registry: RegistrySettings = field(default_factory=RegistrySettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    metadata_agent: MetadataAgentSettings = field(default_factory=MetadataAgentSettings)
    metadata_haproxy: HaproxySettings = field(default_factory=HaproxySettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    metadata_rate_limiting: RateLimitSettings = field(default_factory=RateLimitSettings)
    l3: L3Settings = field(default_factory=L3Settings)
    dhcp: DhcpSettings = field(default_factory=DhcpSettings)
    AGENT: ProcessMonitorSettings = field(default_factory=ProcessMonitorSettings)
    fabric: FabricSettings = field(default_factory=FabricSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)

    @property
    def secret_bytes(self) -> bytes:
        return self.metadata_proxy_shared_secret.encode()

    @property
    def registry_connection(self) -> str:
        return self.registry.connection or f"sqlite:///{self.state_path}/registry.sqlite"

    @property
    def access_mark(self) -> int:
        return int(self.metadata_access_mark, 0)

    def path(self, *parts: str) -> Path:
        """A path under state_path."""
        return Path(self.state_path, *parts)


_SECTIONS: dict[str, type[Any]] = {
    "registry": RegistrySettings,
    "api": ApiSettings,
    "metadata_agent": MetadataAgentSettings,
    "metadata_haproxy": HaproxySettings,
    "proxy": ProxySettings,
    "metadata_rate_limiting": RateLimitSettings,
    "l3": L3Settings,
    "dhcp": DhcpSettings,
    "AGENT": ProcessMonitorSettings,
    "fabric": FabricSettings,
    "metrics": MetricsSettings,
}


def _fields(cls: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in _SECTIONS}


def _parse_value(cls: type[Any], f: dataclasses.Field[Any], raw: str, where: str) -> Any:
    hints = get_type_hints(cls)
    kind = hints[f.name]
    meta = f.metadata
    text = raw.strip()

    def bad(reason: str) -> ConfigError:
        shown = "***" if meta["secret"] else repr(raw)
        return ConfigError(f"{where}: value {shown} {reason}")

    value: Any
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            value = True
        elif low in ("0", "false", "no", "off"):
            value = False
        else:
            raise bad("is not a boolean (true/false)")
    elif kind is int:
        try:
            value = int(text, 0)
        except ValueError:
            raise bad("is not an integer") from None
    elif kind is float:
        try:
            value = float(text)
        except ValueError:
            raise bad("is not a number") from None
    elif kind == tuple[str, ...]:
        value = tuple(p.strip() for p in text.split(",") if p.strip())
    else:
        value = raw if meta["secret"] else text
    if meta["choices"] and value not in meta["choices"]:
        raise bad(f"is not one of {', '.join(meta['choices'])}")
    if meta["min"] is not None and value < meta["min"]:
        raise bad(f"is below the minimum {meta['min']}")
    if meta["max"] is not None and value > meta["max"]:
        raise bad(f"is above the maximum {meta['max']}")
    return value


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides one option."""
    if section == DEFAULT_SECTION:
        return f"{ENV_PREFIX}{key.upper()}"
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def _env_index() -> dict[str, tuple[str, str]]:
    index: dict[str, tuple[str, str]] = {}
    for key in _fields(Settings):
        index[env_name(DEFAULT_SECTION, key)] = (DEFAULT_SECTION, key)
    for section, cls in _SECTIONS.items():
        for key in _fields(cls):
            index[env_name(section, key)] = (section, key)
    return index


def _read_ini(path: Path) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        with path.open(encoding="utf-8") as fh:
            parser.read_file(fh)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: cannot parse: {str(exc).splitlines()[0]}") from exc
    return {s: dict(parser.items(s, raw=True)) for s in parser.sections()}


def _merge(
    layers: list[tuple[str, dict[str, dict[str, str]]]],
) -> dict[str, dict[str, tuple[str, str]]]:
    merged: dict[str, dict[str, tuple[str, str]]] = {}
    for source, data in layers:
        for section, values in data.items():
            if section != DEFAULT_SECTION and section not in _SECTIONS:
                known = ", ".join([DEFAULT_SECTION, *_SECTIONS])
                raise ConfigError(f"{source}: unknown section [{section}] (known: {known})")
            cls = Settings if section == DEFAULT_SECTION else _SECTIONS[section]
            allowed = _fields(cls)
            for key, raw in values.items():
                if key not in allowed:
                    raise ConfigError(f"{source} [{section}] {key}: unknown option")
                merged.setdefault(section, {})[key] = (raw, source)
    return merged


def load_settings(
    config_file: str | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the Settings from defaults, secrets file, INI file and environment.

    Raises ConfigError naming the file (or variable), section, key and reason.
    """
    env = os.environ if environ is None else environ
    explicit = config_file if config_file is not None else env.get("OPENIMDS_CONFIG")
    path = Path(explicit or DEFAULT_CONFIG_FILE)
    file_layer: dict[str, dict[str, str]] = {}
    if path.exists():
        file_layer = _read_ini(path)
    elif explicit:
        raise ConfigError(f"{path}: config file not found")

    env_layer: dict[str, dict[str, str]] = {}
    index = _env_index()
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_OPTIONS:
            continue
        if name not in index:
            raise ConfigError(f"environment {name}: unknown option")
        section, key = index[name]
        env_layer.setdefault(section, {})[key] = raw

    # state_path decides where the secrets file lives, so resolve it first.
    pre = _merge([(str(path), file_layer), ("environment", env_layer)])
    state_path = pre.get(DEFAULT_SECTION, {}).get("state_path", (Settings().state_path, ""))[0]
    layers: list[tuple[str, dict[str, dict[str, str]]]] = []
    secrets_file = Path(state_path.strip(), "secrets.ini")
    if secrets_file.exists():
        layers.append((str(secrets_file), _read_ini(secrets_file)))
    layers += [(str(path), file_layer), ("environment", env_layer)]
    merged = _merge(layers)

    def build(cls: type[Any], section: str) -> Any:
        kwargs: dict[str, Any] = {}
        for key, (raw, source) in merged.get(section, {}).items():
            where = f"{source} [{section}] {key}"
            if source == "environment":
                where = f"environment {env_name(section, key)}"
            f = _fields(cls)[key]
            kwargs[key] = value = _parse_value(cls, f, raw, where)
            if f.metadata["unix_path"]:
                _check_unix_path(value, value.replace("$state_path", state_path.strip()), where)
        return cls(**kwargs)

    top = build(Settings, DEFAULT_SECTION)
    sections = {name: build(cls, name) for name, cls in _SECTIONS.items()}
    settings = _interpolate(dataclasses.replace(top, **sections))
    _check_socket_paths(settings)
    return settings


def _check_unix_path(raw: str, path: str, where: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise ConfigError(f"{where}: value {raw!r} is not an absolute path")
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX or path.endswith("/"):
        why = (f"is {size} bytes long; a Unix socket path holds at most {UNIX_PATH_MAX}"
               if size > UNIX_PATH_MAX else "names a directory, not a socket file")
        raise ConfigError(f"{where}: value {raw!r} {why}")


WORKER_SOCKET_SUFFIX = ".w"


def worker_socket(path: str, index: int) -> str:
    """The socket worker `index` listens on besides the shared `path` (the agent's
    metadata_proxy_socket, the API's [api] unix_socket): `<path>.w<index>`, beside it."""
    return f"{path}{WORKER_SOCKET_SUFFIX}{index}"


def worker_sockets(path: str) -> list[str]:
    """The worker sockets (`worker_socket`) present beside `path` now, in index order; a
    file whose worker died may be among them (connecting to it is refused)."""
    folder, base = os.path.split(path)
    prefix = base + WORKER_SOCKET_SUFFIX
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    found = sorted((int(name[len(prefix):]), name) for name in names
                   if name.startswith(prefix) and name[len(prefix):].isdigit())
    return [os.path.join(folder, name) for _, name in found]


def worker_ports(text: str) -> list[int]:
    """The ports of nova_metadata_worker_ports' FIRST-LAST (or one PORT); [] when empty."""
    where = "[DEFAULT] nova_metadata_worker_ports"
    first, sep, last = text.strip().partition("-")
    if not first:
        return []
    try:
        low, high = int(first), int(last if sep else first)
    except ValueError:
        raise ConfigError(f"{where}: value {text!r} is not FIRST-LAST (e.g. 8781-8782)") from None
    if not 1 <= low <= high <= 65535:
        raise ConfigError(f"{where}: value {text!r} is not a range of ports (1-65535, "
                          "FIRST <= LAST)")
    return list(range(low, high + 1))


def _check_socket_paths(settings: Settings) -> None:
    """Socket paths that must differ: the agent would answer on the API's socket, or send
    every request back to itself. The last worker socket's path must fit, too; the workers'
    own ports must exist and not be the shared one."""
    if settings.metadata_workers > 1:
        last = worker_socket(settings.metadata_proxy_socket, settings.metadata_workers - 1)
        _check_unix_path(last, last, "[DEFAULT] metadata_proxy_socket (its worker sockets)")
    api = settings.api
    if api.workers > 1 and api.unix_socket:
        last = worker_socket(api.unix_socket, api.workers - 1)
        _check_unix_path(last, last, "[api] unix_socket (its worker sockets)")
    if api.worker_port_base:
        top = api.worker_port_base + api.workers - 1
        if top > 65535 or api.worker_port_base <= api.metadata_listen_port <= top:
            raise ConfigError(
                f"[api] worker_port_base: value {api.worker_port_base} with workers = "
                f"{api.workers} gives ports {api.worker_port_base}-{top}, which must stay "
                f"within 65535 and leave out metadata_listen_port ({api.metadata_listen_port})")
    ports = worker_ports(settings.nova_metadata_worker_ports)
    if settings.nova_metadata_port in ports:
        raise ConfigError(
            f"[DEFAULT] nova_metadata_worker_ports: value {settings.nova_metadata_worker_ports!r}"
            f" holds nova_metadata_port ({settings.nova_metadata_port}), the port every API "
            "worker shares")
    agent = os.path.normpath(settings.metadata_proxy_socket)
    for what, value in (("[api] unix_socket", settings.api.unix_socket),
                        ("[DEFAULT] nova_metadata_socket", settings.nova_metadata_socket)):
        if value and os.path.normpath(value) == agent:
            raise ConfigError(f"{what}: value {value!r} is the agent's own socket "
                              "(metadata_proxy_socket); give the metadata API another path")


def _interpolate(settings: Settings) -> Settings:
    sp = settings.state_path

    def fix(obj: Any) -> Any:
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, str) and "$state_path" in value:
                changes[f.name] = value.replace("$state_path", sp)
        return dataclasses.replace(obj, **changes) if changes else obj

    sections = {name: fix(getattr(settings, name)) for name in _SECTIONS}
    result: Settings = dataclasses.replace(fix(settings), **sections)
    if not result.host:
        result = dataclasses.replace(result, host=socket.gethostname())
    return result


def render_settings(settings: Settings, *, mask_secrets: bool = True) -> str:
    """The effective settings as INI text; secrets are shown as *** when set."""

    def section_lines(obj: Any, cls: type[Any]) -> list[str]:
        out = []
        for name, f in _fields(cls).items():
            value = getattr(obj, name)
            if f.metadata["secret"] and mask_secrets:
                shown = "***" if value else ""
            elif isinstance(value, bool):
                shown = "true" if value else "false"
            elif isinstance(value, tuple):
                shown = ",".join(value)
            else:
                shown = str(value)
            out.append(f"{name} = {shown}".rstrip())
        return out

    lines = [f"[{DEFAULT_SECTION}]", *section_lines(settings, Settings)]
    for name, cls in _SECTIONS.items():
        lines += ["", f"[{name}]", *section_lines(getattr(settings, name), cls)]
    return "\n".join(lines) + "\n"


def settings_as_dict(settings: Settings, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The effective settings as nested plain data (for `-f json`)."""

    def one(obj: Any, cls: type[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, f in _fields(cls).items():
            value = getattr(obj, name)
            if f.metadata["secret"] and mask_secrets:
                value = "***" if value else ""
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    result = {DEFAULT_SECTION: one(settings, Settings)}
    for name, cls in _SECTIONS.items():
        result[name] = one(getattr(settings, name), cls)
    return result
