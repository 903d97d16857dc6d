"""Vendor data, as Nova's StaticJSON and DynamicJSON providers (nova/api/metadata/vendordata*).

- StaticJSON: the JSON object in `[api] vendordata_jsonfile_path` (empty path = `{}`), read
  once at start. A missing or invalid file is a configuration error at start (Nova answers
  500 on every request instead).
- DynamicJSON: each `name@url` target in `[api] vendordata_dynamic_targets` (a repeated name
  is skipped, as Nova does) is POSTed the instance's facts as JSON (`project-id`,
  `instance-id`, `image-id`, `user-data`, `hostname`, `metadata`, `boot-roles`) and answers a
  JSON document. `vendor_data2.json` is `{"static": <StaticJSON>, "<name>": <answer>, ...}`;
  a key colliding with an earlier one is dropped.
- Unlike Nova (which POSTs on every request), answers are cached per (target, request body)
  for the target's `Cache-Control: max-age` (`no-store`/`no-cache` = not cached), else
  `vendordata_dynamic_cache_ttl` seconds; concurrent misses for the same key share one POST.
  A failing target (connect/read timeout, non-2xx, non-JSON) counts as `{}` and is not cached,
  unless `vendordata_dynamic_failure_fatal`, which fails the request (`UpstreamError`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from openimds.config import ApiSettings
from openimds.core.metadata.view import View
from openimds.errors import ConfigError, UpstreamError

log = logging.getLogger(__name__)

__all__ = ["VendorData", "cache_ttl", "load_static", "parse_targets"]

STATIC = "StaticJSON"
DYNAMIC = "DynamicJSON"
USER_AGENT = "openstack-nova-vendordata"
MAX_CACHED = 10000
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)


def load_static(api: ApiSettings) -> dict[str, Any] | None:
    """The StaticJSON dict, or None when StaticJSON is not a provider."""
    if STATIC not in api.vendordata_providers:
        return None
    if not api.vendordata_jsonfile_path:
        return {}
    path = Path(api.vendordata_jsonfile_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"[api] vendordata_jsonfile_path {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"[api] vendordata_jsonfile_path {path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"[api] vendordata_jsonfile_path {path}: not a JSON object")
    return data


def parse_targets(api: ApiSettings) -> list[tuple[str, str]]:
    """(name, url) of each dynamic target; [] when DynamicJSON is not a provider."""
    if DYNAMIC not in api.vendordata_providers:
        return []
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for spec in api.vendordata_dynamic_targets:
        name, sep, url = spec.partition("@")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"[api] vendordata_dynamic_targets: {spec!r} is not name@http(s)://...")
        if name in seen:
            log.warning("vendordata.duplicate_target name=%s", name)
            continue
        seen.add(name)
        out.append((name, url))
    return out


def cache_ttl(cache_control: str | None, default_s: float) -> float:
    """Seconds to keep an answer: from Cache-Control, else the default."""
    if cache_control is None:
        return default_s
    low = cache_control.lower()
    if "no-store" in low or "no-cache" in low:
        return 0.0
    match = _MAX_AGE.search(cache_control)
    if match:
        return float(match.group(1))
    return default_s


def request_body(view: View) -> bytes:
    return json.dumps({
        "project-id": view.project_id,
        "instance-id": view.id,
        "image-id": view.image_id,
        "user-data": base64.b64encode(view.user_data).decode() if view.user_data else None,
        "hostname": view.hostname,
        "metadata": dict(view.metadata),
        "boot-roles": "",
    }).encode()


class VendorData:
    """Builds vendor_data2.json with dynamic targets; owns the HTTP client and the cache."""

    def __init__(
        self, api: ApiSettings, *, transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.static = load_static(api)
        self.targets = parse_targets(api)
        self._fatal = api.vendordata_dynamic_failure_fatal
        self._default_ttl = api.vendordata_dynamic_cache_ttl
        self._clock = clock
        self._cache: OrderedDict[tuple[str, bytes], tuple[float, Any]] = OrderedDict()
        self._inflight: dict[tuple[str, bytes], asyncio.Future[Any]] = {}
        self._http: httpx.AsyncClient | None = None
        if self.targets:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(api.vendordata_dynamic_read_timeout,
                                      connect=api.vendordata_dynamic_connect_timeout),
                transport=transport, trust_env=False, follow_redirects=False,
                headers={"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": USER_AGENT},
            )

    @property
    def dynamic(self) -> bool:
        return bool(self.targets)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def document(self, view: View, static: Mapping[str, Any] | None) -> dict[str, Any]:
        """The vendor_data2.json dict for one instance."""
        result: dict[str, Any] = {}
        if static is not None:
            result["static"] = dict(static)
        body = request_body(view)
        answers = await asyncio.gather(*(self._target(n, u, body) for n, u in self.targets))
        for (name, _url), answer in zip(self.targets, answers, strict=True):
            if name in result:
                log.warning("vendordata.duplicate_key key=%s", name)
                continue
            result[name] = answer
        return result

    async def _target(self, name: str, url: str, body: bytes) -> Any:
        key = (name, hashlib.sha256(body).digest())
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        running = self._inflight.get(key)
        if running is not None:
            return await asyncio.shield(running)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            value, ttl = await self._fetch(name, url, body)
            if ttl > 0:
                self._cache[key] = (self._clock() + ttl, value)
                while len(self._cache) > MAX_CACHED:
                    self._cache.popitem(last=False)
            fut.set_result(value)
            return value
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # consumed here; waiters get it through shield
            raise
        finally:
            del self._inflight[key]

    async def _fetch(self, name: str, url: str, body: bytes) -> tuple[Any, float]:
        assert self._http is not None
        try:
            resp = await self._http.post(url, content=body)
            if not 200 <= resp.status_code < 300:
                raise ValueError(f"HTTP {resp.status_code}")
            value = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("vendordata.target_failed name=%s url=%s error=%s", name, url, exc)
            if self._fatal:
                raise UpstreamError(f"vendordata target {name} failed: {exc}") from None
            return {}, 0.0
        return value, cache_ttl(resp.headers.get("cache-control"), self._default_ttl)
