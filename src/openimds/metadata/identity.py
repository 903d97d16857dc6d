"""The node's identity key and certificate on disk: loaded, or made on first start.

`[api] identity_key_file` / `identity_cert_file` (default `$state_path/identity/`). When
both are missing the first process to start makes them (under an flock, so API replicas
started together agree on one key; the key is 0600); replicas on other hosts are given the
same two files. One file without the other is a configuration error, never silently
replaced: relying parties hold the certificate.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import platform
import socket
from pathlib import Path

from openimds.config import Settings
from openimds.core.metadata.identity import IdentitySigner, generate_identity
from openimds.errors import ConfigError

__all__ = ["architecture", "load_or_create"]


def architecture(settings: Settings) -> str:
    """`[api] architecture`, or this host's (VMs run on the host's architecture)."""
    return settings.api.architecture or platform.machine() or "x86_64"


def _write_new(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create(settings: Settings, *, create: bool = True) -> IdentitySigner:
    """The signer from the configured files; made first when both are missing and `create`."""
    key_path = Path(settings.api.identity_key_file)
    cert_path = Path(settings.api.identity_cert_file)
    if not (key_path.exists() and cert_path.exists()) and create:
        key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock = key_path.with_name(f".{key_path.name}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not key_path.exists() and not cert_path.exists():
                key_pem, cert_pem = generate_identity(
                    f"openimds identity {socket.gethostname()}",
                    datetime.datetime.now(datetime.UTC))
                _write_new(key_path, key_pem, 0o600)
                _write_new(cert_path, cert_pem, 0o644)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                lock.unlink()
    for path, name in ((key_path, "identity_key_file"), (cert_path, "identity_cert_file")):
        if not path.exists():
            raise ConfigError(f"[api] {name}: {path} does not exist")
    try:
        return IdentitySigner(key_path.read_bytes(), cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"[api] identity_key_file={key_path} / identity_cert_file={cert_path}: {exc}"
        ) from None
