"""core.models (hostnames, key pairs, metadata) and the OpenAPI document vs the app routes."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any, cast

import pytest

from openimds.core import models
from openimds.errors import BadRequest, ConfigError
from openimds.registry.app import make_app
from openimds.registry.openapi import openapi_document
from openimds.registry.service import Registry

RSA = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDx8nkQv/zgGgB4rMYmIf+6A4l6Rr+o/6lHBzGdUhaf64Bvp1U8"
    "oMcrYc5Ot3rMhKz6NDHGfcjwEhrfNYJjPUfKhb9uyNHP9Mb6/FMvUqB4wVJWEXpfFVv6c+bQ0bRX2ZcVzOCKg+xp"
    "iXQxbUZg3xpjw7N8UOjNdYPe5AZbJ5vZIQ== Generated-by-Nova"
)


def test_sanitize_hostname() -> None:
    iid = "11111111-2222-3333-4444-555555555555"
    assert models.sanitize_hostname("My Web_Server.example", iid) == "my-web-server-example"
    assert models.sanitize_hostname("--Ünïcode!!--", iid) == "ünïcode"
    assert models.sanitize_hostname("Café ☕", iid) == "café"
    assert models.sanitize_hostname("☕☕", iid) == f"Server-{iid}"
    assert models.sanitize_hostname("!!!", iid) == f"Server-{iid}"
    assert models.sanitize_hostname(".web.", iid) == "web"
    assert len(models.sanitize_hostname("a" * 100, iid)) == 63


def test_parse_hostname() -> None:
    assert models.parse_hostname("Web-1.example") == "Web-1.example"
    for bad in ("bad_host", "-x", "a..b", "x" * 64):
        with pytest.raises(BadRequest):
            models.parse_hostname(bad)


def test_public_key_fingerprint_is_novas() -> None:
    key = models.parse_public_key(RSA + "\n")
    assert key.text == RSA and key.type == "ssh"
    assert re.fullmatch(r"([0-9a-f]{2}:){15}[0-9a-f]{2}", key.fingerprint)


@pytest.mark.parametrize("bad", [
    "", "ssh-rsa", "ssh-foo AAAA", "ssh-rsa !!!!", "ssh-ed25519 " + RSA.split()[1],
    RSA + "\n" + RSA, 42,
])
def test_public_key_rejects(bad: Any) -> None:
    with pytest.raises(BadRequest) as exc:
        models.parse_public_key(bad)
    assert exc.value.reason.startswith("public_key")


def test_metadata_limits() -> None:
    assert models.parse_metadata({"a": "b"}) == {"a": "b"}
    for bad in ({"a": 1}, {"": "x"}, {"k" * 256: "v"}, {"a": "v" * 256}, ["a"],
                {str(i): "v" for i in range(129)}):
        with pytest.raises(BadRequest):
            models.parse_metadata(bad)


def test_registry_refuses_to_start_without_admin_token() -> None:
    with pytest.raises(ConfigError):
        make_app(cast(Registry, None), admin_token="")


def test_openapi_lists_every_route() -> None:
    # routes only: a store that is never read (the registry sets its commit hook on it)
    app = make_app(Registry(cast(Any, SimpleNamespace())), admin_token="t")
    routed: dict[str, set[str]] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD":
            routed.setdefault(str(path), set()).add(route.method.lower())
    doc = openapi_document()["paths"]
    assert set(doc) == set(routed)
    for path, methods in routed.items():
        assert methods <= set(doc[path]) - {"parameters"}, path


def test_store_urls() -> None:
    from openimds.registry.store import normalize_url

    assert normalize_url("postgresql://u@/db?host=/run").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:////tmp/x.sqlite").drivername == "sqlite"
    with pytest.raises(ConfigError):
        normalize_url("mysql://u@h/db")
    with pytest.raises(ConfigError):
        normalize_url("::not a url::")
