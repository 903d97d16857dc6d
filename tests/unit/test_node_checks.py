"""Pure parts of trace and doctor: the check runner and the verdicts over captured output."""

from __future__ import annotations

import json

import pytest

from openimds.node.checks import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    CheckFailed,
    CheckResult,
    CheckWarning,
    first_failure,
    render_line,
    run_checks,
)
from openimds.node.doctor import (
    expected_socket_mode,
    judge_backlog,
    judge_neighbour_table,
    judge_socket_mode,
    stale_namespaces,
    stale_specs,
)
from openimds.node.trace import (
    HOPS,
    judge_iptables_redirect,
    judge_isolated_address,
    judge_listening,
    judge_lookup,
    judge_metadata,
    judge_nft_redirect,
    judge_route,
    judge_vm_address,
    parse_http_response,
)


def _ok(ctx: list[str]) -> str:
    ctx.append("ok")
    return "fine"


def _fail(ctx: list[str]) -> str:
    ctx.append("fail")
    raise CheckFailed("broken", "fix it")


def _warn(ctx: list[str]) -> str:
    ctx.append("warn")
    raise CheckWarning("odd", "look")


def test_run_checks_stops_at_first_failure_and_times() -> None:
    calls: list[str] = []
    ticks = iter([0.0, 0.001, 1.0, 1.5])
    results = run_checks(
        [Check("a", _ok), Check("b", _fail), Check("c", _ok)], calls, clock=lambda: next(ticks),
    )
    assert calls == ["ok", "fail"]
    assert [r.status for r in results] == [OK, FAIL, SKIP]
    assert results[0].ms == pytest.approx(1.0)
    assert results[1].advice == "fix it" and results[1].ms == pytest.approx(500)
    assert first_failure(results) is results[1]
    assert "-> fix it" in render_line(results[1])


def test_run_checks_all_with_warnings() -> None:
    calls: list[str] = []
    results = run_checks([Check("a", _warn), Check("b", _fail), Check("c", _ok)], calls,
                         stop_on_failure=False)
    assert [r.status for r in results] == [WARN, FAIL, OK]


def test_hops_are_in_path_order() -> None:
    assert [h.name for h in HOPS] == [
        "vm-namespace", "vm-address", "vm-route", "hop-namespace", "intercept", "proxy",
        "agent-socket", "lookup", "signature", "api", "end-to-end",
        "v6-intercept", "v6-lookup", "v6-end-to-end", "ula-end-to-end",
    ]


ADDR = json.dumps([
    {"ifname": "lo", "operstate": "UNKNOWN", "addr_info": [{"local": "127.0.0.1",
                                                            "prefixlen": 8}]},
    {"ifname": "eth0", "operstate": "UP", "addr_info": [{"local": "10.0.0.5", "prefixlen": 24}]},
])


def test_vm_address() -> None:
    assert judge_vm_address(ADDR, "10.0.0.5") == "10.0.0.5/24 on eth0"
    with pytest.raises(CheckFailed, match="no interface holds 10.0.0.6"):
        judge_vm_address(ADDR, "10.0.0.6")
    down = ADDR.replace('"UP"', '"DOWN"')
    with pytest.raises(CheckFailed, match="DOWN"):
        judge_vm_address(down, "10.0.0.5")


def test_route() -> None:
    routed = json.dumps([{"dst": "169.254.169.254", "gateway": "10.0.0.1", "dev": "eth0"}])
    assert "via 10.0.0.1" in judge_route(routed, "10.0.0.1")
    with pytest.raises(CheckFailed, match="expected via 10.0.0.2"):
        judge_route(routed, "10.0.0.2")
    with pytest.raises(CheckFailed, match="no route"):
        judge_route("", "10.0.0.1")


NFT = """
table ip openimds {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        iifname "qr-*" ip daddr 169.254.169.254 tcp dport 80 redirect to :9697
    }
    chain mangle { type filter hook prerouting priority mangle; policy accept;
        iifname "qr-*" ip daddr 169.254.169.254 tcp dport 80 meta mark set 0x1 }
}
"""


def test_nft_redirect() -> None:
    assert judge_nft_redirect(NFT, 9697) == "REDIRECT 169.254.169.254:80 -> :9697 (marked)"
    with pytest.raises(CheckFailed, match="redirect to :9698"):
        judge_nft_redirect(NFT, 9698)
    with pytest.raises(CheckFailed, match="no rule mentions"):
        judge_nft_redirect("table ip filter {}", 9697)


def test_ipv6_redirect_and_address() -> None:
    v6 = NFT + '        iifname "qr-*" ip6 daddr fe80::a9fe:a9fe tcp dport 80 meta mark set 0x1\n'
    # the IPv4 REDIRECT alone does not count for the IPv6 address
    with pytest.raises(CheckFailed, match="redirect to :9697' rule for fe80::a9fe:a9fe"):
        judge_nft_redirect(v6, 9697, "fe80::a9fe:a9fe")
    v6 += '        iifname "qr-*" ip6 daddr fe80::a9fe:a9fe tcp dport 80 redirect to :9697\n'
    assert judge_nft_redirect(v6, 9697, "fe80::a9fe:a9fe").startswith("REDIRECT fe80::a9fe:a9fe")
    save = ("-A PREROUTING -d fe80::a9fe:a9fe/128 -i qr-+ -p tcp -m tcp --dport 80 "
            "-j REDIRECT --to-ports 9697\n")
    assert "iptables" in judge_iptables_redirect(save, 9697, "fe80::a9fe:a9fe")
    addr = json.dumps([{"ifname": "qr-abc", "addr_info": [
        {"local": "10.0.0.1", "prefixlen": 24}, {"local": "fe80::a9fe:a9fe", "prefixlen": 128}]}])
    assert judge_isolated_address(addr, "fe80::a9fe:a9fe") == "fe80::a9fe:a9fe/128 on qr-abc"
    with pytest.raises(CheckFailed, match="fe80::a9fe:a9fe is on no interface"):
        judge_isolated_address(ADDR, "fe80::a9fe:a9fe")


