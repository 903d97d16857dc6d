"""Node roles: which services `openimds up --role ROLE` runs on this machine.

    controller   registry + metadata API                 (the control plane)
    network      agent + proxy + L3 agent + DHCP agent   (routers, DHCP, metadata path)
    compute      L2 agent                                (bridges VMs are plugged into)
    all          controller + network, one machine       (the default, as before)

Roles combine (`--role controller --role network`). A node without the controller role
reaches the registry and the metadata API by URL from its config (`[registry] url`,
`nova_metadata_host`), so it must be given the tokens and the shared secret the controller
uses: `up` generates them only where the registry runs (`secrets.ini`), and refuses to start
a node that lacks them instead of inventing ones the controller would reject.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence

from openimds.config import Settings
from openimds.errors import ConfigError

ROLE_CHOICES = ("all", "controller", "network", "compute")
# Services by role, each in the start order `up` uses (openimds.node.up.SERVICES names).
ROLE_SERVICES: dict[str, tuple[str, ...]] = {
    "controller": ("registry", "api"),
    "network": ("agent", "proxy", "l3-agent", "dhcp-agent"),
    "compute": ("l2-agent",),
}
ROLE_SERVICES["all"] = ROLE_SERVICES["controller"] + ROLE_SERVICES["network"]
START_ORDER = ("registry", "api", "agent", "proxy", "l3-agent", "dhcp-agent", "l2-agent")


def services_for(roles: Iterable[str]) -> list[str]:
    """The service names to run for these roles, in start order (no duplicates)."""
    wanted: set[str] = set()
    for role in roles:
        if role not in ROLE_SERVICES:
            raise ConfigError(f"--role {role!r}: expected one of {', '.join(ROLE_CHOICES)}")
        wanted.update(ROLE_SERVICES[role])
    return [name for name in START_ORDER if name in wanted]


def runs_registry(roles: Sequence[str]) -> bool:
    return "registry" in services_for(roles)


def check_remote_settings(settings: Settings, roles: Sequence[str]) -> None:
    """A node without the registry must be told where it is and how to talk to it."""
    services = services_for(roles)
    if "registry" in services:
        return
    reg = settings.registry
    if not reg.url:
        raise ConfigError("[registry] url: empty, but this node does not run the registry "
                          f"(--role {','.join(roles)}); set it to the controller's registry "
                          "URL, e.g. http://controller:9696")
    if not (reg.reader_token or reg.admin_token):
        raise ConfigError("[registry] reader_token: empty; copy the controller's (from its "
                          "$state_path/secrets.ini)")
    if "agent" in services and not settings.metadata_proxy_shared_secret:
        raise ConfigError("[DEFAULT] metadata_proxy_shared_secret: empty; copy the "
                          "controller's (the metadata API checks the agent's signatures)")
    if "agent" in services and "api" not in services and settings.nova_metadata_host in (
            "127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"[DEFAULT] nova_metadata_host: {settings.nova_metadata_host!r}, but "
                          "this node does not run the metadata API; set it to the controller")


def api_socket_warning(settings: Settings, roles: Sequence[str]) -> str | None:
    """One line for `up` to print when `[DEFAULT] nova_metadata_socket` is set on a node
    whose roles run the agent but not the metadata API and no socket is at that path: while
    it is set the agent sends every request there, not to nova_metadata_host (on a node
    with the API, `up` itself points it at `$state_path/api.sock`). None: nothing to say."""
    path = settings.nova_metadata_socket
    services = services_for(roles)
    if not path or "api" in services or "agent" not in services:
        return None
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return None  # something local listens there (a relay to the controller's API)
        what = "is not a socket"
    except FileNotFoundError:
        what = "does not exist"
    except OSError as exc:
        what = f"cannot be read ({exc.strerror})"
    return (f"warning: [DEFAULT] nova_metadata_socket = {path} {what}, and this node does not "
            f"run the metadata API (--role {','.join(roles)}): the agent sends its requests "
            "there, not to nova_metadata_host, and they fail until something listens on it; "
            "unset it to reach the API at nova_metadata_host:nova_metadata_port")
