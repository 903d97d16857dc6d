import json

from tests.support import run_cli, write_config


def test_config_show_masks_secrets(tmp_path) -> None:
    cfg = write_config(tmp_path / "c.ini", {
        "DEFAULT": {"state_path": tmp_path, "metadata_proxy_shared_secret": "hunter2"},
        "registry": {"admin_token": "adm"},
    })
    out = run_cli(cfg, "config", "show", check=True).stdout
    assert "hunter2" not in out and "adm" not in out.replace("admin_token", "")
    assert f"metadata_proxy_socket = {tmp_path}/metadata_proxy" in out
    data = json.loads(run_cli(cfg, "config", "show", "-f", "json", check=True).stdout)
    assert data["DEFAULT"]["metadata_proxy_shared_secret"] == "***"
    assert data["registry"]["bind_port"] == 9696


def test_bad_config_is_one_line_and_nonzero(tmp_path) -> None:
    cfg = write_config(tmp_path / "c.ini", {"DEFAULT": {"metadata_port": "eighty"}})
    proc = run_cli(cfg, "config", "show")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "metadata_port" in proc.stderr and "'eighty'" in proc.stderr
