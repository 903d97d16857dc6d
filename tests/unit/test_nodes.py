"""Placement policy (core/nodes.py) and node roles (node/roles.py): pure decisions."""

from __future__ import annotations

import pytest

from openimds.core.nodes import place, roles_of
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
