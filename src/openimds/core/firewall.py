"""Neutron's metadata rules for a router namespace, as data, and their two renderings.

Rules of this module: no I/O. `metadata_rules()` returns `Rule` values that say what Neutron's
L3 agent installs in every `qrouter-` namespace (neutron/agent/l3/router_info.py
`initialize_metadata_iptables`, neutron/agent/metadata/driver.py `metadata_filter_rules` and
`metadata_nat_rules`); `render_nft()` and `render_iptables()` turn them into the text one atomic
call applies (`nft -f -`, `iptables-restore -w`). A namespace gets one of the two, never both.

    mangle PREROUTING  -d 169.254.169.254/32 -i qr-+ -p tcp --dport 80 -j MARK --set-xmark M/0xffff
    nat    PREROUTING  -d 169.254.169.254/32 -i qr-+ -p tcp --dport 80 -j REDIRECT --to-ports 9697
    filter INPUT       -m mark --mark M/0xffff -j ACCEPT
    filter INPUT       -p tcp --dport 9697 -j DROP
    filter FORWARD     -j <scope>;  <scope>: -m mark --mark M/0xffff -j DROP

The mark is set at mangle priority (-150), before nat (-100), on every packet of the connection
(mangle still sees 169.254.169.254), so the INPUT accept matches the whole redirected flow and a
direct connection to the router's metadata port is dropped. The scope chain drops marked
packets that were not redirected, so metadata traffic never leaves the router.

IPv6 (Neutron's `-d fe80::a9fe:a9fe/128` twins, plus the optional ULA fd00:ec2::254): the same
MARK and REDIRECT per address; the INPUT and scope rules match no address, so they hold for
both families (nft's inet table; the iptables driver renders them into both ip6tables and
iptables input).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "IPTABLES_NFT_TABLES",
    "METADATA_IP",
    "METADATA_IPV6",
    "METADATA_ULA",
    "NFT_FAMILY",
    "NFT_TABLE",
    "ROUTER_MARK_MASK",
    "SCOPE_CHAIN",
    "Action",
    "Rule",
    "metadata_rules",
    "render_iptables",
    "render_nft",
    "render_nft_delete",
]

METADATA_IP = "169.254.169.254"
METADATA_IPV6 = "fe80::a9fe:a9fe"  # Neutron's link-local metadata address
METADATA_ULA = "fd00:ec2::254"  # AWS's routable IPv6 metadata address (ULA)
METADATA_HTTP_PORT = 80
ROUTER_MARK_MASK = 0xFFFF  # neutron ROUTER_MARK_MASK
ROUTER_LEG_PATTERN = "qr-"  # iptables "qr-+", nft "qr-*"
NFT_FAMILY = "inet"
NFT_TABLE = "openimds"
SCOPE_CHAIN = "openimds-scope"  # Neutron's `scope` chain, reached from FORWARD
# The tables iptables-nft creates; removed when the nft driver takes a namespace over.
IPTABLES_NFT_TABLES: tuple[tuple[str, str], ...] = (
    ("ip", "mangle"), ("ip", "nat"), ("ip", "filter"),
    ("ip6", "mangle"), ("ip6", "nat"), ("ip6", "filter"),
)


class Action(enum.Enum):
    MARK = "MARK"
    REDIRECT = "REDIRECT"
    ACCEPT = "ACCEPT"
    DROP = "DROP"


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: where it sits (iptables table/chain), what it matches, what it does.

    `chain` is the iptables built-in chain (PREROUTING, INPUT, FORWARD); `via_scope` puts a
    FORWARD rule in Neutron's scope chain instead. Match fields left None match anything.
    """

    table: str
    chain: str
    action: Action
    daddr: str | None = None
    in_prefix: str | None = None
    tcp_dport: int | None = None
    mark: int | None = None  # match: mark & mask == mark
    mask: int = ROUTER_MARK_MASK
    set_mark: int | None = None  # MARK: mark = (mark & ~mask) ^ set_mark
    to_port: int | None = None  # REDIRECT target port
    via_scope: bool = False

    @property
    def version(self) -> int | None:
        """4 or 6 for a rule matching a destination address, None for both families."""
        if self.daddr is None:
            return None
        return 6 if ":" in self.daddr else 4


