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

Prewarming (`plan_refresh`, `PrewarmQueue`): the API fetches an instance's view again, in the
background, before anyone asks, when
- the instance was created (a VM boots seconds after its instance is created);
- a change touched an instance the API holds, is fetching or already means to fetch;
- never when the instance was deleted (in the same batch or earlier): it is only dropped.
Instances the API never held are not fetched on their updates (a big cloud's idle instances
would otherwise cost one view per change). The queue coalesces (an instance queued twice is
fetched once), keeps feed-driven work ahead of a resync's backfill, and holds at most `limit`
instances (the cache size: prewarming more would only evict what was prewarmed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from openimds.core.metadata.view import View

__all__ = ["DependencyIndex", "PrewarmQueue", "RefreshPlan", "plan_refresh"]

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


@dataclass(frozen=True, slots=True)
class RefreshPlan:
    """What one feed batch means for the cache."""

    invalidate: frozenset[str]  # drop from the cache; fetches in flight must not be kept
    refresh: tuple[str, ...]  # fetch again in the background, in this order, each once
    deleted: frozenset[str]  # deleted: dropped and unqueued, never fetched


def plan_refresh(changes: Iterable[Mapping[str, Any]], index: DependencyIndex,
                 known: Container[str]) -> RefreshPlan:
    """`known`: instances the API holds, is fetching or has queued (the index only holds
    cached ones)."""
    invalidate: set[str] = set()
    refresh: dict[str, None] = {}
    deleted: set[str] = set()
    for change in changes:
        affected = index.affected(change)
        invalidate |= affected
        if change.get("kind") == "instance":
            iid = str(change.get("id"))
            op = change.get("op")
            if op == "delete":
                deleted.add(iid)
                refresh.pop(iid, None)
                continue
            if op == "create":
                refresh[iid] = None
        for iid in affected:
            if iid not in deleted and (iid in known or iid in refresh):
                refresh.pop(iid, None)
                refresh[iid] = None  # the latest change decides the order
    return RefreshPlan(frozenset(invalidate), tuple(refresh), frozenset(deleted))


class PrewarmQueue:
    """Instances to fetch ahead of their first request: FIFO, coalesced, bounded; `low`
    entries (a resync's backfill) wait until no feed-driven entry is left."""

    def __init__(self, limit: int) -> None:
        self.limit = max(0, limit)
        self._high: dict[str, None] = {}
        self._low: dict[str, None] = {}
        self.dropped = 0  # entries pushed out by the bound

    def __len__(self) -> int:
        return len(self._high) + len(self._low)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._high or instance_id in self._low

    def push(self, instance_id: str, *, low: bool = False) -> None:
        if instance_id in self._high:
            return
        if low:
            if instance_id in self._low:
                return
            self._low[instance_id] = None
        else:
            self._low.pop(instance_id, None)
            self._high[instance_id] = None
        while len(self) > self.limit:
            older = self._low or self._high
            del older[next(iter(older))]
            self.dropped += 1

    def discard(self, instance_id: str) -> None:
        self._high.pop(instance_id, None)
        self._low.pop(instance_id, None)

    def pop(self) -> str | None:
        for tier in (self._high, self._low):
            if tier:
                instance_id = next(iter(tier))
                del tier[instance_id]
                return instance_id
        return None

    def clear(self) -> None:
        self._high.clear()
        self._low.clear()
