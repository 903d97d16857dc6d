"""Clients of the registry REST API: `RegistryClient` (sync, the CLI) and
`AsyncRegistryClient` (agents). Both speak httpx with a bearer token from settings.

Error answers become `openimds.errors` classes (400 BadRequest, 401 Unauthorized,
403 Forbidden, 404 NotFound, 409 Conflict, 410 ResyncRequired (a Gone carrying the current
revision)); no connection becomes UpstreamUnavailable, no answer in time UpstreamTimeout.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx

from openimds.config import RegistrySettings
from openimds.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    OpenImdsError,
    Unauthorized,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

__all__ = ["AsyncRegistryClient", "RegistryClient", "ResyncRequired"]

DEFAULT_TIMEOUT_S = 10.0


def _write_timeout(timeout_s: float, settings: Any = None) -> float:
    """A write that re-binds an address released moments before is answered only after the
    registry's reuse hold (registry/reuse.py): writes wait that much longer than reads, or a
    create that committed would be reported as failed. Without settings, the default hold."""
    registry = getattr(settings, "registry", None) or RegistrySettings()
    return timeout_s + float(registry.reuse_hold)
# Plural path segment of each resource kind.
PLURAL = {
    "project": "projects", "network": "networks", "subnet": "subnets", "router": "routers",
    "port": "ports", "keypair": "keypairs", "instance": "instances", "host": "hosts",
}


class ResyncRequired(Gone):
    """410 from the change feed: reload everything, then follow from `revision`."""

    def __init__(self, reason: str, revision: int) -> None:
        super().__init__(reason)
        self.revision = revision


_STATUS: dict[int, type[OpenImdsError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    413: BadRequest,
}


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
    except (json.JSONDecodeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    reason = str(body.get("reason") or f"registry answered HTTP {resp.status_code}")
    if resp.status_code == 410:
        raise ResyncRequired(reason, int(body.get("revision") or 0))
    cls = _STATUS.get(resp.status_code)
    if cls is None:
        if resp.status_code >= 500:
            raise UpstreamProtocolError(f"registry answered HTTP {resp.status_code}: {reason}")
        cls = OpenImdsError
    raise cls(reason)


def _unsent(cause: Exception, err: UpstreamError) -> UpstreamError:
    """`err`, marked not sent when no connection was made (refused, or the connect timed
    out): the registry cannot have recorded a request it never received."""
    if isinstance(cause, httpx.ConnectError | httpx.ConnectTimeout):
        err.sent = False
    return err


def _decode(resp: httpx.Response) -> Any:
    _raise_for(resp)
    if not resp.content:
        return {}
    try:
        return resp.json()
    except (json.JSONDecodeError, ValueError):
        raise UpstreamProtocolError(
            f"registry answered HTTP {resp.status_code} with non-JSON body") from None


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _settings_args(settings: Any, admin: bool) -> tuple[str, str]:
    reg = settings.registry
    token = reg.admin_token if admin else (reg.reader_token or reg.admin_token)
    return reg.effective_url, token


def _clean(params: dict[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None}


def _lookup_params(ip: str, router_id: str | None, network_id: str | None) -> dict[str, Any]:
    return {"ip": ip, "router_id": router_id, "network_id": network_id}


def _verify(base_url: str) -> ssl.SSLContext | bool:
    """TLS verification for the registry's URL. Over plain http a context with no CA loaded:
    httpx would otherwise load the CA bundle (~50 ms of every service's start, profiled;
    bench/restart_bench.py) for a TLS it never does; a redirect to https fails to verify
    (no CA), it never goes unverified."""
    if base_url.startswith("http://"):
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return True


class RegistryClient:
    """Synchronous client (CLI, tests)."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None,
                 write_timeout_s: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.write_timeout_s = (write_timeout_s if write_timeout_s is not None
                                else _write_timeout(timeout_s))
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(token),
                                  timeout=timeout_s, transport=transport, trust_env=False,
                                  verify=_verify(self.base_url))

    @classmethod
    def from_settings(cls, settings: Any, *, admin: bool,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> RegistryClient:
        url, token = _settings_args(settings, admin)
        return cls(url, token, timeout_s=timeout_s,
                   write_timeout_s=_write_timeout(timeout_s, settings))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        if timeout_s is None:
            timeout_s = self.timeout_s if method == "GET" else self.write_timeout_s
        try:
            resp = self._http.request(
                method, path, json=json, params=_clean(params), timeout=timeout_s)
        except httpx.TimeoutException as exc:
            raise _unsent(exc, UpstreamTimeout(
                f"registry {self.base_url} did not answer: {exc}")) from None
        except httpx.TransportError as exc:
            raise _unsent(exc, UpstreamUnavailable(
                f"registry {self.base_url} unreachable: {exc}")) from None
        return _decode(resp)

    # --- the calls other components use
    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/health")
        return result

    def get_view(self, instance_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/instances/{instance_id}/view")
        return result

    def lookup(self, ip: str, *, router_id: str | None = None,
               network_id: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", "/v1/lookup", params=_lookup_params(ip, router_id, network_id))
        return result

    def topology(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/v1/topology")
        return result

    def changes(self, since: int, wait: float = 0, limit: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET", "/v1/changes", params={"since": since, "wait": wait, "limit": limit},
            timeout_s=self.timeout_s + wait)
        return result

    def heartbeat(self, host: str, agent_type: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", "/v1/agents", json={"host": host, "type": agent_type})
        return result

    def set_password(self, instance_id: str, password: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/instances/{instance_id}/password", json={"password": password})
        return result

    def get_password(self, instance_id: str) -> str | None:
        pw = self.request("GET", f"/v1/instances/{instance_id}/password")["password"]
        return None if pw is None else str(pw)

    # --- generic CRUD
    def create(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", f"/v1/{PLURAL[kind]}", json=body)
        return result

    def get(self, kind: str, obj_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/v1/{PLURAL[kind]}/{obj_id}")
        return result

    def delete(self, kind: str, obj_id: str) -> None:
        self.request("DELETE", f"/v1/{PLURAL[kind]}/{obj_id}")

    def update(self, kind: str, obj_id: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.request("PATCH", f"/v1/{PLURAL[kind]}/{obj_id}",
                                              json=body)
        return result

    def list(self, kind: str, **filters: Any) -> list[dict[str, Any]]:
        """Every object of a kind matching the filters, following pagination."""
        plural = PLURAL[kind]
        out: list[dict[str, Any]] = []
        marker = None
        while True:
            page = self.request("GET", f"/v1/{plural}", params={**filters, "marker": marker})
            out.extend(page[plural])
            marker = page.get("next")
            if not marker:
                return out

    def add_interface(self, router_id: str, subnet_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", f"/v1/routers/{router_id}/add_interface", json={"subnet_id": subnet_id})
        return result

    def remove_interface(self, router_id: str, subnet_id: str) -> None:
        self.request("POST", f"/v1/routers/{router_id}/remove_interface",
                     json={"subnet_id": subnet_id})

    def create_network(self, name: str, **body: Any) -> dict[str, Any]:
        return self.create("network", {"name": name, **_clean(body)})  # type: ignore[dict-item]

    def create_subnet(self, name: str, network_id: str, cidr: str, **body: Any) -> dict[str, Any]:
        return self.create("subnet", {"name": name, "network_id": network_id, "cidr": cidr,
                                      **body})

    def create_router(self, name: str, **body: Any) -> dict[str, Any]:
        return self.create("router", {"name": name, **_clean(body)})  # type: ignore[dict-item]

    def create_instance(self, name: str, network_id: str, **body: Any) -> dict[str, Any]:
        return self.create("instance", {"name": name, "network_id": network_id,
                                        **_clean(body)})  # type: ignore[dict-item]


class AsyncRegistryClient:
    """Asynchronous client (metadata API, agents)."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.AsyncBaseTransport | None = None,
                 max_connections: int = 32, write_timeout_s: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.write_timeout_s = (write_timeout_s if write_timeout_s is not None
                                else _write_timeout(timeout_s))
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(token), timeout=timeout_s,
            transport=transport, trust_env=False, verify=_verify(self.base_url),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))

    @classmethod
    def from_settings(cls, settings: Any, *, admin: bool,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> AsyncRegistryClient:
        url, token = _settings_args(settings, admin)
        return cls(url, token, timeout_s=timeout_s,
                   write_timeout_s=_write_timeout(timeout_s, settings))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None,
                      timeout_s: float | None = None) -> Any:
        if timeout_s is None:
            timeout_s = self.timeout_s if method == "GET" else self.write_timeout_s
        try:
            resp = await self._http.request(
                method, path, json=json, params=_clean(params), timeout=timeout_s)
        except httpx.TimeoutException as exc:
            raise _unsent(exc, UpstreamTimeout(
                f"registry {self.base_url} did not answer: {exc}")) from None
        except httpx.TransportError as exc:
            raise _unsent(exc, UpstreamUnavailable(
                f"registry {self.base_url} unreachable: {exc}")) from None
        return _decode(resp)

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/health")
        return result

    async def get_view(self, instance_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/instances/{instance_id}/view")
        return result

    async def lookup(self, ip: str, *, router_id: str | None = None,
                     network_id: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "GET", "/v1/lookup", params=_lookup_params(ip, router_id, network_id))
        return result

    async def topology(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/topology")
        return result

    async def changes(self, since: int, wait: float = 0,
                      limit: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "GET", "/v1/changes", params={"since": since, "wait": wait, "limit": limit},
            timeout_s=self.timeout_s + wait)
        return result

    async def heartbeat(self, host: str, agent_type: str,
                        timeout_s: float | None = None) -> dict[str, Any]:
        """Report (host, agent_type) alive; the answer carries the registry's
        agent_down_time. A beat never waits for an IP's reuse hold, so it gets the read
        timeout, not a write's (which adds the 30 s hold: a beat that slow is worthless)."""
        result: dict[str, Any] = await self.request(
            "POST", "/v1/agents", json={"host": host, "type": agent_type},
            timeout_s=self.timeout_s if timeout_s is None else timeout_s)
        return result

    async def set_password(self, instance_id: str, password: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "POST", f"/v1/instances/{instance_id}/password", json={"password": password})
        return result

    async def get_password(self, instance_id: str) -> str | None:
        body = await self.request("GET", f"/v1/instances/{instance_id}/password")
        pw = body["password"]
        return None if pw is None else str(pw)

    async def create(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", f"/v1/{PLURAL[kind]}", json=body)
        return result

    async def get(self, kind: str, obj_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/{PLURAL[kind]}/{obj_id}")
        return result

    async def delete(self, kind: str, obj_id: str) -> None:
        await self.request("DELETE", f"/v1/{PLURAL[kind]}/{obj_id}")

    async def list(self, kind: str, **filters: Any) -> list[dict[str, Any]]:
        plural = PLURAL[kind]
        out: list[dict[str, Any]] = []
        marker = None
        while True:
            page = await self.request("GET", f"/v1/{plural}",
                                      params={**filters, "marker": marker})
            out.extend(page[plural])
            marker = page.get("next")
            if not marker:
                return out
