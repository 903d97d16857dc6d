"""The resource CLI as an operator runs it (real subprocesses) against a real registry.

The whole-topology walk runs on SQLite and PostgreSQL; the error paths are the REST API's
(covered on both backends by test_registry_api) and run on SQLite only.
"""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.registry_support import BACKENDS, Registry, registry_process
from tests.support import run_cli


@pytest.fixture(scope="module")
def reg(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Registry]:
    state = tmp_path_factory.mktemp(f"registry-cli-{request.param}")
    with registry_process(state, request.param) as r:
        yield r


def cli(reg: Registry, *args: str) -> Any:
    """Run a command with -f json; it must succeed."""
    proc = run_cli(reg.config, *args, "-f", "json")
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def fails(reg: Registry, *args: str) -> str:
    """Run a command that must fail with one line on stderr; return that line."""
    proc = run_cli(reg.config, *args)
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _n(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.mark.parametrize("reg", BACKENDS, indirect=True)
def test_full_topology_through_the_cli(reg: Registry, tmp_path: Path) -> None:
    net_name, sub_name, router_name = _n("net"), _n("sub"), _n("router")
    project = _n("tenant")
    net = cli(reg, "network", "create", net_name, "--project", project)
    assert net["name"] == net_name
    sub = cli(reg, "subnet", "create", sub_name, "--network", net_name, "--cidr",
              "192.168.10.0/24", "--dns", "192.168.10.53", "--dns", "1.1.1.1",
              "--allocation-pool", "start=192.168.10.10,end=192.168.10.99",
              "--host-route", "destination=10.10.0.0/16,gateway=192.168.10.254")
    assert sub["gateway_ip"] == "192.168.10.1"
    assert sub["dns_nameservers"] == ["192.168.10.53", "1.1.1.1"]
    assert sub["allocation_pools"] == [{"start": "192.168.10.10", "end": "192.168.10.99"}]
    assert sub["host_routes"] == [{"destination": "10.10.0.0/16", "nexthop": "192.168.10.254"}]
    cli(reg, "router", "create", router_name)
    port = cli(reg, "router", "add-interface", router_name, sub_name)
    assert port["fixed_ips"][0]["ip_address"] == "192.168.10.1"
    router = cli(reg, "router", "show", router_name)
    assert router["interfaces"][0]["subnet_id"] == sub["id"]

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    kp = cli(reg, "keypair", "create", "mykey", "--public-key", str(key) + ".pub",
             "--project", project)
    md5 = subprocess.run(["ssh-keygen", "-l", "-E", "md5", "-f", str(key) + ".pub"],
                         capture_output=True, text=True, check=True).stdout.split()[1]
    assert "MD5:" + kp["fingerprint"] == md5

    user_data = tmp_path / "user-data"
    user_data.write_bytes(b"#cloud-config\nhostname: x\n\x00\xff")
    table = run_cli(reg.config, "server", "create", "My VM", "--network", net_name,
                    "--fixed-ip", "192.168.10.50", "--key-name", "mykey", "--user-data",
                    str(user_data), "--property", "role=web", "--property", "tier=1",
                    "--availability-zone", "az1", "--flavor", "m1.tiny", "--project", project,
                    check=True).stdout
    assert "192.168.10.50" in table and "fa:16:3e:" in table and "| id " in table
    server = cli(reg, "server", "show", "My VM")
    assert server["ip_address"] == "192.168.10.50"
    assert server["mac_address"].startswith("fa:16:3e:")
    assert server["hostname"] == "my-vm" and server["availability_zone"] == "az1"
    assert server["flavor"] == "m1.tiny" and server["key_name"] == "mykey"
    assert server["metadata"] == {"role": "web", "tier": "1"}
    assert base64.b64decode(server["user_data"]) == user_data.read_bytes()
    assert server["project_id"] == net["project_id"]

    second = cli(reg, "server", "create", "vm2", "--network", net["id"], "--hostname", "db1")
    assert second["ip_address"] == "192.168.10.11"  # .10 went to the DHCP port
    assert second["hostname"] == "db1"

    updated = cli(reg, "server", "set", "My VM", "--property", "role=db", "--property", "x=y")
    assert updated["metadata"] == {"role": "db", "tier": "1", "x": "y"}
    updated = cli(reg, "server", "unset", server["id"], "--property", "tier")
    assert updated["metadata"] == {"role": "db", "x": "y"}

    listed = {s["name"] for s in cli(reg, "server", "list", "--project", project)}
    assert listed == {"My VM", "vm2"}
    ports = cli(reg, "port", "list", "--network", net_name)
    owners = sorted(p["device_owner"] for p in ports)
    assert owners == ["compute:nova", "compute:nova", "network:dhcp", "network:router_interface"]
    assert [p["id"] for p in cli(reg, "port", "list", "--server", "vm2")] == [
        second["ports"][0]["id"]]
    assert cli(reg, "port", "show", second["ports"][0]["id"])["device_id"] == second["id"]
    assert cli(reg, "network", "show", net_name)["subnets"] == [sub["id"]]
    assert sub["id"] in {s["id"] for s in cli(reg, "subnet", "list", "--network", net_name)}
    assert cli(reg, "subnet", "show", sub_name)["cidr"] == "192.168.10.0/24"
    assert net["id"] in {n["id"] for n in cli(reg, "network", "list")}
    assert project in {p["name"] for p in cli(reg, "project", "list")}
    assert cli(reg, "keypair", "show", "mykey")["id"] == kp["id"]
    assert [k["name"] for k in cli(reg, "keypair", "list", "--project", project)] == ["mykey"]

    # Human output is a table; value output is bare.
    human = run_cli(reg.config, "server", "list", check=True).stdout
    assert human.startswith("+") and "| name" in human
    value = run_cli(reg.config, "network", "show", net_name, "-f", "value", check=True).stdout
    assert net["id"] in value.splitlines()

    # Tear it all down by name.
    fails(reg, "subnet", "delete", sub_name)
    cli(reg, "server", "delete", "My VM", "vm2")
    fails(reg, "router", "delete", router_name)
    cli(reg, "router", "remove-interface", router_name, sub_name)
    cli(reg, "router", "delete", router_name)
    cli(reg, "subnet", "delete", sub_name)
    cli(reg, "network", "delete", net_name)
    cli(reg, "keypair", "delete", "mykey")
    assert "no network" in fails(reg, "network", "show", net_name)


@pytest.mark.parametrize("reg", ["sqlite"], indirect=True)
def test_subnet_flags(reg: Registry) -> None:
    name = _n("net")
    cli(reg, "network", "create", name)
    sub = cli(reg, "subnet", "create", _n("s"), "--network", name, "--cidr", "10.7.0.0/24",
              "--no-gateway", "--no-dhcp")
    assert sub["gateway_ip"] is None and sub["enable_dhcp"] is False
    assert cli(reg, "port", "list", "--network", name) == []
    sub = cli(reg, "subnet", "create", _n("s"), "--network", name, "--cidr", "fd00:7::/64",
              "--gateway", "fd00:7::fe")
    assert sub["gateway_ip"] == "fd00:7::fe" and sub["ip_version"] == 6
    proc = run_cli(reg.config, "subnet", "create", "x", "--network", name, "--cidr",
                   "10.8.0.0/24", "--gateway", "10.8.0.1", "--no-gateway")
    assert proc.returncode == 2  # argparse: mutually exclusive


@pytest.mark.parametrize("reg", ["sqlite"], indirect=True)
def test_cli_errors_are_one_line_naming_the_value(reg: Registry, tmp_path: Path) -> None:
    name = _n("net")
    cli(reg, "network", "create", name)
    assert "10.0.0.0/33" in fails(reg, "subnet", "create", "s", "--network", name, "--cidr",
                                  "10.0.0.0/33")
    cli(reg, "subnet", "create", _n("s"), "--network", name, "--cidr", "10.0.0.0/24")
    line = fails(reg, "server", "create", "v", "--network", name, "--fixed-ip", "10.0.9.9")
    assert "10.0.9.9" in line and "10.0.0.0/24" in line
    cli(reg, "server", "create", _n("v"), "--network", name, "--fixed-ip", "10.0.0.9")
    assert "10.0.0.9" in fails(reg, "server", "create", "v", "--network", name,
                               "--fixed-ip", "10.0.0.9")
    assert "nonet" in fails(reg, "server", "create", "v", "--network", "nonet")
    assert "/nope" in fails(reg, "server", "create", "v", "--network", name, "--user-data",
                            "/nope")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 70000)
    assert "user_data" in fails(reg, "server", "create", "v", "--network", name,
                                "--user-data", str(big))
    assert "novalue" in fails(reg, "server", "create", "v", "--network", name,
                              "--property", "novalue")
    assert "start=1" in fails(reg, "subnet", "create", "s", "--network", name, "--cidr",
                              "10.1.0.0/24", "--allocation-pool", "start=1")
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("ssh-rsa not-base64!\n")
    assert "public_key" in fails(reg, "keypair", "create", "bad", "--public-key", str(bad_key))
    # Ambiguous names are refused, naming every match.
    dup = _n("dup")
    a = cli(reg, "network", "create", dup)
    b = cli(reg, "network", "create", dup)
    line = fails(reg, "network", "show", dup)
    assert a["id"] in line and b["id"] in line and "ambiguous" in line
    assert cli(reg, "network", "show", a["id"])["id"] == a["id"]


