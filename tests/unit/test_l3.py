"""agents.l3 and lab.vm pure parts: router plans, feed relevance, listener specs, VM plans."""

from __future__ import annotations

import pytest

from openimds.agents.fabric import bridges_for, is_our_bridge
from openimds.agents.l3 import is_relevant, plan_routers, router_listener
from openimds.core.proxy_rules import render_listener_spec
from openimds.errors import BadRequest
from openimds.lab.vm import plan_vm

NET = "0b3c1d2e-3f40-4a5b-8c6d-7e8f90a1b2c3"
SUB = "11111111-1111-4111-8111-111111111111"
RTR = "22222222-2222-4222-8222-222222222222"
PORT = "33333333-3333-4333-8333-333333333333"
VMPORT = "44444444-4444-4444-8444-444444444444"
SERVER = "55555555-5555-4555-8555-555555555555"

TOPOLOGY = {
    "revision": 7,
    "networks": [{"id": NET, "mtu": 1450}],
    "subnets": [{"id": SUB, "network_id": NET, "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1",
                 "dns_nameservers": ["10.0.0.53"]}],
    "routers": [{"id": RTR, "interfaces": [{"port_id": PORT, "subnet_id": SUB,
                                            "network_id": NET, "ip_address": "10.0.0.1"}]},
                {"id": "empty-router", "interfaces": []}],
    "ports": [
        {"id": PORT, "network_id": NET, "mac_address": "FA:16:3E:00:00:01",
         "device_owner": "network:router_interface", "device_id": RTR,
         "fixed_ips": [{"subnet_id": SUB, "ip_address": "10.0.0.1"}]},
        {"id": VMPORT, "network_id": NET, "mac_address": "fa:16:3e:00:00:05",
         "device_owner": "compute:nova", "device_id": SERVER,
         "fixed_ips": [{"subnet_id": SUB, "ip_address": "10.0.0.5"}]},
    ],
}


def test_plan_routers():
    plans = plan_routers(TOPOLOGY)
    assert set(plans) == {RTR, "empty-router"}
    assert plans["empty-router"].legs == ()
    plan = plans[RTR]
    assert plan.namespace == f"qrouter-{RTR}"
    (leg,) = plan.legs
    assert leg.ifname == "qr-33333333-33" and leg.peer == "qrb-33333333-33"
    assert leg.bridge == "brq0b3c1d2e-3f" and leg.mtu == 1450
    assert leg.mac == "fa:16:3e:00:00:01" and leg.cidrs == ("10.0.0.1/24",)
    assert all(len(n) <= 15 for n in (leg.ifname, leg.peer, leg.bridge))


def test_plan_ignores_ports_on_unknown_subnets():
    topo = {**TOPOLOGY, "subnets": []}
    assert plan_routers(topo)[RTR].legs[0].cidrs == ()


@pytest.mark.parametrize(("change", "relevant"), [
    ({"kind": "router", "op": "create"}, True),
    ({"kind": "subnet", "op": "update"}, True),
    ({"kind": "network", "op": "delete"}, True),
    ({"kind": "port", "attrs": {"device_owner": "network:router_interface"}}, True),
    ({"kind": "port", "attrs": {"device_owner": "compute:nova"}}, False),
    ({"kind": "port", "attrs": {}}, True),  # unknown owner: be safe
    ({"kind": "instance"}, False),
    ({"kind": "keypair"}, False),
])
def test_is_relevant(change, relevant):
    assert is_relevant(change) is relevant


def test_router_listener_spec_text():
    assert router_listener(RTR, 9697, ipv6=False).host == "0.0.0.0"  # kernel without IPv6
    text = render_listener_spec(router_listener(RTR, 9697))
    assert text == (f'{{"host": "::", "netns": "qrouter-{RTR}", "network_id": null, '
                    f'"port": 9697, "router_id": "{RTR}"}}\n')


def test_bridges_and_ownership():
    assert list(bridges_for(TOPOLOGY["networks"])) == ["brq0b3c1d2e-3f"]
    assert is_our_bridge("brq0b3c1d2e-3f")
    assert not is_our_bridge("brqsomething-else") and not is_our_bridge("br0")


def test_plan_vm_static():
    instance = {"id": SERVER, "name": "web", "ports": [TOPOLOGY["ports"][1]]}
    plan = plan_vm(instance, TOPOLOGY["subnets"][0], TOPOLOGY["networks"][0])
    assert plan.namespace == "vm-55555555" and plan.peer == "vmb-55555555"
    assert plan.cidr == "10.0.0.5/24" and plan.gateway == "10.0.0.1"
    assert plan.mtu == 1450 and plan.dns_nameservers == ("10.0.0.53",)
    assert plan.as_dict()["dns_nameservers"] == ["10.0.0.53"]
    no_gw = plan_vm(instance, {**TOPOLOGY["subnets"][0], "gateway_ip": None},
                    TOPOLOGY["networks"][0])
    assert no_gw.gateway is None


def test_plan_vm_errors():
    with pytest.raises(BadRequest, match="has no port"):
        plan_vm({"id": SERVER, "ports": []}, TOPOLOGY["subnets"][0], TOPOLOGY["networks"][0])
    with pytest.raises(BadRequest, match="no IP on subnet"):
        plan_vm({"id": SERVER, "ports": [TOPOLOGY["ports"][1]]},
                {**TOPOLOGY["subnets"][0], "id": "other"}, TOPOLOGY["networks"][0])
