"""`openimds up --role`: what each role refuses to start without, through the real CLI."""

from __future__ import annotations

from pathlib import Path

from tests.support import run_cli, write_config


def _up(tmp_path: Path, config: dict[str, dict[str, str]], *args: str) -> tuple[int, str]:
    path = write_config(tmp_path / "c.ini", {"DEFAULT": {"state_path": str(tmp_path / "s")},
                                            **config})
    proc = run_cli(path, "up", *args, check=False, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_network_node_needs_the_controller_url_tokens_and_secret(tmp_path: Path) -> None:
    rc, out = _up(tmp_path, {}, "--role", "network")
    assert rc != 0 and "[registry] url" in out and "controller" in out
    assert not (tmp_path / "s" / "secrets.ini").exists()  # never invents secrets
    rc, out = _up(tmp_path, {"registry": {"url": "http://ctl:9696"}}, "--role", "network")
    assert rc != 0 and "reader_token" in out
    rc, out = _up(tmp_path, {"registry": {"url": "http://ctl:9696", "reader_token": "r"}},
                  "--role", "network")
    assert rc != 0 and "metadata_proxy_shared_secret" in out
    rc, out = _up(tmp_path, {"registry": {"url": "http://ctl:9696", "reader_token": "r"},
                             "DEFAULT": {"state_path": str(tmp_path / "s"),
                                         "metadata_proxy_shared_secret": "x"}},
                  "--role", "network")
    assert rc != 0 and "nova_metadata_host" in out


def test_bad_role_and_demo_without_registry(tmp_path: Path) -> None:
    rc, out = _up(tmp_path, {}, "--role", "storage")
    assert rc != 0 and "storage" in out
    rc, out = _up(tmp_path, {"registry": {"url": "http://ctl:9696", "reader_token": "r"}},
                  "--role", "compute", "--demo")
    assert rc != 0 and "--demo" in out


def test_a_network_node_is_warned_of_a_nova_metadata_socket_nothing_listens_on(
        tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    rc, out = _up(tmp_path, {"DEFAULT": {"state_path": str(tmp_path / "s"),
                                         "nova_metadata_socket": str(sock)}},
                  "--role", "network")
    assert rc != 0 and "[registry] url" in out  # refused as before, and told of both
    lines = [x for x in out.splitlines() if "nova_metadata_socket" in x]
    assert len(lines) == 1 and lines[0].startswith(
        f"warning: [DEFAULT] nova_metadata_socket = {sock} does not exist"), out
    rc, out = _up(tmp_path, {}, "--role", "network")
    assert rc != 0 and "nova_metadata_socket" not in out
