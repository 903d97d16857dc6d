"""Header rewriting for the agent's hop to the metadata API. Pure: header lists in, lists out.

Rules of this module: it never sees a socket. `rewrite_request_headers()` takes the VM's
headers (names lower-cased bytes, values bytes, as the lean HTTP server parses them) and
returns the list sent to the API:

- dropped first, whatever their case, count or `_`-for-`-` spelling: every identity header
  a VM could use to pass for another instance (`X-Forwarded-*`, `Forwarded`,
  `X-Instance-ID*`, `X-Tenant-ID`, `X-Project-ID`, `X-Neutron-*`, `X-OVN-*`,
  `X-Metadata-Provider*`), the hop-by-hop headers of RFC 9110 §7.6.1 plus any header the
  request's `Connection` header names, and the framing headers (`Content-Length`,
  `Transfer-Encoding`), which are re-derived from the body we send;
- then added, once each: X-Forwarded-For (normalised), X-Instance-ID, X-Tenant-ID,
  X-Instance-ID-Signature, a Content-Length when there is a body (or the method carries one),
  and a Host when the VM sent none.

Everything else (Host, User-Agent, Accept, Content-Type, the IMDSv2 token headers, ...) passes
through unchanged, in order. Neutron sends only its four headers and drops the rest, which
breaks token-based clients; passing the harmless ones through is deliberate.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "DROPPED_PREFIXES",
    "HOP_BY_HOP",
    "SENSITIVE",
    "identity_headers",
    "is_dropped",
    "redact",
    "rewrite_request_headers",
    "rewrite_with_identity",
]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_DROPPED_EXACT = frozenset({b"forwarded", b"x-tenant-id", b"x-project-id"})
DROPPED_PREFIXES = (
    b"x-forwarded-", b"x-instance-id", b"x-neutron-", b"x-ovn-", b"x-metadata-provider",
)
# Never logged: our signature, and credentials a VM may send.
SENSITIVE = frozenset({
    b"x-instance-id-signature", b"x-metadata-provider-signature", b"authorization",
    b"proxy-authorization", b"cookie", b"x-aws-ec2-metadata-token",
})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

OUT_FORWARDED_FOR = b"X-Forwarded-For"
OUT_INSTANCE_ID = b"X-Instance-ID"
OUT_TENANT_ID = b"X-Tenant-ID"
OUT_SIGNATURE = b"X-Instance-ID-Signature"


def is_dropped(name: bytes) -> bool:
    """True for a header name (lower-case) that never crosses the agent.

    Underscores count as dashes: WSGI servers (Nova's among them) map both to the same
    variable, so `X_Instance_ID` must go as surely as `X-Instance-ID`.
    """
    known = _verdicts.get(name)
    if known is not None:
        return known
    canon = name.replace(b"_", b"-")
    verdict = (
        canon in HOP_BY_HOP
        or canon in _FRAMING
        or canon in _DROPPED_EXACT
        or canon.startswith(DROPPED_PREFIXES)
    )
    if len(_verdicts) >= _MAX_VERDICTS:  # bounded: header names are chosen by the VM
        _verdicts.clear()
    _verdicts[name] = verdict
    return verdict


# The same few header names arrive on every request: remember each name's verdict.
_verdicts: dict[bytes, bool] = {}
_MAX_VERDICTS = 4096


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def identity_headers(
    *, forwarded_for: str, instance_id: str, tenant_id: str, signature: str,
) -> tuple[tuple[bytes, bytes], ...]:
    """The four headers the agent adds, encoded once (the agent memoises them per caller)."""
    return (
        (OUT_FORWARDED_FOR, forwarded_for.encode("ascii")),
        (OUT_INSTANCE_ID, instance_id.encode()),
        (OUT_TENANT_ID, tenant_id.encode()),
        (OUT_SIGNATURE, signature.encode("ascii")),
    )


def rewrite_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
    *,
    forwarded_for: str,
    instance_id: str,
    tenant_id: str,
    signature: str,
    method: bytes = b"GET",
    body_length: int = 0,
    default_host: bytes = b"169.254.169.254",
) -> list[tuple[bytes, bytes]]:
    """The headers the agent sends to the API for one request (see the module docstring).

    Header names in `headers` must be lower-case, as the lean HTTP server delivers them.
    """
    return rewrite_with_identity(
        headers, identity_headers(forwarded_for=forwarded_for, instance_id=instance_id,
                                  tenant_id=tenant_id, signature=signature),
        method=method, body_length=body_length, default_host=default_host,
    )


def rewrite_with_identity(
    headers: Iterable[tuple[bytes, bytes]],
    identity: tuple[tuple[bytes, bytes], ...],
    *,
    method: bytes = b"GET",
    body_length: int = 0,
    default_host: bytes = b"169.254.169.254",
) -> list[tuple[bytes, bytes]]:
    """`rewrite_request_headers` with the four identity headers already encoded."""
    out: list[tuple[bytes, bytes]] = []
    named: set[bytes] | None = None  # headers the request's Connection header names
    has_host = False
    for item in headers:
        name = item[0]
        if name == b"connection":
            tokens = _connection_tokens(item[1])
            named = tokens if named is None else named | tokens
            continue
        if is_dropped(name):
            continue
        if name == b"host":
            if has_host:  # a second Host is a request-smuggling shape: keep the first only
                continue
            has_host = True
        out.append(item)
    if named:
        out = [item for item in out if item[0] not in named]
        has_host = any(item[0] == b"host" for item in out)
    if not has_host:
        out.append((b"host", default_host))
    out += identity
    if body_length or method.upper() in _BODY_METHODS:
        out.append((b"content-length", str(body_length).encode("ascii")))
    return out


def redact(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Headers as printable text for a debug log, sensitive values replaced by `***`."""
    shown: list[tuple[str, str]] = []
    for name, value in headers:
        text_name = name.decode("latin-1")
        if name.lower() in SENSITIVE:
            shown.append((text_name, "***"))
        else:
            text = value.decode("latin-1")
            shown.append((text_name, "".join(c if " " <= c <= "~" else "?" for c in text)))
    return shown
