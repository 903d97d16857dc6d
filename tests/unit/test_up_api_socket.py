"""`up` moves the agent onto the API's Unix socket only when nothing else changes: it runs
both, and the agent would reach that very API over plain HTTP on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from openimds.config import Settings, load_settings
from openimds.node.up import local_api_socket

BOTH = ["registry", "api", "agent", "proxy"]


def settings(tmp_path: Path, text: str = "", state: str | None = None) -> Settings:
    cfg = tmp_path / "o.ini"
    cfg.write_text(f"[DEFAULT]\nstate_path = {state or tmp_path}\n{text}")
    return load_settings(str(cfg), environ={})


def test_all_in_one_uses_the_socket(tmp_path: Path) -> None:
    want = str(tmp_path / "api.sock")
    assert local_api_socket(settings(tmp_path), BOTH) == {
        "OPENIMDS_API_UNIX_SOCKET": want, "OPENIMDS_NOVA_METADATA_SOCKET": want}


@pytest.mark.parametrize(("text", "services"), [
    ("", ["registry", "api"]),  # controller only
    ("", ["agent", "proxy"]),  # network node: the API is elsewhere
    ("nova_metadata_host = 10.0.0.2\n", BOTH),  # the operator points at another API
    ("nova_metadata_protocol = https\n", BOTH),  # the operator wants TLS
    ("nova_metadata_port = 18775\n", BOTH),  # not this API's port
    ("nova_metadata_socket = /run/x/api.sock\n[api]\nunix_socket = /run/x/api.sock\n", BOTH),
    ("[api]\nunix_socket = /run/x/api.sock\n", BOTH),  # the operator's own choice
])
def test_anything_else_stays_as_configured(tmp_path: Path, text: str,
                                           services: list[str]) -> None:
    assert local_api_socket(settings(tmp_path, text), services) == {}


def test_a_state_path_too_long_for_a_socket_stays_on_tcp(tmp_path: Path) -> None:
    s = settings(tmp_path, state="/" + "s" * 100)
    assert local_api_socket(s, BOTH) == {}


def test_a_worker_socket_too_long_stays_on_tcp(tmp_path: Path) -> None:
    """With [api] workers the API also listens on api.sock.w<N>: a state_path where api.sock
    fits but api.sock.w1 does not stays on TCP (the API would refuse the config)."""
    state = "/" + "s" * (107 - len("/api.sock") - 1)  # api.sock: 107 bytes, .w1 110
    assert local_api_socket(settings(tmp_path, state=state), BOTH) != {}
    two = settings(tmp_path, "[api]\nworkers = 2\n", state=state)
    assert local_api_socket(two, BOTH) == {}
