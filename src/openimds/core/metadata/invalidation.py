"""Which cached instances a registry change touches (the change feed's rows, see
docs/architecture.md "Change feed"). Pure bookkeeping over the views we hold.

- instance X (any op, incl. a password set): X;
- key pair K: instances whose view uses K, and instances in K's project whose key_name is
  K's name (a pair created after the instance, or re-created);
- port P: its device (attrs.device_id) and any cached instance that holds P; a non-instance
  port (router interface, DHCP) changes `isolated`/`dhcp_ip` of its subnets: every cached
  instance on its network;
- subnet S: cached instances with a port on S, and on its network;
- network N: cached instances with a port on N;
- project, router: nothing (router interfaces arrive as port changes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from openimds.core.metadata.view import View

__all__ = ["DependencyIndex"]

_INSTANCE_OWNER_PREFIX = "compute:"


class DependencyIndex:
    """Reverse index from registry objects to the cached instances that depend on them."""

    def __init__(self) -> None:
        self._deps: dict[str, list[tuple[str, Any]]] = {}
        self._by: dict[tuple[str, Any], set[str]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self._deps)

    def add(self, view: View) -> None:
        self.remove(view.id)
        keys: list[tuple[str, Any]] = []
        if view.keypair_id:
            keys.append(("keypair", view.keypair_id))
        if view.keypair is not None and view.keypair.id:
            keys.append(("keypair", view.keypair.id))
        if view.key_name:
            keys.append(("keyname", (view.project_id, view.key_name)))
        for port in view.ports:
            keys.append(("port", port.id))
            keys.append(("network", port.network_id))
            keys += [("subnet", s.id) for s in port.subnets]
        for key in keys:
            self._by[key].add(view.id)
        self._deps[view.id] = keys

    def remove(self, instance_id: str) -> None:
        for key in self._deps.pop(instance_id, ()):
            holders = self._by.get(key)
            if holders is not None:
                holders.discard(instance_id)
                if not holders:
                    del self._by[key]

    def _get(self, kind: str, ident: Any) -> set[str]:
        return set(self._by.get((kind, ident), ()))

    def affected(self, change: Mapping[str, Any]) -> set[str]:
        """Instance ids whose documents a change may alter."""
        kind = change.get("kind")
        ident = change.get("id")
        attrs: Mapping[str, Any] = change.get("attrs") or {}
        out: set[str] = set()
        if kind == "instance":
            out.add(str(ident))
        elif kind == "keypair":
            out |= self._get("keypair", ident)
            name = attrs.get("name")
            if name is not None:
                out |= self._get("keyname", (attrs.get("project_id"), name))
        elif kind == "port":
            out |= self._get("port", ident)
            device = attrs.get("device_id")
            if device:
                out.add(str(device))
            owner = str(attrs.get("device_owner") or "")
            if not owner.startswith(_INSTANCE_OWNER_PREFIX) and attrs.get("network_id"):
                out |= self._get("network", attrs["network_id"])
        elif kind == "subnet":
            out |= self._get("subnet", ident)
            if attrs.get("network_id"):
                out |= self._get("network", attrs["network_id"])
        elif kind == "network":
            out |= self._get("network", ident)
        return out