def metadata_rules(
    metadata_port: int, access_mark: int, *, proxy_enabled: bool = True,
    ipv6: Sequence[str] = (METADATA_IPV6,),
) -> tuple[Rule, ...]:
    """The rules of one router namespace, in Neutron's order.

    With the proxy disabled Neutron still marks metadata traffic and drops it in FORWARD
    (`initialize_metadata_iptables` runs for every router), but adds no REDIRECT and no INPUT
    rules. `ipv6` lists the IPv6 metadata addresses (empty: IPv4 only).
    """
    if not 0 < access_mark <= ROUTER_MARK_MASK:
        raise ValueError(f"metadata_access_mark {access_mark:#x} is outside 0x1..0xffff")
    if not 0 < metadata_port < 65536:
        raise ValueError(f"metadata_port {metadata_port} is not a TCP port")
    leg, http = ROUTER_LEG_PATTERN, METADATA_HTTP_PORT
    addresses = (METADATA_IP, *ipv6)
    rules = [
        Rule("mangle", "PREROUTING", Action.MARK, daddr=to_ip, in_prefix=leg, tcp_dport=http,
             set_mark=access_mark) for to_ip in addresses
    ]
    if proxy_enabled:
        rules += [
            Rule("nat", "PREROUTING", Action.REDIRECT, daddr=to_ip, in_prefix=leg,
                 tcp_dport=http, to_port=metadata_port) for to_ip in addresses
        ]
        rules += [
            Rule("filter", "INPUT", Action.ACCEPT, mark=access_mark),
            Rule("filter", "INPUT", Action.DROP, tcp_dport=metadata_port),
        ]
    rules.append(Rule("filter", "FORWARD", Action.DROP, mark=access_mark, via_scope=True))
    return tuple(rules)


# --- iptables-restore -------------------------------------------------------------------

_IPT_TABLE_CHAINS = {
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}


def _ipt_rule(rule: Rule, chain: str) -> str:
    parts = ["-A", chain]
    if rule.daddr is not None:
        parts += ["-d", f"{rule.daddr}/{128 if rule.version == 6 else 32}"]
    if rule.in_prefix is not None:
        parts += ["-i", f"{rule.in_prefix}+"]
    if rule.tcp_dport is not None:
        parts += ["-p", "tcp", "-m", "tcp", "--dport", str(rule.tcp_dport)]
    if rule.mark is not None:
        parts += ["-m", "mark", "--mark", f"{rule.mark:#x}/{rule.mask:#x}"]
    parts += ["-j", rule.action.value]
    if rule.action is Action.MARK:
        if rule.set_mark is None:
            raise ValueError("a MARK rule needs set_mark")
        parts += ["--set-xmark", f"{rule.set_mark:#x}/{rule.mask:#x}"]
    elif rule.action is Action.REDIRECT:
        if rule.to_port is None:
            raise ValueError("a REDIRECT rule needs to_port")
        parts += ["--to-ports", str(rule.to_port)]
    return " ".join(parts)


def render_iptables(rules: Sequence[Rule], version: int = 4) -> str:
    """iptables-restore (version 4) or ip6tables-restore (6) input that replaces the mangle,
    nat and filter tables with the rules of that family.

    Without --noflush each table named here is flushed and rewritten in one commit, so applying
    it twice gives the same ruleset. The namespace is ours; nothing else writes rules in it.
    """
    lines: list[str] = []
    for table, builtins in _IPT_TABLE_CHAINS.items():
        in_table = [r for r in rules if r.table == table and r.version in (None, version)]
        lines.append(f"*{table}")
        lines += [f":{chain} ACCEPT [0:0]" for chain in builtins]
        scoped = [r for r in in_table if r.via_scope]
        if scoped:
            lines.append(f":{SCOPE_CHAIN} - [0:0]")
        for rule in in_table:
            if not rule.via_scope:
                lines.append(_ipt_rule(rule, rule.chain))
        if scoped:
            chains = sorted({r.chain for r in scoped})
            lines += [f"-A {chain} -j {SCOPE_CHAIN}" for chain in chains]
            lines += [_ipt_rule(r, SCOPE_CHAIN) for r in scoped]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# --- nft -f -----------------------------------------------------------------------------

