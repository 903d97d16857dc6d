"""core.firewall: Neutron's metadata rules as data, and their exact iptables/nft texts."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from openimds.core.firewall import (
    Action,
    Rule,
    metadata_rules,
    render_iptables,
    render_nft,
    render_nft_delete,
)

NEUTRON_IPTABLES = [
    # neutron/agent/l3/router_info.py initialize_metadata_iptables, driver.py metadata_*_rules
    "-A PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp --dport 80 "
    "-j MARK --set-xmark 0x1/0xffff",
    "-A PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp --dport 80 "
    "-j REDIRECT --to-ports 9697",
    "-A INPUT -m mark --mark 0x1/0xffff -j ACCEPT",
    "-A INPUT -p tcp -m tcp --dport 9697 -j DROP",
    "-A FORWARD -j openimds-scope",
    "-A openimds-scope -m mark --mark 0x1/0xffff -j DROP",
]

EXPECTED_NFT = """\
table inet openimds
delete table inet openimds
table inet openimds {
\tchain mangle_prerouting {
\t\ttype filter hook prerouting priority mangle; policy accept;
\t\tiifname "qr-*" ip daddr 169.254.169.254 tcp dport 80 meta mark set meta mark and 0xffff0000 xor 0x1
\t}
\tchain nat_prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname "qr-*" ip daddr 169.254.169.254 tcp dport 80 redirect to :9697
\t}
\tchain filter_input {
\t\ttype filter hook input priority filter; policy accept;
\t\tmeta mark and 0xffff == 0x1 accept
\t\ttcp dport 9697 drop
\t}
\tchain filter_forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tjump scope
\t}
\tchain scope {
\t\tmeta mark and 0xffff == 0x1 drop
\t}
}
"""  # noqa: E501


def test_rules_are_neutrons_in_order():
    rules = metadata_rules(9697, 0x1, ipv6=())
    assert [(r.table, r.chain, r.action) for r in rules] == [
        ("mangle", "PREROUTING", Action.MARK),
        ("nat", "PREROUTING", Action.REDIRECT),
        ("filter", "INPUT", Action.ACCEPT),
        ("filter", "INPUT", Action.DROP),
        ("filter", "FORWARD", Action.DROP),
    ]
    assert rules[-1].via_scope


def test_iptables_text_is_exact():
    text = render_iptables(metadata_rules(9697, 0x1))
    rule_lines = [line for line in text.splitlines() if line.startswith("-A ")]
    assert rule_lines == NEUTRON_IPTABLES
    assert text.count("COMMIT") == 3
    assert text.splitlines()[0] == "*mangle"
    assert ":openimds-scope - [0:0]" in text


def test_nft_text_is_exact():
    assert render_nft(metadata_rules(9697, 0x1, ipv6=())) == EXPECTED_NFT


NEUTRON_IP6TABLES = [  # the same rules with -d fe80::a9fe:a9fe/128 (IPv6 enabled)
    "-A PREROUTING -d fe80::a9fe:a9fe/128 -i qr-+ -p tcp -m tcp --dport 80 "
    "-j MARK --set-xmark 0x1/0xffff",
    "-A PREROUTING -d fe80::a9fe:a9fe/128 -i qr-+ -p tcp -m tcp --dport 80 "
    "-j REDIRECT --to-ports 9697",
    "-A INPUT -m mark --mark 0x1/0xffff -j ACCEPT",
    "-A INPUT -p tcp -m tcp --dport 9697 -j DROP",
    "-A FORWARD -j openimds-scope",
    "-A openimds-scope -m mark --mark 0x1/0xffff -j DROP",
]


def test_ipv6_rules_are_neutrons_twins_per_family():
    rules = metadata_rules(9697, 0x1)  # IPv6 on by default, as Neutron with IPv6 enabled
    assert [line for line in render_iptables(rules, 4).splitlines()
            if line.startswith("-A ")] == NEUTRON_IPTABLES
    assert [line for line in render_iptables(rules, 6).splitlines()
            if line.startswith("-A ")] == NEUTRON_IP6TABLES
    nft = render_nft(rules)
    assert ('iifname "qr-*" ip6 daddr fe80::a9fe:a9fe tcp dport 80 meta mark set meta mark '
            "and 0xffff0000 xor 0x1") in nft
    assert 'iifname "qr-*" ip6 daddr fe80::a9fe:a9fe tcp dport 80 redirect to :9697' in nft
    assert nft.count("tcp dport 9697 drop") == 1  # one rule, both families (inet)
    ula = render_nft(metadata_rules(9697, 0x1, ipv6=("fe80::a9fe:a9fe", "fd00:ec2::254")))
    assert 'ip6 daddr fd00:ec2::254 tcp dport 80 redirect to :9697' in ula


def test_custom_port_and_mark():
    rules = metadata_rules(19697, 0x40)
    ipt = render_iptables(rules)
    assert "--set-xmark 0x40/0xffff" in ipt
    assert "-j REDIRECT --to-ports 19697" in ipt
    assert "-A INPUT -p tcp -m tcp --dport 19697 -j DROP" in ipt
    nft = render_nft(rules)
    assert "redirect to :19697" in nft
    assert "meta mark and 0xffff == 0x40 accept" in nft


def test_proxy_disabled_keeps_mark_and_scope_only():
    rules = metadata_rules(9697, 0x1, proxy_enabled=False)
    assert [r.action for r in rules] == [Action.MARK, Action.MARK, Action.DROP]
    ipt = render_iptables(rules)
    assert "REDIRECT" not in ipt and "9697" not in ipt
    assert "-A openimds-scope -m mark --mark 0x1/0xffff -j DROP" in ipt
    nft = render_nft(rules)
    assert "redirect" not in nft and "filter_input" not in nft


@pytest.mark.parametrize("mark", [0, 0x10000, -1])
def test_bad_mark_rejected(mark):
    with pytest.raises(ValueError, match="metadata_access_mark"):
        metadata_rules(9697, mark)


def test_bad_port_rejected():
    with pytest.raises(ValueError, match="metadata_port"):
        metadata_rules(0, 1)


def test_incomplete_rules_rejected():
    with pytest.raises(ValueError, match="set_mark"):
        render_iptables([Rule("mangle", "PREROUTING", Action.MARK)])
    with pytest.raises(ValueError, match="to_port"):
        render_nft([Rule("nat", "PREROUTING", Action.REDIRECT)])
    with pytest.raises(ValueError, match="no nft chain"):
        render_nft([Rule("nat", "OUTPUT", Action.ACCEPT)])


def test_nft_delete_declares_first():
    assert render_nft_delete([("ip", "filter")]) == "table ip filter\ndelete table ip filter\n"


def test_render_is_deterministic():
    rules = metadata_rules(9697, 0x1)
    assert render_nft(rules) == render_nft(tuple(rules))
    assert render_iptables(rules) == render_iptables(list(rules))


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft not installed")
def test_nft_syntax_check():
    """`nft -c` parses and evaluates the script without applying it (cheap, real check)."""
    proc = subprocess.run(
        ["nft", "-c", "-f", "-"],
        input=render_nft(metadata_rules(9697, 0x1, ipv6=("fe80::a9fe:a9fe", "fd00:ec2::254"))),
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0 and "Operation not permitted" in proc.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN here")
    assert proc.returncode == 0, proc.stderr
