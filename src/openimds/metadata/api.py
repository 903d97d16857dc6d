"""The metadata API (`openimds api`): Nova's side of the metadata path, on the lean HTTP layer.

Rules:
- Identity comes only from the agent's headers, checked in Nova's order and with Nova's
  messages: X-Instance-ID, X-Instance-ID-Signature, X-Tenant-ID missing -> 400; a signature
  that is not the lowercase hex HMAC-SHA256 of the instance id -> 403 (constant-time
  compare, an empty secret still signs); unknown instance or another tenant -> 404.
  X-Forwarded-For is read only for the `local-ipv4` fallback. `GET /` needs no identity.
- Documents come from `core.metadata`, built from one registry view per instance
  (`get_view`, single-flight per instance, cancelled requests do not cancel it) and kept as
  serialized bytes with an ETag until the change feed says the instance changed
  (`apply_batch`; a resync drops everything). A cache hit is answered synchronously, from
  pre-encoded bytes for keep-alive GETs. While the feed is down, cached documents keep being
  served (every write goes through the registry; the follower's resync after an outage drops
  them); a miss then answers 503 with Retry-After.
- Prewarming (`[api] prewarm_concurrency` background fetches, 0 = off): when the feed reports
  an instance created, or a change to an instance we hold or are fetching, its view is fetched
  again in the background instead of only dropped (`core.metadata.invalidation.plan_refresh`),
  through the same single-flight, so a VM's first request is a cache hit; a prewarmed
  instance also gets the kept answers to cloud-init's boot paths (`BOOT_PATHS`), so its
  boot requests take the hit path from the first one. Deleted instances
  are dropped, never fetched. A fetch overtaken by a newer change is not kept (the flight is
  marked stale, the next fetch starts a new flight, and the instance is queued again); a
  request never joins a stale flight. A resync (and the first batch) re-queues the instances
  that were cached, behind feed-driven work; the API does not list the registry at startup:
  instances created from then on are prewarmed as they are created, older ones are fetched
  on their first request as before.
- Methods: GET/HEAD everywhere, POST on `password`, PUT on `/latest/api/token`; anything else
  is 405 with Allow. GET never writes.
- IMDSv2 (`core.metadata.tokens`): a token header (AWS's or Firecracker's name), when
  present, must be valid for the caller's instance (else 401 saying why: malformed, expired,
  another instance's); with `[api] imds_tokens = required` the EC2 tree needs one, with
  `[api] openstack_tokens = required` the OpenStack tree (cloud-init's OpenStack datasource
  sends none, so requiring EC2 tokens never locks it out). A token PUT that shows signs of a
  forwarding proxy inside the guest is refused with 403, a PUT to a versioned token path
  (`/2021-03-23/api/token`) with 403, other methods on the token path get 405.
- `[api] required_header` ("Name: value"): a request without it gets 403 naming it.
- Signed identity (`core.metadata.identity`): `/latest/dynamic/instance-identity/` and
  `GET /openstack/latest/identity?audience=AUD` (an RS256 JWT, memoised per instance and
  audience for a few minutes so a guest cannot make us sign per request).
- Change notification (GCE's): `?wait_for_change=true&last_etag=E&timeout_sec=N` on any
  document or EC2 directory answers at once when the ETag differs, else holds until the
  instance changes (the change feed wakes the waiters, which fetch the view once between
  them) or the timeout passes (`[api] max_wait_timeout` caps it). At most
  `[api] max_waits_per_instance` held per instance (429 beyond). A held request is a parked
  future and a timer: no CPU while it waits. `?recursive=true&alt=json` on an EC2 path
  answers the subtree as one JSON object.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime
import hmac
import ipaddress
import logging
import os
import ssl
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol
from urllib.parse import parse_qs

from openimds.config import Settings
from openimds.core.metadata import (
    AddressLeaf,
    Document,
    DocumentOptions,
    DynamicVendorTarget,
    InstanceDocuments,
    PasswordTarget,
    SeededDocument,
    View,
    normalize_path,
    parse_view,
    root_document,
)
from openimds.core.metadata.identity import IdentitySigner, identity_claims
from openimds.core.metadata.invalidation import DependencyIndex, PrewarmQueue, plan_refresh
from openimds.core.metadata.listing import JSON, TEXT, etag_of
from openimds.core.metadata.openstack import dump
from openimds.core.metadata.tokens import (
    FC_TOKEN_HEADER,
    FC_TTL_HEADER,
    TOKEN_HEADER,
    TTL_HEADER,
    check_token,
    derive_key,
    forwarded_by_guest,
    mint_token,
    parse_ttl,
)
from openimds.core.signing import sign_instance_id
from openimds.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    NotFound,
    OpenImdsError,
    UpstreamError,
)
from openimds.http.server import (
    Abandonable,
    AnyResponse,
    RawResponse,
    Request,
    Response,
    error_response,
)
from openimds.log import access_line
from openimds.metadata.vendordata import VendorData
from openimds.metrics import HopStats, Metric, counter, gauge

log = logging.getLogger(__name__)

__all__ = ["MetadataApi", "Registry"]

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path, not a secret
PASSWORD_MAX = 1020  # Nova: 4 chunks of 255 characters
SEED_BYTES = 512
SEED_BATCH = 128  # random_seeds drawn at once (64 KiB)
RECENT_CHANGES = 4096
PATH_MEMO = 4096
MEMO_KEY_MAX = 128  # longer paths / ids are not memoised (bounds the memos' memory)
# Kept answers (the hit path) per instance: how many, how many bytes in all, and only small
# ones (a large user-data would otherwise be held twice per path alias). cloud-init's boot
# paths are 26 answers, 4.4 KiB in all for the unit tests' instance (a 4 KiB user-data and
# as much metadata add ~8); past a bound an answer is not kept and the full path answers
# it. Worst case ~30 KiB per cached instance with its dicts (docs/benchmarks.md).
WIRE_MAX_DOCS = 64
WIRE_MAX_BYTES = 24576
WIRE_MAX_BODY = 4096
WIRE_MAX_WHO = 4  # distinct identity header spellings kept per instance
SIGNATURE_MEMO = 65536
# Kept answers shared between instances, one copy of each: how many, how many bytes (the
# table may hold answers no instance keeps any more until it is cleared, when full).
SHARED_ANSWERS = 4096
SHARED_BYTES = 1 << 20
_WANTED = frozenset({b"x-instance-id", b"x-instance-id-signature", b"x-tenant-id",
                     TOKEN_HEADER, FC_TOKEN_HEADER, b"if-none-match"})
_GET_HEAD = ("GET", "HEAD")
_ALLOW_READ = "GET, HEAD"
_ALLOW_PASSWORD = "GET, HEAD, POST"  # noqa: S105
_ALLOW_TOKEN = "PUT"  # noqa: S105
_TTL_RESPONSE_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
_FC_TTL_RESPONSE_HEADER = "X-metadata-token-ttl-seconds"
TOKEN_SUFFIX = "/api/token"  # noqa: S105
IDENTITY_PATH = "/openstack/latest/identity"
JWT_MEMO_S = 300  # a JWT is re-used this long (it still has >= 55 minutes to live)
JWT_MEMO_MAX = 65536
AUDIENCE_MAX = 512


class _Seeds:
    """random_seed values: base64 of SEED_BYTES random bytes, fresh in every answer.

    Sliced from a buffer of OpenSSL's CSPRNG (RAND_bytes: its AES-CTR DRBG, seeded from the
    kernel, reseeded after a fork) drawn 128 seeds at a time: the kernel's getrandom costs
    ~1.1 us per 512 bytes here, a 64 KiB draw ~0.07 per 512 (docs/benchmarks.md). No byte
    is used twice, and a forked child drops what its parent drew (`_after_fork`)."""

    __slots__ = ("__weakref__", "_buf", "_left")

    def __init__(self) -> None:
        self._buf = b""
        self._left = 0  # seeds not yet taken from _buf, taken from its end
        _SEED_SOURCES.add(self)

    def take(self) -> bytes:
        left = self._left
        if not left:
            self._buf = ssl.RAND_bytes(SEED_BYTES * SEED_BATCH)
            left = SEED_BATCH
        self._left = left = left - 1
        at = left * SEED_BYTES
        return binascii.b2a_base64(self._buf[at:at + SEED_BYTES], newline=False)

    def clear(self) -> None:
        self._buf, self._left = b"", 0


_SEED_SOURCES: weakref.WeakSet[_Seeds] = weakref.WeakSet()


def _after_fork() -> None:
    for seeds in list(_SEED_SOURCES):  # two workers must never answer the same seed
        seeds.clear()


os.register_at_fork(after_in_child=_after_fork)


class Registry(Protocol):
    async def get_view(self, instance_id: str) -> dict[str, Any]: ...

    async def set_password(self, instance_id: str, password: str) -> dict[str, Any]: ...


# Whose kept answers (`MetadataApi._hot`, a table per path): X-Instance-ID, X-Tenant-ID
# and X-Instance-ID-Signature as the request carries them, NUL-joined (a header value never
# holds NUL: the parser refuses it, so the two NULs say the three apart).
_NUL = b"\x00"
_IDENTITY_HEADERS = (b"x-instance-id", b"x-tenant-id", b"x-instance-id-signature")


@dataclass(frozen=True, slots=True)
class _Dated:
    """A kept answer that holds on one day only: `/openstack`'s version list hides the
    versions dated after today (Nova), so yesterday's list must not answer today."""

    day: datetime.date
    data: bytes


