"""A real `openimds registry serve` process for the registry tests, on SQLite or PostgreSQL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from openimds.registry.client import RegistryClient
from tests.support import (
    Service,
    base_config,
    http_ready,
    openimds_service,
    postgres_database,
    write_config,
)

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@dataclass
class Registry:
    config: Path
    url: str
    admin_token: str
    reader_token: str
    service: Service
    backend: str
    metrics_port: int  # its /metrics listener

    def client(self, *, admin: bool = True, token: str | None = None) -> RegistryClient:
        tok = token if token is not None else (self.admin_token if admin else self.reader_token)
        return RegistryClient(self.url, tok)

    def restart(self) -> None:
        self.service.stop()
        self.service.start().wait_until(http_ready(self.url + "/v1/health"))


@contextlib.contextmanager
def registry_process(
    state: Path, backend: str, *, name: str = "registry",
    defaults: dict[str, Any] | None = None, **registry_opts: Any
) -> Iterator[Registry]:
    """Start a registry under state/, yield it, stop it (by PID). defaults: [DEFAULT] options."""
    state.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        opts = dict(registry_opts)
        if backend == "postgres":
            opts["connection"] = stack.enter_context(postgres_database())
        cfg = base_config(state / "state", registry=opts, DEFAULT=defaults or {})
        config = write_config(state / "openimds.ini", cfg)
        reg = cfg["registry"]
        url = f"http://127.0.0.1:{reg['bind_port']}"
        svc = openimds_service(name, config, "registry", "serve", log_dir=state)
        stack.callback(svc.stop)
        svc.start().wait_until(http_ready(url + "/v1/health"))
        # its own first heartbeat is a change ("host" create) written moments after it
        # answers; on a loaded machine it landed in the middle of tests that expect the feed
        # to hold their own changes only: wait for it
        with RegistryClient(url, reg["admin_token"]) as c:
            svc.wait_until(lambda: any("controller" in h["roles"] for h in c.list("host")),
                           60)
        yield Registry(config, url, reg["admin_token"], reg["reader_token"], svc, backend,
                       int(cfg["metrics"]["registry_port"]))
