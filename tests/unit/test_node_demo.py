"""node.demo pure parts: the demo's key lines, user data and the commands it suggests."""

from __future__ import annotations

import base64
import struct

from openimds.node.demo import SERVERS, demo_public_key, demo_user_data, try_commands


def test_public_key_is_a_wellformed_ed25519_line() -> None:
    kind, blob, comment = demo_public_key("a@demo", bytes(range(32))).split(" ")
    assert kind == "ssh-ed25519" and comment == "a@demo"
    raw = base64.b64decode(blob)
    (n,) = struct.unpack(">I", raw[:4])
    assert raw[4:4 + n] == b"ssh-ed25519"
    (m,) = struct.unpack(">I", raw[4 + n:8 + n])
    assert m == 32 and raw[8 + n:] == bytes(range(32))


def test_user_data_is_cloud_config() -> None:
    assert base64.b64decode(demo_user_data("demo-a")).startswith(b"#cloud-config\nhostname: demo-a")


def test_try_commands_carry_the_config_and_cover_every_server() -> None:
    cmds = [c for c, _ in try_commands("/etc/x.ini")]
    assert all(c.startswith("openimds --config /etc/x.ini ") for c in cmds)
    text = "\n".join(cmds)
    url = "http://169.254.169.254/openstack/latest/meta_data.json"
    assert f"vm exec demo-a -- curl -s {url}" in text
    for server in SERVERS:
        assert server.name in text
    assert [c for c, _ in try_commands(None)][0].startswith("openimds vm exec demo-a")
    assert sum(s.dhcp for s in SERVERS) == 1