@pytest.mark.parametrize("reg", ["sqlite"], indirect=True)
def test_cli_with_wrong_token_fails_cleanly(reg: Registry, tmp_path: Path) -> None:
    text = reg.config.read_text().replace(reg.admin_token, "wrong-token")
    bad = tmp_path / "bad.ini"
    bad.write_text(text)
    proc = run_cli(bad, "network", "list")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["openimds: error: invalid bearer token"]


def test_registry_refuses_to_start_without_admin_token(tmp_path: Path) -> None:
    from tests.support import base_config, write_config

    cfg = base_config(tmp_path / "state", registry={"admin_token": ""})
    config = write_config(tmp_path / "no-admin.ini", cfg)
    proc = run_cli(config, "registry", "serve", timeout=30)
    assert proc.returncode == 2
    assert "admin_token" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("reg", ["sqlite"], indirect=True)
def test_sqlite_file_created_private_and_bodies_limited(reg: Registry) -> None:
    import httpx

    if reg.backend == "sqlite":
        state = next(line.split("=", 1)[1].strip() for line in reg.config.read_text()
                     .splitlines() if line.startswith("state_path"))
        assert (Path(state) / "registry.sqlite").stat().st_mode & 0o077 == 0
    resp = httpx.post(reg.url + "/v1/networks", content=b"x" * (2 * 1024 * 1024),
                      headers={"Authorization": f"Bearer {reg.admin_token}"}, trust_env=False)
    assert resp.status_code == 413 and resp.json()["error"] == "too_large"
