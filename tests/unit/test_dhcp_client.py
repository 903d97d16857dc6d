"""lab.dhcp_client's pure parts: the hook's lease line, RFC 3442 decoding, the udhcpc argv."""

from __future__ import annotations

import pytest

from openimds.errors import BadRequest
from openimds.lab import dhcp_client as dc


def test_parse_lease_line() -> None:
    lease = dc.parse_lease_line(
        "OPENIMDS_LEASE ip=10.0.0.5 mask=24 router=10.0.0.1 10.0.0.254 source=121 "
        "routes=169.254.169.254/32 10.0.0.2 0.0.0.0/0 10.0.0.1")
    assert lease == dc.Lease("10.0.0.5", 24, "10.0.0.1", "121",
                             (("169.254.169.254/32", "10.0.0.2"), ("0.0.0.0/0", "10.0.0.1")))
    assert lease.cidr == "10.0.0.5/24"


def test_parse_lease_line_without_router_or_routes() -> None:
    lease = dc.parse_lease_line("OPENIMDS_LEASE ip=10.0.0.5 mask=24 router= source=none routes=")
    assert lease.router is None and lease.routes == () and lease.source == "none"


def test_decode_rfc3442() -> None:
    assert dc._decode_rfc3442("32,169,254,169,254,10,0,0,2,0,10,0,0,1") == [
        ("169.254.169.254/32", "10.0.0.2"), ("0.0.0.0/0", "10.0.0.1")]
    assert dc._decode_rfc3442("24,10,1,0,0,0,0,0") == [("10.1.0.0/24", "0.0.0.0")]


def test_udhcpc_asks_for_both_route_options() -> None:
    argv = dc.udhcpc_argv("eth0", "/s.sh")
    assert argv[:3] == ["udhcpc", "-i", "eth0"]
    assert ["-O", "staticroutes"] == argv[argv.index("staticroutes") - 1: argv.index(
        "staticroutes") + 1]
    assert "msstaticroutes" in argv and argv[-2:] == ["-s", "/s.sh"]
    assert {"-f", "-q", "-n"} <= set(argv)


def test_unknown_client() -> None:
    with pytest.raises(BadRequest):
        dc.acquire("vm-x", client="dhcpcd")
