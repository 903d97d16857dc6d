"""node.up: secrets generated once (0600), reused, completed; overrides; service order."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from openimds.config import load_settings
from openimds.errors import ConfigError
from openimds.node.up import SERVICES, build_supervisor, ensure_secrets, settings_overrides


def test_secrets_generated_once_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path, added = ensure_secrets(state)
    assert len(added) == 3
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    again, added2 = ensure_secrets(state)
    assert again == path and added2 == [] and path.read_text() == first
    cfg = tmp_path / "c.ini"
    cfg.write_text(f"[DEFAULT]\nstate_path = {state}\n")
    settings = load_settings(str(cfg), environ={})
    assert len(settings.metadata_proxy_shared_secret) >= 32
    assert settings.registry.admin_token.startswith("admin-")
    assert settings.registry.reader_token.startswith("reader-")
    # config file wins over secrets.ini
    cfg.write_text(f"[DEFAULT]\nstate_path = {state}\nmetadata_proxy_shared_secret = mine\n")
    assert load_settings(str(cfg), environ={}).metadata_proxy_shared_secret == "mine"


def test_secrets_completed_and_tightened(tmp_path: Path) -> None:
    tmp_path.joinpath("secrets.ini").write_text("[registry]\nadmin_token = keep\n")
    tmp_path.joinpath("secrets.ini").chmod(0o644)
    path, added = ensure_secrets(tmp_path)
    assert "registry.admin_token" not in added and len(added) == 2
    assert "admin_token = keep" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_overrides_and_order(tmp_path: Path) -> None:
    env = settings_overrides(["enable_isolated_metadata=true", "dhcp.resync_interval=5"])
    assert env == {"OPENIMDS_ENABLE_ISOLATED_METADATA": "true",
                   "OPENIMDS_DHCP_RESYNC_INTERVAL": "5"}
    with pytest.raises(ConfigError):
        settings_overrides(["nonsense"])
    cfg = tmp_path / "c.ini"
    cfg.write_text(f"[DEFAULT]\nstate_path = {tmp_path}\n")
    sup = build_supervisor(load_settings(str(cfg), environ={}), str(cfg), env)
    assert [c.name for c in sup.children] == [
        "registry", "api", "agent", "proxy", "l3-agent", "dhcp-agent"]
    assert [s.name for s in SERVICES] == [c.name for c in sup.children]
    reg = sup.children[0].spec
    assert list(reg.argv[-4:]) == ["--config", str(cfg), "registry", "serve"]
    assert reg.env is not None and reg.env["OPENIMDS_DHCP_RESYNC_INTERVAL"] == "5"
    assert reg.log_file == tmp_path / "log" / "registry.log" and reg.restart
