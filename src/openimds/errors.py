"""Every error openimds raises on purpose, and the HTTP status it maps to.

```
OpenImdsError              base; `status` is the HTTP status hint, `reason` one line
├── ConfigError            bad or missing setting (names file, section, key, value)  -> CLI exit 2
├── BadRequest             malformed input: names the bad field and value              -> 400
├── Unauthorized           missing or wrong bearer token                               -> 401
├── Forbidden              token may not do this / bad instance signature              -> 403
├── NotFound               no such object                                              -> 404
├── Conflict               IP in use, overlapping CIDR, password already set           -> 409
├── Gone                   change feed window passed: the caller must resync           -> 410
├── ResolutionError        caller not mapped to exactly one instance                   -> 404
│   ├── UnknownCaller
│   └── AmbiguousCaller
├── SpoofedRequest         router and network ID both present, or neither              -> 400
├── UpstreamError          a hop behind us failed
│   ├── UpstreamUnavailable    cannot connect                                          -> 503
│   │   └── UpstreamRefused    connection refused / no socket: the request was never sent
│   ├── UpstreamTimeout        no answer in time                                       -> 504
│   └── UpstreamProtocolError  garbled answer                                          -> 502
└── CommandFailed          external command failed: argv, returncode, stderr
```

Errors are mapped to HTTP in exactly one place per server (`status` / `reason`); messages
state facts and values, never secrets or signatures.
"""

from __future__ import annotations

from collections.abc import Sequence


class OpenImdsError(Exception):
    """Base class. `status` is the HTTP status this error maps to."""

    status = 500

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConfigError(OpenImdsError):
    """A setting is missing, unknown or has a bad value."""


class BadRequest(OpenImdsError):
    status = 400


class Unauthorized(OpenImdsError):
    status = 401


class Forbidden(OpenImdsError):
    status = 403


class NotFound(OpenImdsError):
    status = 404


class Conflict(OpenImdsError):
    status = 409


class Gone(OpenImdsError):
    status = 410


class ResolutionError(OpenImdsError):
    status = 404


class UnknownCaller(ResolutionError):
    pass


class AmbiguousCaller(ResolutionError):
    pass


class SpoofedRequest(OpenImdsError):
    status = 400


class UpstreamError(OpenImdsError):
    status = 502
    # False only when the request surely never reached the upstream (no connection was made),
    # so it cannot have acted on it; a lost answer leaves it True.
    sent = True


class UpstreamUnavailable(UpstreamError):
    status = 503


class UpstreamRefused(UpstreamUnavailable):
    """The upstream refused the connection (ECONNREFUSED, or ENOENT for a Unix socket): it
    is down or being restarted, and no byte of the request left us."""

    sent = False


class UpstreamTimeout(UpstreamError):
    status = 504


class UpstreamProtocolError(UpstreamError):
    status = 502


class CommandFailed(OpenImdsError):
    """An external command exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"command {' '.join(self.argv)!r} exited {returncode}: {tail}")
