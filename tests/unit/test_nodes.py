"""Placement policy and frames (core/nodes.py), node roles (node/roles.py): pure decisions."""

from __future__ import annotations

import pytest

from openimds.core.nodes import gratuitous_arp, place, roles_of
from openimds.errors import ConfigError
from openimds.node.roles import services_for


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