# (iptables table, chain) -> (nft chain name, hook, type, priority)
_NFT_BASE_CHAINS = {
    ("mangle", "PREROUTING"): ("mangle_prerouting", "prerouting", "filter", "mangle"),
    ("nat", "PREROUTING"): ("nat_prerouting", "prerouting", "nat", "dstnat"),
    ("filter", "INPUT"): ("filter_input", "input", "filter", "filter"),
    ("filter", "FORWARD"): ("filter_forward", "forward", "filter", "filter"),
}
_NFT_SCOPE = "scope"


def _nft_rule(rule: Rule) -> str:
    parts: list[str] = []
    if rule.in_prefix is not None:
        parts.append(f'iifname "{rule.in_prefix}*"')
    if rule.daddr is not None:
        parts.append(f"{'ip6' if rule.version == 6 else 'ip'} daddr {rule.daddr}")
    if rule.tcp_dport is not None:
        parts.append(f"tcp dport {rule.tcp_dport}")
    if rule.mark is not None:
        parts.append(f"meta mark and {rule.mask:#x} == {rule.mark:#x}")
    if rule.action is Action.MARK:
        if rule.set_mark is None:
            raise ValueError("a MARK rule needs set_mark")
        # --set-xmark V/M: mark = (mark AND NOT M) XOR V
        keep = ~rule.mask & 0xFFFFFFFF
        parts.append(f"meta mark set meta mark and {keep:#010x} xor {rule.set_mark:#x}")
    elif rule.action is Action.REDIRECT:
        if rule.to_port is None:
            raise ValueError("a REDIRECT rule needs to_port")
        parts.append(f"redirect to :{rule.to_port}")
    else:
        parts.append(rule.action.value.lower())
    return " ".join(parts)


def render_nft_delete(tables: Iterable[tuple[str, str]]) -> str:
    """Script lines deleting these (family, name) tables whether or not they exist.

    `nft` 1.0.6 has no `destroy`: declaring the table first makes the delete always valid, and
    both happen in the same transaction as whatever follows.
    """
    return "".join(f"table {fam} {name}\ndelete table {fam} {name}\n" for fam, name in tables)


def render_nft(rules: Sequence[Rule]) -> str:
    """An `nft -f -` script that atomically replaces our one table with these rules.

    Idempotent: the table is declared, deleted and re-created in one transaction, so the
    result does not depend on what was there before.
    """
    chains: dict[str, list[str]] = {}
    headers: dict[str, str] = {}
    for rule in rules:
        try:
            name, hook, kind, prio = _NFT_BASE_CHAINS[(rule.table, rule.chain)]
        except KeyError:
            raise ValueError(f"no nft chain for {rule.table} {rule.chain}") from None
        headers.setdefault(name, f"type {kind} hook {hook} priority {prio}; policy accept;")
        chains.setdefault(name, [])
        if rule.via_scope:
            if _NFT_SCOPE not in chains:
                chains[_NFT_SCOPE] = []
                chains[name].append(f"jump {_NFT_SCOPE}")
            chains[_NFT_SCOPE].append(_nft_rule(rule))
        else:
            chains[name].append(_nft_rule(rule))
    lines = [render_nft_delete([(NFT_FAMILY, NFT_TABLE)]).rstrip("\n")]
    lines.append(f"table {NFT_FAMILY} {NFT_TABLE} {{")
    for name, body in chains.items():
        lines.append(f"\tchain {name} {{")
        if name in headers:
            lines.append(f"\t\t{headers[name]}")
        lines += [f"\t\t{text}" for text in body]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"