class _Seeded(bytes):
    """A kept seeded answer (meta_data.json): the complete answer with one NUL where its
    random_seed goes (its head and its JSON hold no NUL, so the first one is the hole). One
    object, not a tuple of the bytes before and after: at 10,000 instances each object a
    hit reads is a likely cache and TLB miss (docs/benchmarks.md)."""

    __slots__ = ()


# A kept answer: complete bytes, a seeded answer with its hole, or complete bytes for one
# day.
_Hot = bytes | _Dated
# The one path whose documents depend on the date (`_Dated`); every other lookup is given
# _EPOCH, so no other answer can.
_DATED_PATH = "/openstack"
_SEED_LEN = len(base64.b64encode(bytes(SEED_BYTES)))


def _size(hot: _Hot) -> int:
    """The bytes of a kept answer."""
    return len(hot.data) if isinstance(hot, _Dated) else len(hot)


def _kept_answer(target: Document | SeededDocument) -> bytes | None:
    """The complete keep-alive GET 200 answer for `target`, as `_serve` gives it (a seeded
    document's a `_Seeded`: a NUL where the seed goes); None when the body is over
    WIRE_MAX_BODY."""
    headers = [("ETag", target.etag)]
    if isinstance(target, Document):
        if len(target.body) > WIRE_MAX_BODY:
            return None
        return Response(200, target.body, content_type=target.content_type,
                        headers=headers).encode(keep_alive=True)
    hole = b"\x00" * _SEED_LEN
    body = target.render(hole)
    if len(body) > WIRE_MAX_BODY:
        return None
    whole = Response(200, body, content_type=target.content_type,
                     headers=headers).encode(keep_alive=True)
    at = whole.index(hole)
    return _Seeded(whole[:at] + _NUL + whole[at + _SEED_LEN:])


# What cloud-init's OpenStack datasource reads at boot (22.4 and 26.2, metadata-api.md §3.1),
# normalised: answers a prewarmed instance has kept before its first request. The crawl
# reads every leaf /latest/meta-data/ lists; one that depends on the request (local-ipv4
# for an instance without a fixed IPv4) or that an instance lacks (a key pair, mac) is
# skipped where it is not a plain document.
BOOT_PATHS: tuple[str, ...] = tuple(dict.fromkeys(normalize_path(p) for p in (
    "/openstack",
    "/openstack/2018-08-27/meta_data.json",
    "/openstack/2018-08-27/user_data",
    "/openstack/2018-08-27/vendor_data.json",
    "/openstack/2018-08-27/vendor_data2.json",
    "/openstack/2018-08-27/network_data.json",
    "/latest/meta-data/",
    "/latest/meta-data/block-device-mapping/",
    "/latest/meta-data/block-device-mapping/ami",
    "/latest/meta-data/block-device-mapping/root",
    "/latest/meta-data/placement/",
    "/latest/meta-data/placement/availability-zone",
    "/latest/meta-data/public-keys/",
    "/latest/meta-data/public-keys/0/openssh-key",
    "/latest/meta-data/ami-id",
    "/latest/meta-data/ami-launch-index",
    "/latest/meta-data/ami-manifest-path",
    "/latest/meta-data/hostname",
    "/latest/meta-data/instance-action",
    "/latest/meta-data/instance-id",
    "/latest/meta-data/instance-life-cycle",
    "/latest/meta-data/instance-type",
    "/latest/meta-data/local-hostname",
    "/latest/meta-data/local-ipv4",
    "/latest/meta-data/mac",
    "/latest/meta-data/public-hostname",
    "/latest/meta-data/public-ipv4",
    "/latest/meta-data/reservation-id",
    "/latest/meta-data/security-groups",
)))