def test_iptables_redirect() -> None:
    save = ("-A neutron-l3-agent-PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp "
            "--dport 80 -j REDIRECT --to-ports 9697\n")
    assert "iptables" in judge_iptables_redirect(save, 9697)
    with pytest.raises(CheckFailed):
        judge_iptables_redirect("", 9697)


def test_isolated_address() -> None:
    addr = json.dumps([{"ifname": "tapabc", "addr_info": [
        {"local": "10.0.0.2", "prefixlen": 24}, {"local": "169.254.169.254", "prefixlen": 32}]}])
    assert judge_isolated_address(addr).endswith("on tapabc")
    with pytest.raises(CheckFailed, match="not on the DHCP tap"):
        judge_isolated_address(ADDR)


def test_listening() -> None:
    ss = ("LISTEN 0 4096 0.0.0.0:9697 0.0.0.0:*\n"
          "LISTEN 0 4096 169.254.169.254:80 0.0.0.0:*\n")
    assert judge_listening(ss, 9697, ("0.0.0.0",)) == "listening on 0.0.0.0:9697"
    assert judge_listening(ss, 80, ("169.254.169.254",)).endswith("169.254.169.254:80")
    with pytest.raises(CheckFailed, match="port 9698"):
        judge_listening(ss, 9698, ("0.0.0.0",))
    assert judge_listening("LISTEN 0 5 [::]:9697 [::]:*", 9697, ("0.0.0.0",))
    bound = "LISTEN 0 4096 169.254.169.254%tapbcec6a77-b2:80 0.0.0.0:*"
    assert judge_listening(bound, 80, ("169.254.169.254",)).endswith("%tapbcec6a77-b2:80")
    bound6 = "LISTEN 0 4096 [fe80::a9fe:a9fe]%tapbcec6a77-b2:80 [::]:*"
    assert judge_listening(bound6, 80, ("fe80::a9fe:a9fe",))


def test_lookup() -> None:
    one = {"revision": 3, "ports": [{"id": "p1", "device_id": "i1"}]}
    assert judge_lookup(one, "i1", "x") == "port p1 (revision 3)"
    with pytest.raises(CheckFailed, match="no port"):
        judge_lookup({"ports": []}, "i1", "x")
    with pytest.raises(CheckFailed, match="2 ports"):
        judge_lookup({"ports": [{"id": "a"}, {"id": "b"}]}, "i1", "x")
    with pytest.raises(CheckFailed, match="belongs to i2"):
        judge_lookup({"ports": [{"id": "p", "device_id": "i2"}]}, "i1", "x")


def test_metadata() -> None:
    body = json.dumps({"uuid": "i1"}).encode()
    assert judge_metadata(200, body, "i1").startswith("200, uuid i1")
    with pytest.raises(CheckFailed) as info:
        judge_metadata(403, b"Forbidden", "i1")
    assert "secret" in info.value.advice
    with pytest.raises(CheckFailed, match="for i2"):
        judge_metadata(200, json.dumps({"uuid": "i2"}).encode(), "i1")
    assert parse_http_response(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody") == (200, b"body")
    with pytest.raises(CheckFailed):
        parse_http_response(b"garbage")


def test_socket_mode_deduce() -> None:
    assert expected_socket_mode("all", "", "") == 0o666
    assert expected_socket_mode("deduce", "", "") == 0o644
    assert expected_socket_mode("deduce", "nobody", "") == 0o664
    assert expected_socket_mode("deduce", "nobody", "nogroup") == 0o666
    assert judge_socket_mode(0o140644, 0o644) == "mode 0644"
    with pytest.raises(CheckWarning):
        judge_socket_mode(0o140600, 0o666)


def test_backlog() -> None:
    ss = "u_str LISTEN 0 4096 /var/lib/openimds/metadata_proxy 12345 * 0\n"
    assert judge_backlog(ss, "/var/lib/openimds/metadata_proxy", 4096) == "backlog 4096"
    with pytest.raises(CheckWarning, match="backlog 5"):
        judge_backlog(ss.replace("4096", "5"), "/var/lib/openimds/metadata_proxy", 4096)


def test_stale() -> None:
    nss = ["qrouter-r1", "qrouter-r2", "qdhcp-n1", "vm-abcdef01", "vm-00000000", "other"]
    assert stale_namespaces(nss, {"r1"}, {"n1"}, {"abcdef01"}) == ["qrouter-r2", "vm-00000000"]
    assert stale_specs(["router-r1.json", "network-n2.json"], {"r1"}, {"n1"}) == [
        "network-n2.json"]
    assert stale_specs(["network-n1-ipv6.json", "network-n1-ula.json", "network-n2-ipv6.json"],
                       set(), {"n1"}) == ["network-n2-ipv6.json"]


def test_result_dict() -> None:
    assert CheckResult("a", OK, "d").as_dict()["status"] == "ok"


def test_neighbour_table() -> None:
    assert judge_neighbour_table(1024, 100).startswith("gc_thresh3=1024")
    with pytest.raises(CheckWarning, match="gc_thresh3=1024 for 1110 namespaces"):
        judge_neighbour_table(1024, 1110)
