"""Placement policy and frames (core/nodes.py), node roles (node/roles.py): pure decisions."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from openimds.config import Settings
from openimds.core.models import (
    DHCP_RESERVED_DEVICE_ID,
    dhcp_adopted_device_id,
    dhcp_device_id,
)
from openimds.core.nodes import (
    DhcpPortPlan,
    dhcp_ports,
    gratuitous_arp,
    place,
    place_adopting,
    roles_of,
)
from openimds.errors import ConfigError
from openimds.node.roles import api_socket_warning, services_for


def test_new_resources_go_to_the_least_loaded_alive_node() -> None:
    current = {"r1": ["a"], "r2": ["a"]}
    moves = place(current, ["r1", "r2", "r3", "r4"], ["a", "b"], 1)
    assert moves == {"r3": ["b"], "r4": ["b"]}


def test_ties_break_by_name_and_every_resource_gets_exactly_wanted() -> None:
    moves = place({}, ["x", "y", "z"], ["n2", "n1", "n3"], 1)
    assert moves == {"x": ["n1"], "y": ["n2"], "z": ["n3"]}
    two = place({}, ["x", "y"], ["n1", "n2", "n3"], 2)
    assert all(len(set(h)) == 2 for h in two.values())
    assert sorted(h for hosts in two.values() for h in hosts) == ["n1", "n1", "n2", "n3"]


def test_work_moves_off_dead_nodes_spread_over_the_alive_ones() -> None:
    current = {"r1": ["dead"], "r2": ["dead"], "r3": ["b"], "r4": ["dead"]}
    moves = place(current, current, ["b", "c"], 1)
    assert set(moves) == {"r1", "r2", "r4"}
    after = {**current, **moves}
    load = {h: sum(1 for v in after.values() if v == [h]) for h in ("b", "c")}
    assert load == {"b": 2, "c": 2}


def test_no_alive_candidate_keeps_the_dead_binding_and_a_revived_node_steals_nothing() -> None:
    assert place({"r1": ["a"]}, ["r1"], [], 1) == {}
    # a moved to b while a was dead; a is back: nothing changes
    assert place({"r1": ["b"]}, ["r1"], ["a", "b"], 1) == {}


def test_surplus_bindings_go_dead_first_and_gone_resources_are_ignored() -> None:
    moves = place({"n": ["a", "b", "c"]}, ["n"], ["a", "c"], 2)
    assert moves == {"n": ["a", "c"]}
    assert place({"gone": ["a"]}, [], ["a"], 1) == {}


def test_roles_of_agent_types() -> None:
    assert roles_of(["l3", "dhcp", "metadata"]) == ["network"]
    assert roles_of(["l2", "registry"]) == ["controller", "compute"]
    assert roles_of(["unknown"]) == []


def test_services_for_roles() -> None:
    assert services_for(["all"]) == ["registry", "api", "agent", "proxy", "l3-agent",
                                     "dhcp-agent"]
    assert services_for(["controller"]) == ["registry", "api"]
    assert services_for(["compute"]) == ["l2-agent"]
    assert services_for(["network", "controller"]) == ["registry", "api", "agent", "proxy",
                                                       "l3-agent", "dhcp-agent"]
    with pytest.raises(ConfigError, match="storage"):
        services_for(["storage"])


def test_a_nova_metadata_socket_nothing_listens_on_is_named_where_no_api_runs(
        tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    settings = Settings(nova_metadata_socket=str(path))
    line = api_socket_warning(settings, ["network"])
    assert line is not None and "\n" not in line
    assert line.startswith(f"warning: [DEFAULT] nova_metadata_socket = {path} does not exist")
    assert "--role network" in line and "nova_metadata_host" in line
    assert api_socket_warning(settings, ["all"]) is None  # the API runs here: up sets it
    assert api_socket_warning(settings, ["controller", "network"]) is None
    assert api_socket_warning(settings, ["compute"]) is None  # no agent: not used
    assert api_socket_warning(Settings(), ["network"]) is None  # not set
    path.write_text("")
    assert "is not a socket" in (api_socket_warning(settings, ["network"]) or "")
    path.unlink()
    with socket.socket(socket.AF_UNIX) as listener:  # something local listens there
        listener.bind(str(path))
        listener.listen()
        assert api_socket_warning(settings, ["network"]) is None


def test_gratuitous_arp_frame() -> None:
    frame = gratuitous_arp("fa:16:3e:01:02:03", "10.0.0.1")
    mac, ip = bytes.fromhex("fa163e010203"), bytes([10, 0, 0, 1])
    assert len(frame) == 42
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    assert frame[14:22] == b"\x00\x01\x08\x00\x06\x04\x00\x01"  # Ethernet/IPv4, request
    assert frame[22:28] == mac and frame[28:32] == ip  # sender
    assert frame[32:38] == b"\x00" * 6 and frame[38:42] == ip  # target = sender: gratuitous
    with pytest.raises(ValueError):
        gratuitous_arp("fa:16:3e", "10.0.0.1")


def test_a_dead_nodes_work_goes_only_to_its_takers() -> None:
    current = {"r1": ["solo"], "r2": ["had-peer"]}
    # solo reported alone: nobody may take its work; had-peer's goes to the old node only
    moves = place(current, current, ["old", "newcomer"], 1,
                  takers={"solo": [], "had-peer": ["old"]})
    assert moves == {"r2": ["old"]}
    # a node the registry forgot (host delete): any alive node
    assert place(current, current, ["newcomer"], 1, takers={"had-peer": []}) == {
        "r1": ["newcomer"]}


# --- k > 1 DHCP nodes per network, and their DHCP ports ------------------------------------

def test_k2_a_dead_node_is_replaced_without_touching_the_live_one() -> None:
    current = {"n1": ["a", "b"], "n2": ["a", "c"], "n3": ["b", "c"]}
    moves = place(current, current, ["a", "c", "d"], 2)  # b died, d joined
    assert moves == {"n1": ["a", "d"], "n3": ["c", "d"]}
    # no free alive node: the dead binding stays (the live one keeps serving alone)
    assert place({"n1": ["a", "b"]}, ["n1"], ["a"], 2) == {}
    # fewer alive nodes than wanted: as many as there are, never one node twice
    assert place({}, ["n1"], ["a"], 3) == {"n1": ["a"]}
    # raised k: the least-loaded nodes join (ties: name), existing bindings stay
    assert place({"n1": ["a"], "n2": ["b"]}, ["n1", "n2"], ["a", "b", "c"], 2) == {
        "n1": ["a", "c"], "n2": ["a", "b"]}
    # lowered k: dead first, then the most loaded
    assert place({"n1": ["a", "b", "c"], "n2": ["a", "c"]}, ["n1", "n2"], ["a", "c"], 2) == {
        "n1": ["a", "c"]}
    assert place({"n1": ["a", "c"], "n2": ["a"]}, ["n1", "n2"], ["a", "c"], 1) == {"n1": ["c"]}
    # a deleted node (gone) with nobody to take over: its binding is dropped, not kept
    assert place({"n1": ["a", "b"]}, ["n1"], ["a"], 2, gone=["b"]) == {"n1": ["a"]}
    assert place({"r1": ["b"]}, ["r1"], [], 1, gone=["b"]) == {"r1": []}
    assert place({"r1": ["b"]}, ["r1"], ["c"], 1, gone=["b"]) == {"r1": ["c"]}


NET = "0f0e0d0c-0000-4000-8000-000000000001"


def test_dhcp_device_id_names_the_host_as_neutron_does() -> None:
    dev = dhcp_device_id("net-a", NET)
    assert dev == f"dhcp{uuid.uuid5(uuid.NAMESPACE_DNS, 'net-a')}-{NET}"
    assert dev != dhcp_device_id("net-b", NET) and dev != dhcp_device_id("net-a", "other")


def test_dhcp_ports_one_per_host_a_moved_binding_rebinds_its_port() -> None:
    a, b, c = (dhcp_device_id(h, NET) for h in ("a", "b", "c"))
    # new hosts, no ports: one new port each
    assert dhcp_ports(NET, ["b", "a"], {}) == DhcpPortPlan(create=["a", "b"])
    # in step: nothing
    assert not dhcp_ports(NET, ["a", "b"], {"p1": a, "p2": b})
    # b lost its binding to c: b's port goes to c (same port, same IPs), nothing created
    assert dhcp_ports(NET, ["a", "c"], {"p1": a, "p2": b}) == DhcpPortPlan(rebind={"p2": c})
    # the reserved port (or a legacy dhcp-<net> one) goes to the first host
    assert dhcp_ports(NET, ["b", "a"], {"p0": DHCP_RESERVED_DEVICE_ID}) == DhcpPortPlan(
        rebind={"p0": a}, create=["b"])
    assert dhcp_ports(NET, ["a"], {"p0": f"dhcp-{NET}"}) == DhcpPortPlan(rebind={"p0": a})
    # k lowered: the port of the host that lost its binding is freed
    assert dhcp_ports(NET, ["a"], {"p1": a, "p2": b}) == DhcpPortPlan(delete=["p2"])
    # a duplicate port for one host: the second is handed over or freed
    assert dhcp_ports(NET, ["a", "b"], {"p1": a, "p2": a}) == DhcpPortPlan(rebind={"p2": b})
    assert dhcp_ports(NET, ["a"], {"p1": a, "p2": a}) == DhcpPortPlan(delete=["p2"])


def test_dhcp_ports_with_no_host_keep_one_reserved_and_none_without_dhcp() -> None:
    a = dhcp_device_id("a", NET)
    assert dhcp_ports(NET, [], {"p1": a, "p2": "x"}) == DhcpPortPlan(
        rebind={"p1": DHCP_RESERVED_DEVICE_ID}, delete=["p2"])
    assert not dhcp_ports(NET, [], {"p1": DHCP_RESERVED_DEVICE_ID})
    assert not dhcp_ports(NET, [], {})  # the reserved port is made with the first subnet
    assert dhcp_ports(NET, ["a"], {"p1": a}, has_dhcp=False) == DhcpPortPlan(delete=["p1"])


def test_a_dead_dhcp_node_with_no_free_replacement_is_adopted_by_a_live_mate() -> None:
    # k=2 on two nodes, b dies: nobody free, so a (bound too) adopts b's port
    assert place_adopting({"n1": ["a", "b"]}, ["n1"], ["a"], 2) == (
        {"n1": ["a"]}, {"n1": {"b": "a"}})
    # a free node exists: the binding moves (the port with it), nobody adopts
    assert place_adopting({"n1": ["a", "b"]}, ["n1"], ["a", "c"], 2) == (
        {"n1": ["a", "c"]}, {})
    # k=3, two dead, one survivor: it adopts both; with two survivors the least loaded
    assert place_adopting({"n1": ["a", "b", "c"]}, ["n1"], ["a"], 3) == (
        {"n1": ["a"]}, {"n1": {"b": "a", "c": "a"}})
    moves, adopted = place_adopting({"n1": ["a", "b", "c"], "n2": ["a"]}, ["n1", "n2"],
                                    ["a", "b"], 3)
    assert moves == {"n1": ["a", "b"], "n2": ["a", "b"]} and adopted == {"n1": {"c": "b"}}
    # a solo dead node (told peers=0, so it never fenced): nobody may adopt, nothing moves
    assert place_adopting({"n1": ["a", "b"]}, ["n1"], ["a"], 2, takers={"b": []}) == ({}, {})
    # nobody alive on the network: nothing to adopt with (routers: never a mate)
    assert place_adopting({"n1": ["b"]}, ["n1"], ["a"], 1, takers={"b": []}) == ({}, {})
    # a deleted node's binding is dropped (its port freed), not adopted
    assert place_adopting({"n1": ["a", "b"]}, ["n1"], ["a"], 2, gone=["b"]) == (
        {"n1": ["a"]}, {})
    # the adopted node comes back: k=2 wants it, it is bound again (a new port), takes
    # nothing back; plain `place` never adopts
    assert place_adopting({"n1": ["a"]}, ["n1"], ["a", "b"], 2) == ({"n1": ["a", "b"]}, {})
    assert place({"n1": ["a", "b"]}, ["n1"], ["a"], 2) == {}


def test_dhcp_ports_an_adopted_port_is_rebound_kept_and_never_handed_back() -> None:
    a, b = dhcp_device_id("a", NET), dhcp_device_id("b", NET)
    a_adopted = dhcp_adopted_device_id("a", NET)
    # b's binding dropped, a adopts: b's port is re-bound to a (same port: same IP and MAC)
    assert dhcp_ports(NET, ["a"], {"p1": a, "p2": b}, adopt={"b": "a"}) == DhcpPortPlan(
        rebind={"p2": a_adopted})
    # without adoption the left-over port is freed, as before
    assert dhcp_ports(NET, ["a"], {"p1": a, "p2": b}) == DhcpPortPlan(delete=["p2"])
    # an adopter that is not bound adopts nothing
    assert dhcp_ports(NET, ["a"], {"p1": a, "p2": b}, adopt={"b": "c"}) == DhcpPortPlan(
        delete=["p2"])
    # the adopted port stays with a; b, bound again, gets a new port of its own
    assert not dhcp_ports(NET, ["a"], {"p1": a, "p2": a_adopted})
    assert dhcp_ports(NET, ["a", "b"], {"p1": a, "p2": a_adopted}) == DhcpPortPlan(
        create=["b"])
    # a's binding moves to c: its own port and the one it adopted go to c together
    for own, other in (("p1", "p2"), ("p2", "p1")):  # whatever the port ids' order
        assert dhcp_ports(NET, ["c"], {own: a, other: a_adopted}) == DhcpPortPlan(
            rebind={own: dhcp_device_id("c", NET), other: dhcp_adopted_device_id("c", NET)})
    # a loses its binding otherwise: its adopted port is handed over like any other (or freed)
    assert dhcp_ports(NET, ["b", "c"], {"p1": b, "p2": a_adopted}) == DhcpPortPlan(
        rebind={"p2": dhcp_device_id("c", NET)})
    assert dhcp_ports(NET, ["b"], {"p1": b, "p2": a_adopted}) == DhcpPortPlan(delete=["p2"])