@dataclass(slots=True)
class _Entry:
    docs: InstanceDocuments
    # its identity spellings kept (`_NUL`), the very keys of its answers in every table
    who: list[bytes] = field(default_factory=list)
    # the path (MetadataApi._hot's table) of each answer kept for it: one per answer
    paths: list[str] = field(default_factory=list)
    kept_bytes: int = 0


@dataclass(slots=True)
class _Flight:
    task: asyncio.Task[_Entry] | None = None
    stale: bool = False


class _Unavailable(Exception):
    """The registry could not answer a miss: 503."""


_EPOCH = datetime.date(1970, 1, 1)


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def _not_allowed(allow: str) -> Response:
    return error_response(405, "method not allowed here", headers=[("Allow", allow)])


def parse_required_header(value: str) -> tuple[bytes, bytes] | None:
    """`[api] required_header` ("Name: value") as (lower-case name, value), or None."""
    if not value.strip():
        return None
    name, sep, want = value.partition(":")
    name = name.strip()
    if not sep or not name or any(c in name for c in " \t\r\n") or not want.strip():
        raise ConfigError(f"[api] required_header={value!r}: expected 'Name: value'")
    return name.lower().encode("latin-1"), want.strip().encode("latin-1")


def _is_password_path(path: str) -> bool:
    return path.startswith("/openstack/") and path.endswith("/password")


def _etag_matches(header: bytes, etag: str) -> bool:
    if header.strip() == b"*":
        return True
    want = etag[2:] if etag.startswith("W/") else etag
    for part in header.decode("latin-1").split(","):
        tag = part.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == want:
            return True
    return False


def _doc_response(body: bytes, content_type: str, etag: str, req: Request) -> Response:
    inm = req.header(b"if-none-match")
    if inm is not None and _etag_matches(inm, etag):
        return Response(304, b"", content_type=content_type, headers=[("ETag", etag)])
    return Response(200, body, content_type=content_type, headers=[("ETag", etag)])


class MetadataApi:
    """The request handler, its document cache and its change-feed consumer."""

    def __init__(
        self, settings: Settings, registry: Registry, vendordata: VendorData, *,
        wall_clock: Callable[[], float] = time.time,
        today: Callable[[], datetime.date] = _today,
        urandom: Callable[[int], bytes] = os.urandom,
        identity: IdentitySigner | None = None, architecture: str = "x86_64",
    ) -> None:
        api = settings.api
        self._secret = settings.secret_bytes
        self._registry = registry
        self._vendordata = vendordata
        self._wall = wall_clock
        self._today = today
        self._urandom = urandom
        self._seeds = _Seeds()
        self._tokens_required = api.imds_tokens == "required"
        self._os_tokens_required = api.openstack_tokens == "required"
        self._any_tokens_required = self._tokens_required or self._os_tokens_required
        self._required_header = parse_required_header(api.required_header)
        self._gate_reason = ("this metadata service requires the header "
                             + " ".join(api.required_header.split()))
        self._identity = identity
        self._issuer = api.identity_issuer
        self._region = api.region
        self._jwts: dict[tuple[str, str], tuple[float, str]] = {}
        self._max_waits = api.max_waits_per_instance
        self._max_wait_s = float(api.max_wait_timeout)
        self._max_waits_total = api.max_waits
        self._held_total = 0
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._token_key = derive_key(self._secret, urandom(32))
        self._registry_timeout_s = api.registry_timeout
        self._retry_after = str(api.retry_after)
        self._cache_size = api.cache_size
        self._prewarm_concurrency = api.prewarm_concurrency
        self._prewarm = PrewarmQueue(api.cache_size)
        self._prewarmers: set[asyncio.Task[None]] = set()
        self._options = DocumentOptions(
            dhcp_domain=api.dhcp_domain, static_vendordata=vendordata.static,
            dynamic_vendordata=vendordata.dynamic, identity=identity, region=api.region,
            architecture=architecture, expose_tags=api.expose_tags,
        )
        self._cache: dict[str, _Entry] = {}
        # The hit path: path -> identity headers (as `_NUL` joins them) -> the complete
        # keep-alive GET answer, instead of the signature memo, the cache entry, its
        # documents and their memo. At 10,000 instances each distinct object a request
        # touches is a likely cache (and TLB) miss, ~0.2 us apiece: a hit reads a slot of
        # its path's table (10,000 slots, not one table of every path's), its instance's
        # identity key (one object shared by all its paths) and its answer (one object,
        # docs/benchmarks.md). Kept only for entries in `_cache` and dropped with them
        # (`_forget`, by the entry's `who` and `paths`); a table goes when it is empty.
        self._hot: dict[str, dict[bytes, _Hot]] = {}
        self._answers: dict[bytes, bytes] = {}  # kept answers, one copy of each (bounded)
        self._answers_bytes = 0
        self._paths: dict[str, str] = {}  # as sent -> normalised
        self._signatures: dict[bytes, tuple[str, bytes]] = {}
        self._index = DependencyIndex()
        self._inflight: dict[str, _Flight] = {}
        self._recent: deque[tuple[int, Mapping[str, Any]]] = deque(maxlen=RECENT_CHANGES)
        self._feed_revision = 0
        self._synced = False
        root = root_document()
        self._root = Response(200, root.body, headers=[("ETag", root.etag)])
        self._root_etag = root.etag
        self.stats: dict[str, int] = {"misses": 0, "fetches": 0, "invalidated": 0,
                                      "prewarmed": 0, "prewarm_failed": 0, "waits": 0}
        self.token_counts: dict[str, int] = {"issued": 0, "rejected": 0, "refused": 0}
        self.hop = HopStats("api")  # /metrics (openimds.metrics), read at scrape time
        self.access_log = api.access_log or settings.debug
        self._observed_by_log = (self._observed(False), self._observed(True))

    # -- the handler --------------------------------------------------------------------
    def handle(self, req: Request) -> AnyResponse | Awaitable[AnyResponse]:
        path = self._paths.get(req.path)
        if path is None:
            path = normalize_path(req.path)
            if len(req.path) <= MEMO_KEY_MAX:
                if len(self._paths) >= PATH_MEMO:
                    self._paths.clear()
                self._paths[req.path] = path
        method = req.method
        gate = self._required_header
        if gate is not None and req.header(gate[0]) != gate[1]:
            return self._refuse(req, 403, self._gate_reason)
        if path == "/":
            if method not in _GET_HEAD:
                return _not_allowed(_ALLOW_READ)
            inm = req.header(b"if-none-match")
            if inm is not None and _etag_matches(inm, self._root_etag):
                return Response(304, b"", headers=[("ETag", self._root_etag)])
            return self._root
        if path == TOKEN_PATH:
            if method != "PUT":
                return _not_allowed(_ALLOW_TOKEN)
        elif method == "PUT" and path.endswith(TOKEN_SUFFIX):
            self.token_counts["refused"] += 1
            return self._refuse(req, 403, "tokens are issued only by PUT /latest/api/token")
        elif method not in _GET_HEAD:
            password = _is_password_path(path)
            if not (password and method == "POST"):
                return _not_allowed(_ALLOW_PASSWORD if password else _ALLOW_READ)

        # One pass over the headers for everything the hot path reads.
        seen: dict[bytes, bytes] = {}
        repeated: list[bytes] | None = None
        for name, value in req.headers:
            if name in _WANTED:
                if name in seen:
                    repeated = [*(repeated or ()), name]
                seen[name] = value
        # Exactly the three identity headers, once each (so no token, no If-None-Match):
        # the answer kept for exactly these values, signature included. A dict compares
        # keys only once their (keyed SipHash) hashes match, so a guessed signature learns
        # nothing from the lookup's timing; anything not kept goes to `_identify`'s
        # constant-time check.
        if (len(seen) == 3 and repeated is None and method == "GET" and req.keep_alive
                and not req.query and not (self._any_tokens_required
                                           and self._token_required(path))):
            kept = self._hot_hit(path, seen)
            if kept is not None:
                return kept
        who = self._identify(req, seen, repeated)
        if isinstance(who, Response):
            return who
        instance_id, tenant_id = who
        if path != TOKEN_PATH:
            token = seen.get(TOKEN_HEADER)
            if token is None:
                token = seen.get(FC_TOKEN_HEADER)
            if token is not None:
                why = check_token(self._token_key, instance_id, token, self._wall())
                if why is not None:
                    self.token_counts["rejected"] += 1
                    return self._refuse(req, 401, why, path)
            elif self._token_required(path):
                self.token_counts["rejected"] += 1
                return self._refuse(req, 401, "an IMDSv2 token is required: "
                                    "PUT /latest/api/token first", path)

        entry = self._cache.get(instance_id)
        if entry is None:
            return self._serve_miss(req, path, instance_id, tenant_id)
        if (method == "GET" and req.keep_alive and b"if-none-match" not in seen
                and not req.query):  # with a token checked above, say
            kept = self._hot_hit(path, seen)
            if kept is not None:
                return kept
        return self._serve(req, path, entry, tenant_id)

    def _hot_hit(self, path: str, seen: dict[bytes, bytes]) -> RawResponse | None:
        """The answer kept for the path under exactly these identity header values, if
        any."""
        table = self._hot.get(path)
        if table is None:
            return None
        hot = table.get(b"".join((  # as _IDENTITY_HEADERS (a tuple: no list built)
            seen.get(b"x-instance-id", b""), _NUL, seen.get(b"x-tenant-id", b""), _NUL,
            seen.get(b"x-instance-id-signature", b""))))
        return None if hot is None else self._hot_answer(hot)

    def _hot_answer(self, hot: _Hot) -> RawResponse | None:
        if isinstance(hot, _Seeded):  # meta_data.json: a fresh random_seed in every answer
            return RawResponse(hot.replace(_NUL, self._seeds.take(), 1))
        if isinstance(hot, bytes):
            return RawResponse(hot)
        # another day's version list: answered (and kept again) by the full path
        return RawResponse(hot.data) if hot.day == self._today() else None

    def _token_required(self, path: str) -> bool:
        return self._os_tokens_required if path.startswith("/openstack") else (
            self._tokens_required)

    @property
    def handle_observed(self) -> Callable[[Request], AnyResponse | Awaitable[AnyResponse]]:
        """`handle`, counted for /metrics (`self.hop`) and, with `self.access_log`, one
        openimds.access line per request (with the proxy's request ID)."""
        return self._observed_by_log[bool(self.access_log)]

    def _observed(self, log: bool) -> Callable[[Request], AnyResponse | Awaitable[AnyResponse]]:
        """`handle_observed`, a closure over what it calls: a kept answer costs two clock
        reads and one `hop.answered` more than `handle` (docs/benchmarks.md, "What counting
        costs"); `begun` is counted only for an answer that is not given at once."""
        handle, answered, other, access = (self.handle, self.hop.answered,
                                           self._observe_other, self._access)

        def handle_observed(req: Request) -> AnyResponse | Awaitable[AnyResponse]:
            t0 = perf_counter()
            result = handle(req)
            # The hot path: a kept answer (2xx: "HTTP/1.1 2"; /metrics keeps status classes)
            if result.__class__ is RawResponse and result.data[9] == 50:
                answered(200, req.path, perf_counter() - t0)
                if log:
                    access(req, result, t0)
                return result
            return other(req, result, t0)

        return handle_observed

    def _observe_other(
        self, req: Request, result: AnyResponse | Awaitable[AnyResponse], t0: float,
    ) -> AnyResponse | Awaitable[AnyResponse]:
        if isinstance(result, Response | RawResponse):
            status = result.status if isinstance(result, Response) else int(result.data[9:12])
            self.hop.answered(status, req.path, perf_counter() - t0)
            if self.access_log:
                self._access(req, result, t0)
            return result
        self.hop.begun += 1  # in flight from here until `_observe_later` counts it done
        if isinstance(result, Abandonable):  # stays recognisable to the server
            return Abandonable(self._observe_later(req, result, t0))
        return self._observe_later(req, result, t0)

    async def _observe_later(
        self, req: Request, pending: Awaitable[AnyResponse], t0: float,
    ) -> AnyResponse:
        try:
            result = await pending
        except BaseException:
            self.hop.done(500, req.path, perf_counter() - t0)
            raise
        status = result.status if isinstance(result, Response) else int(result.data[9:12])
        self.hop.done(status, req.path, perf_counter() - t0)
        if self.access_log:
            self._access(req, result, t0)
        return result

    @staticmethod
    def _access(req: Request, resp: AnyResponse, t0: float) -> None:
        if not access_line.enabled:
            return
        status = resp.status if isinstance(resp, Response) else int(resp.data[9:12])
        rid = req.header(b"x-openimds-request-id")
        iid = req.header(b"x-instance-id")
        access_line.write(
            f"api request_id={rid.decode('latin-1') if rid else '-'} "
            f"instance={iid.decode('latin-1') if iid else '-'} status={status} "
            f"ms={(perf_counter() - t0) * 1000.0:.2f} method={req.method} path={req.path}")

    def metric_families(self) -> list[Metric]:
        """The document cache's counters for /metrics (a `ServiceMetrics` source)."""
        st = self.stats
        return [
            gauge("openimds_api_cache_entries", "Instances whose documents are cached",
                  len(self._cache)),
            counter("openimds_api_cache_misses", "Requests for an instance not cached",
                    st["misses"]),
            counter("openimds_api_view_fetches", "Registry view fetches", st["fetches"]),
            counter("openimds_api_cache_invalidations", "Cached instances dropped by changes",
                    st["invalidated"]),
            counter("openimds_api_prewarmed", "Views fetched ahead of a request",
                    st["prewarmed"]),
            counter("openimds_api_prewarm_failures", "Background fetches that failed",
                    st["prewarm_failed"]),
            counter("openimds_api_tokens_issued", "IMDSv2 tokens issued",
                    self.token_counts["issued"]),
            counter("openimds_api_tokens_rejected",
                    "Requests refused for a missing, invalid or expired IMDSv2 token",
                    self.token_counts["rejected"]),
            counter("openimds_api_token_puts_refused",
                    "Token PUTs refused: forwarded by the guest, a versioned path, a bad TTL",
                    self.token_counts["refused"]),
        ]

    def _identify(
        self, req: Request, seen: Mapping[bytes, bytes], repeated: list[bytes] | None
    ) -> tuple[str, str] | Response:
        raw_id = seen.get(b"x-instance-id")
        signature = seen.get(b"x-instance-id-signature")
        raw_tenant = seen.get(b"x-tenant-id")
        if raw_id is None:
            return self._refuse(req, 400, "X-Instance-ID header is missing from request.")
        if signature is None:
            return self._refuse(
                req, 400, "X-Instance-ID-Signature header is missing from request.")
        if raw_tenant is None:
            return self._refuse(req, 400, "X-Tenant-ID header is missing from request.")
        if repeated is not None:
            if b"x-instance-id" in repeated:
                return self._refuse(
                    req, 400, "Multiple X-Instance-ID headers found within request.")
            if b"x-tenant-id" in repeated:
                return self._refuse(
                    req, 400, "Multiple X-Tenant-ID headers found within request.")
        # The expected signature is a function of the id alone: memoise it (keyed by the raw
        # header), compare in constant time every time.
        known = self._signatures.get(raw_id)
        if known is None:
            instance_id = raw_id.decode("latin-1").strip()
            known = (instance_id, sign_instance_id(self._secret, instance_id).encode())
            if len(raw_id) <= MEMO_KEY_MAX:
                if len(self._signatures) >= SIGNATURE_MEMO:
                    self._signatures.clear()
                self._signatures[raw_id] = known
        instance_id, expected = known
        if not hmac.compare_digest(expected, signature.strip()):
            log.warning("api.bad_signature instance=%s", instance_id)
            return self._refuse(req, 403, "Invalid proxy request signature.")
        return instance_id, raw_tenant.decode("latin-1").strip()

    def _refuse(self, req: Request, status: int, reason: str, path: str | None = None,
                headers: tuple[tuple[str, str], ...] = ()) -> Response:
        log.info("api.request method=%s path=%s status=%d reason=%s", req.method,
                 path if path is not None else req.path, status, reason)
        return error_response(status, reason, headers=headers)

    async def _serve_miss(
        self, req: Request, path: str, instance_id: str, tenant_id: str
    ) -> AnyResponse:
        self.stats["misses"] += 1  # hits = requests - misses; not counted on the hot path
        try:
            entry = await self._load(instance_id)
        except NotFound:
            return self._refuse(req, 404, "instance not found", path)
        except _Unavailable as exc:
            return self._refuse(req, 503, str(exc), path,
                                headers=(("Retry-After", self._retry_after),))
        result = self._serve(req, path, entry, tenant_id)
        if isinstance(result, Response | RawResponse):
            return result
        return await result

    def _serve(
        self, req: Request, path: str, entry: _Entry, tenant_id: str
    ) -> AnyResponse | Awaitable[AnyResponse]:
        docs = entry.docs
        if docs.project_id != tenant_id:
            log.warning("api.tenant_mismatch instance=%s tenant=%s", docs.instance_id, tenant_id)
            return self._refuse(req, 404, "instance not found", path)
        if path == TOKEN_PATH:
            return self._put_token(req, docs.instance_id, path)
        query = _Query.parse(req.query) if req.query else _NO_QUERY
        if query.json and (path.startswith("/openstack") or path == "/"):
            query = dataclasses.replace(query, json=False)  # OpenStack documents are JSON
        if path == IDENTITY_PATH and self._identity is not None:
            return self._identity_jwt(req, docs.view, query)
        try:
            if query.json:
                target = docs.lookup_json(path)
            else:
                day = self._today() if path == _DATED_PATH else _EPOCH
                target = docs.lookup(path, day)
        except NotFound:
            return error_response(404, "no such metadata path")
        if query.wait and req.method != "POST":
            etag = _etag_of_target(target, req)
            if etag is not None and etag == query.last_etag:
                return self._wait_for_change(req, path, entry, tenant_id, query)
        if isinstance(target, Document):
            if req.method == "POST":
                return _not_allowed(_ALLOW_READ)
            resp = _doc_response(target.body, target.content_type, target.etag, req)
            if req.method == "GET" and resp.status == 200 and not req.query:
                self._keep_hot(req, path, entry, target, day)
            return resp
        if isinstance(target, PasswordTarget):
            if req.method == "POST":
                return self._post_password(req, docs.view, path)
            doc = target.doc
            return _doc_response(doc.body, doc.content_type, doc.etag, req)
        if req.method == "POST":
            return _not_allowed(_ALLOW_READ)
        if isinstance(target, SeededDocument):
            seed = self._seeds.take()
            resp = _doc_response(target.render(seed), target.content_type, target.etag, req)
            if req.method == "GET" and resp.status == 200 and not req.query:
                self._keep_hot(req, path, entry, target, _EPOCH)
            return resp
        if isinstance(target, AddressLeaf):
            body = self._request_address(req).encode()
            return _doc_response(body, TEXT, etag_of(body), req)
        return self._dynamic_vendordata(req, docs.view, target, path)

    # -- documents that need more than the cache ----------------------------------------
    @staticmethod
    def _request_address(req: Request) -> str:
        raw = req.header(b"x-forwarded-for")
        if raw is None:
            return ""
        first = raw.decode("latin-1").split(",")[0].strip()
        try:
            return str(ipaddress.ip_address(first))
        except ValueError:
            return ""

    async def _dynamic_vendordata(
        self, req: Request, view: View, target: DynamicVendorTarget, path: str
    ) -> AnyResponse:
        try:
            body = dump(await self._vendordata.document(view, target.static))
        except UpstreamError as exc:
            return self._refuse(req, 500, exc.reason, path)
        return _doc_response(body, JSON, etag_of(body), req)

    async def _post_password(self, req: Request, view: View, path: str) -> AnyResponse:
        if view.password:
            return self._refuse(req, 409, "a password is already set", path)
        length = req.header(b"content-length")
        if len(req.body) > PASSWORD_MAX or (
            length is not None and length.strip().isdigit() and int(length) > PASSWORD_MAX
        ):
            return self._refuse(req, 400, "Request is too large.", path)
        try:
            password = req.body.decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse(req, 400, "password is not UTF-8 text", path)
        try:
            await asyncio.wait_for(self._registry.set_password(view.id, password),
                                   self._registry_timeout_s)
        except Conflict:
            return self._refuse(req, 409, "a password is already set", path)
        except NotFound:
            return self._refuse(req, 404, "instance not found", path)
        except BadRequest as exc:
            return self._refuse(req, 400, exc.reason, path)
        except (OpenImdsError, TimeoutError, OSError) as exc:
            return self._refuse(req, 503, f"registry unavailable: {exc}", path,
                                headers=(("Retry-After", self._retry_after),))
        self._invalidate(view.id)
        log.info("api.password_set instance=%s", view.id)
        return Response(200, b"")

    def _put_token(self, req: Request, instance_id: str, path: str) -> Response:
        if forwarded_by_guest(req.headers):
            self.token_counts["refused"] += 1
            return self._refuse(req, 403, "forwarded requests are not issued tokens", path)
        raw = req.header(TTL_HEADER)
        echo = _TTL_RESPONSE_HEADER
        if raw is None:
            raw = req.header(FC_TTL_HEADER)
            if raw is not None:
                echo = _FC_TTL_RESPONSE_HEADER
        ttl = parse_ttl(raw)
        if ttl is None:
            what = "is missing" if raw is None else "is not an integer from 1 to 21600"
            self.token_counts["refused"] += 1
            return self._refuse(req, 400, f"{echo} {what}", path)
        token = mint_token(self._token_key, instance_id, ttl, self._wall(), self._urandom(8))
        self.token_counts["issued"] += 1
        return Response(200, token.encode(), headers=[(echo, str(ttl))])

    def _identity_jwt(self, req: Request, view: View, query: _Query) -> Response:
        """`/openstack/latest/identity?audience=AUD`: an RS256 JWT for this instance."""
        signer = self._identity
        assert signer is not None
        audience = query.audience
        if not audience or len(audience) > AUDIENCE_MAX:
            return self._refuse(req, 400, f"?audience= is required (1 to {AUDIENCE_MAX} "
                                "characters)", IDENTITY_PATH)
        now = self._wall()
        key = (view.id, audience)
        memo = self._jwts.get(key)
        if memo is None or now - memo[0] >= JWT_MEMO_S or now < memo[0]:
            claims = identity_claims(view, audience=audience, issuer=self._issuer,
                                     region=self._region, now_s=now)
            if len(self._jwts) >= JWT_MEMO_MAX:
                self._jwts.clear()
            memo = self._jwts[key] = (now, signer.jwt(claims))
        return Response(200, memo[1].encode("ascii"), content_type="application/jwt")

    # -- change notification --------------------------------------------------------------
    def _wait_for_change(
        self, req: Request, path: str, entry: _Entry, tenant_id: str, query: _Query,
    ) -> Awaitable[AnyResponse]:
        """Hold the request until the document's ETag differs from `last_etag` or the
        timeout passes. `entry` is what the ETag was compared against: if the cache holds
        another by the time the coroutine runs, the instance changed meanwhile."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(query.timeout_s, self._max_wait_s)
        return Abandonable(self._held(req, path, entry, tenant_id, query, deadline))

    async def _held(
        self, req: Request, path: str, entry: _Entry, tenant_id: str, query: _Query,
        deadline: float,
    ) -> AnyResponse:
        instance_id = entry.docs.instance_id
        if self._held_total >= self._max_waits_total:
            return self._refuse(req, 503, "too many wait_for_change requests held on this "
                                "node", path, headers=(("Retry-After", self._retry_after),))
        waiters = self._waiters.setdefault(instance_id, set())
        if len(waiters) >= self._max_waits:
            return self._refuse(req, 429, f"at most {self._max_waits} wait_for_change "
                                "requests per instance", path)
        self.stats["waits"] += 1
        self._held_total += 1
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] | None = None
        woken = self._cache.get(instance_id) is not entry
        try:
            while True:
                if woken:
                    try:
                        entry = self._cache.get(instance_id) or await self._load(instance_id)
                    except NotFound:
                        return self._refuse(req, 404, "instance not found", path)
                    except _Unavailable as exc:
                        return self._refuse(req, 503, str(exc), path,
                                            headers=(("Retry-After", self._retry_after),))
                    try:
                        target = (entry.docs.lookup_json(path) if query.json
                                  else entry.docs.lookup(path, self._today()))
                    except NotFound:
                        break  # the document is gone: that is a change (answered 404)
                    if _etag_of_target(target, req) != query.last_etag:
                        break
                left = deadline - loop.time()
                if left <= 0:
                    break
                wake = loop.create_future()
                waiters.add(wake)
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake, left)
                finally:
                    waiters.discard(wake)
                woken = True
        finally:
            self._held_total -= 1
            if not waiters and self._waiters.get(instance_id) is waiters:
                del self._waiters[instance_id]
        plain = Request(req.method, req.path + ("?alt=json&recursive=true" if query.json
                                                else ""), req.headers, req.body, req.version,
                        req.keep_alive, req.peer)
        result = self._serve(plain, path, entry, tenant_id)
        if isinstance(result, Response | RawResponse):
            return result
        return await result

    def _wake(self, instance_id: str) -> None:
        for wake in self._waiters.get(instance_id, ()):
            if not wake.done():
                wake.set_result(None)

    # -- cache --------------------------------------------------------------------------
    def _flight(self, instance_id: str) -> _Flight:
        """The current fetch of this instance; a stale one (a change arrived meanwhile) is
        left to finish unkept and a new one starts."""
        flight = self._inflight.get(instance_id)
        if flight is None or flight.stale:
            flight = self._inflight[instance_id] = _Flight()
            task = flight.task = asyncio.ensure_future(self._fetch(instance_id, flight))

            def landed(_t: object, flight: _Flight = flight) -> None:
                if self._inflight.get(instance_id) is flight:
                    del self._inflight[instance_id]

            task.add_done_callback(landed)
        return flight

    async def _load(self, instance_id: str) -> _Entry:
        task = self._flight(instance_id).task
        assert task is not None
        return await asyncio.shield(task)

    async def _fetch(self, instance_id: str, flight: _Flight) -> _Entry:
        self.stats["fetches"] += 1
        try:
            raw = await asyncio.wait_for(self._registry.get_view(instance_id),
                                         self._registry_timeout_s)
        except NotFound:
            raise
        except TimeoutError:
            raise _Unavailable(
                f"registry did not answer in {self._registry_timeout_s}s") from None
        except OpenImdsError as exc:
            raise _Unavailable(f"registry unavailable: {exc.reason}") from None
        except Exception as exc:  # any client failure means: no answer
            raise _Unavailable(f"registry unavailable: {exc!r}") from None
        try:
            view = parse_view(raw)
        except BadRequest as exc:
            raise _Unavailable(f"registry view unusable: {exc.reason}") from None
        entry = _Entry(InstanceDocuments(view, self._options))
        if not flight.stale and not self._changed_since(view):
            self._store(entry)
        return entry

    def _store(self, entry: _Entry) -> None:
        iid = entry.docs.instance_id
        old = self._cache.pop(iid, None)
        if old is not None:
            self._forget(old)
        while len(self._cache) >= self._cache_size:
            oldest = next(iter(self._cache))
            self._drop(oldest)
        self._cache[iid] = entry
        self._index.add(entry.docs.view)

    def _keep_hot(self, req: Request, path: str, entry: _Entry,
                  target: Document | SeededDocument, day: datetime.date) -> None:
        """Keep `target`'s answer for the hit path (`_hot`) under the identity headers `req`
        carries (see `_keep_answer`)."""
        values = [req.header_all(name) for name in _IDENTITY_HEADERS]
        if any(len(v) != 1 for v in values):
            return  # what the hit path looks up: each once (and `_identify` read these)
        # a client that closes its connections is not answered by the hit path: for it the
        # documents keep their copy too
        self._keep_answer(path, entry, _NUL.join([v[0] for v in values]), target, day,
                          forget=req.keep_alive)

    def _keep_answer(self, path: str, entry: _Entry, who: bytes,
                     target: Document | SeededDocument, day: datetime.date, *,
                     forget: bool = True) -> None:
        """Keep `target`'s keep-alive GET 200 answer for the hit path under `who` (the
        identity header values, `_IDENTITY_HEADERS` NUL-joined), if `entry` is the cached
        one (an unkept fetch must leave nothing behind) and the body is small; `day` is the
        date `target` was looked up for (`_DATED_PATH`'s answer holds on that day only);
        `forget`: the documents drop their own copy of what is kept. At
        most WIRE_MAX_DOCS answers and WIRE_MAX_BYTES in all per instance, under at most
        WIRE_MAX_WHO spellings of its identity headers."""
        if self._cache.get(entry.docs.instance_id) is not entry:
            return
        encoded = _kept_answer(target)
        if encoded is None:
            return
        spelled = next((known for known in entry.who if known == who), None)
        if spelled is not None:
            who = spelled  # one key object per spelling, in every table
        elif len(entry.who) >= WIRE_MAX_WHO:
            return
        table = self._hot.get(path)
        old = None if table is None else table.get(who)
        size = _size(encoded) - (0 if old is None else _size(old))
        if (old is None and len(entry.paths) >= WIRE_MAX_DOCS
                or entry.kept_bytes + size > WIRE_MAX_BYTES):
            return
        if spelled is None:
            entry.who.append(who)
        if table is None:
            table = self._hot[path] = {}
        if old is None:
            entry.paths.append(path)
        answer: _Hot = encoded
        if not isinstance(encoded, _Seeded):
            # Many answers are the same bytes for every instance (listings, placement,
            # empty vendor data): one copy of each, not one per instance.
            answer = shared = self._shared(encoded)
            if path == _DATED_PATH:
                answer = _Dated(day, shared)
        entry.kept_bytes += size
        table[who] = answer
        if forget:
            # what the hit path answers, the documents need not hold too (rebuilt if asked
            # for by a request the hit path does not answer: HEAD, If-None-Match, a query)
            entry.docs.forget(path)

    def _shared(self, answer: bytes) -> bytes:
        """The one kept copy of `answer` (the table cleared when over its bounds)."""
        shared = self._answers
        kept = shared.get(answer)
        if kept is not None:
            return kept
        if len(shared) >= SHARED_ANSWERS or self._answers_bytes + len(answer) > SHARED_BYTES:
            shared.clear()
            self._answers_bytes = 0
        shared[answer] = answer
        self._answers_bytes += len(answer)
        return answer

    def _forget(self, entry: _Entry) -> None:
        """Drop what the hit path keeps for `entry`."""
        hot = self._hot
        for path in entry.paths:
            table = hot.get(path)
            if table is None:
                continue  # emptied by an earlier answer of the same path (another spelling)
            for who in entry.who:
                table.pop(who, None)
            if not table:
                del hot[path]  # tables come and go with their paths' answers (tags' paths)
        entry.paths.clear()
        entry.who.clear()
        entry.kept_bytes = 0

    def _changed_since(self, view: View) -> bool:
        """True when the feed already delivered a change newer than the view that touches it."""
        if view.revision >= self._feed_revision or not self._recent:
            return False
        if len(self._recent) == self._recent.maxlen and self._recent[0][0] > view.revision + 1:
            return True  # changes after the view may have scrolled out of the log
        probe = DependencyIndex()
        probe.add(view)
        return any(rev > view.revision and view.id in probe.affected(change)
                   for rev, change in self._recent)

    def _drop(self, instance_id: str) -> None:
        entry = self._cache.pop(instance_id, None)
        if entry is not None:
            self._forget(entry)
            self.stats["invalidated"] += 1
        self._index.remove(instance_id)

    def _invalidate(self, instance_id: str) -> None:
        self._drop(instance_id)
        flight = self._inflight.get(instance_id)
        if flight is not None:
            flight.stale = True
        if instance_id in self._waiters:
            self._wake(instance_id)

    def clear(self) -> list[str]:
        """Drop everything; returns the instances that were cached (oldest first)."""
        held = list(self._cache)
        for iid in held:
            self._drop(iid)
        for flight in self._inflight.values():
            flight.stale = True
        for iid in list(self._waiters):
            self._wake(iid)
        return held

    # -- prewarming ---------------------------------------------------------------------
    def _queue_prewarm(self, instance_id: str, *, low: bool = False) -> None:
        if self._prewarm_concurrency:
            self._prewarm.push(instance_id, low=low)

    def _start_prewarmers(self) -> None:
        want = min(self._prewarm_concurrency, len(self._prewarm)) - len(self._prewarmers)
        if want <= 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the queue waits for one
            return
        for _ in range(want):
            task = loop.create_task(self._prewarmer())
            self._prewarmers.add(task)
            task.add_done_callback(self._prewarmers.discard)

    async def _prewarmer(self) -> None:
        """Fetch queued instances one at a time until the queue is empty."""
        while (iid := self._prewarm.pop()) is not None:
            if iid in self._cache:
                continue  # a request fetched it after the change
            flight = self._inflight.get(iid)
            if flight is not None and not flight.stale:
                continue  # a current fetch is running; it will be kept unless overtaken
            try:
                entry = await self._load(iid)
            except NotFound:
                continue  # deleted meanwhile
            except _Unavailable as exc:
                self.stats["prewarm_failed"] += 1
                log.debug("api.prewarm_failed instance=%s reason=%s", iid, exc)
                continue
            if self._cache.get(iid) is entry:
                self.stats["prewarmed"] += 1
                self._keep_boot_answers(entry)

    def _keep_boot_answers(self, entry: _Entry) -> None:
        """Keep the answers to `BOOT_PATHS` for the hit path, under the identity headers the
        agent will send for this instance: a new VM's boot requests are then kept hits, as a
        rebooting VM's are, instead of each one building and encoding its document on the
        storm's hot path (the API's CPU in a cold storm was ~2.4x a warm one's,
        docs/benchmarks.md). Documents the instance lacks (404) are skipped."""
        docs = entry.docs
        iid = docs.instance_id
        who = _NUL.join((iid.encode(), docs.project_id.encode(),
                         sign_instance_id(self._secret, iid).encode("ascii")))
        for path in BOOT_PATHS:
            day = self._today() if path == _DATED_PATH else _EPOCH
            try:
                target = docs.lookup(path, day)
            except NotFound:
                continue
            if isinstance(target, Document | SeededDocument):
                self._keep_answer(path, entry, who, target, day)
        docs.forget()  # the EC2 trees too: rebuilt only if a path not kept is asked for

    async def stop_prewarm(self) -> None:
        """Cancel background fetches (they are also cancelled when `follow` ends)."""
        self._prewarm.clear()
        tasks = list(self._prewarmers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- change feed --------------------------------------------------------------------
    def apply_batch(self, batch: Any) -> None:
        """One ChangeBatch(revision, changes, resync) from `openimds.registry.feed`."""
        revision = int(getattr(batch, "revision", 0) or 0)
        if getattr(batch, "resync", False) or not self._synced:
            # On a resync, and on the first batch (views fetched before the feed started may
            # predate its starting point), nothing cached is kept. What was cached is fetched
            # again behind feed-driven work (at most cache_size instances); nothing is listed.
            held = self.clear()
            self._recent.clear()
            self._synced = True
            self._feed_revision = revision
            for iid in held:
                self._queue_prewarm(iid, low=True)
            self._start_prewarmers()
            log.info("api.cache_resync revision=%d refetch=%d", revision,
                     len(held) if self._prewarm_concurrency else 0)
            return
        changes = list(getattr(batch, "changes", None) or ())
        for change in changes:
            rev = int(change.get("revision") or revision)
            self._recent.append((rev, change))
        known = _Known(self._cache, self._inflight, self._prewarm)
        plan = plan_refresh(changes, self._index, known)
        # an instance being fetched right now is not in the index yet: instance changes
        # name it directly, and port/keypair/subnet changes are caught by `_changed_since`
        for iid in plan.invalidate:
            self._invalidate(iid)
        for iid in plan.deleted:
            self._invalidate(iid)
            self._prewarm.discard(iid)
        for iid in plan.refresh:
            self._queue_prewarm(iid)
        self._feed_revision = max(self._feed_revision, revision)
        self._start_prewarmers()
        if plan.invalidate or plan.refresh:
            log.debug("api.cache_invalidated revision=%d instances=%d refresh=%d", revision,
                      len(plan.invalidate), len(plan.refresh))

    async def follow(self, batches: Any) -> None:
        """Consume the change feed until cancelled (background fetches stop with it)."""
        try:
            async for batch in batches:
                self.apply_batch(batch)
        finally:
            await self.stop_prewarm()


@dataclass(frozen=True, slots=True)
class _Query:
    """What the API reads from a query string (Nova ignores it; GCE's parameters)."""

    wait: bool = False
    last_etag: str = ""
    timeout_s: float = 3600.0
    json: bool = False
    audience: str = ""

    @classmethod
    def parse(cls, query: str) -> _Query:
        params = parse_qs(query, keep_blank_values=True, max_num_fields=32)

        def one(name: str) -> str:
            values = params.get(name)
            return values[-1] if values else ""

        timeout = one("timeout_sec")
        try:
            timeout_s = max(0.0, float(timeout)) if timeout else 3600.0
        except ValueError:
            timeout_s = 3600.0
        if timeout_s != timeout_s:  # NaN
            timeout_s = 3600.0
        return cls(
            wait=one("wait_for_change").lower() == "true", last_etag=one("last_etag"),
            timeout_s=timeout_s,
            # GCE: recursive answers are JSON unless alt=text asks otherwise
            json=one("recursive").lower() == "true" and one("alt").lower() != "text",
            audience=one("audience"),
        )


_NO_QUERY = _Query()


def _etag_of_target(target: Any, req: Request) -> str | None:
    """The ETag the answer for this target will carry (None: not a waitable document)."""
    if isinstance(target, Document | SeededDocument):
        return target.etag
    if isinstance(target, PasswordTarget):
        return target.doc.etag
    if isinstance(target, AddressLeaf):
        return etag_of(MetadataApi._request_address(req).encode())
    return None


@dataclass(frozen=True, slots=True)
class _Known:
    """`in`: the instance is cached, being fetched, or queued for prewarming."""

    cache: Mapping[str, Any]
    inflight: Mapping[str, Any]
    queued: PrewarmQueue

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self.cache or instance_id in self.inflight \
            or instance_id in self.queued
