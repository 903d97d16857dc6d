"""The OpenAPI 3.1 document of the registry REST API (hand-written, served at
/v1/openapi.json). Every path the app routes is listed; tests check the two agree."""

from __future__ import annotations

from typing import Any

_ERR = {"$ref": "#/components/responses/Error"}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_PAGE = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {"name": "marker", "in": "query", "schema": {"type": "string"},
     "description": "the last id of the previous page"},
]


def _q(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "schema": {"type": "string"}} for n in names]


def _op(summary: str, *, body: str | None = None, params: list[dict[str, Any]] | None = None,
        status: str = "200", schema: str = "Object", open_: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            status: {"description": "OK", "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR, "409": _ERR,
        },
    }
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    if open_:
        op["security"] = []
    return op


def _collection(kind: str, plural: str, filters: tuple[str, ...], *,
                create: bool = True) -> dict[str, Any]:
    item: dict[str, Any] = {
        "get": _op(f"list {plural}", params=[*_q(*filters), *_PAGE], schema="Page"),
    }
    if create:
        item["post"] = _op(f"create a {kind}", body=f"{kind.title()}Create", status="201")
    return item


def _resource(kind: str, *, delete: bool = True, patch: bool = False) -> dict[str, Any]:
    item: dict[str, Any] = {"parameters": [_ID], "get": _op(f"show a {kind}")}
    if delete:
        item["delete"] = _op(f"delete a {kind}")
    if patch:
        item["patch"] = _op(f"update a {kind}", body=f"{kind.title()}Update")
    return item


def _obj(required: tuple[str, ...], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": props,
            "additionalProperties": False}


_S = {"type": "string"}
_SN = {"type": ["string", "null"]}
_FIXED = {"type": "array", "items": _obj((), subnet_id=_S, ip_address=_S)}


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/health": {"get": _op("liveness and current revision", open_=True)},
        "/v1/openapi.json": {"get": _op("this document", open_=True)},
        "/v1/projects": _collection("project", "projects", ("name",)),
        "/v1/projects/{id}": _resource("project", delete=False),
        "/v1/networks": _collection("network", "networks", ("name", "project_id")),
        "/v1/networks/{id}": _resource("network"),
        "/v1/subnets": _collection("subnet", "subnets", ("network_id", "name", "cidr")),
        "/v1/subnets/{id}": _resource("subnet"),
        "/v1/routers": _collection("router", "routers", ("name",)),
        "/v1/routers/{id}": _resource("router"),
        "/v1/routers/{id}/add_interface": {"parameters": [_ID], "post": _op(
            "attach a subnet: a port holding its gateway IP", body="Interface")},
        "/v1/routers/{id}/remove_interface": {"parameters": [_ID], "post": _op(
            "detach a subnet", body="Interface")},
        "/v1/ports": _collection("port", "ports", (
            "network_id", "device_id", "device_owner", "ip_address", "project_id",
            "mac_address")),
        "/v1/ports/{id}": _resource("port"),
        "/v1/keypairs": _collection("keypair", "keypairs", ("name", "project_id")),
        "/v1/keypairs/{id}": _resource("keypair"),
        "/v1/instances": _collection("instance", "instances", ("name", "project_id")),
        "/v1/instances/{id}": _resource("instance", patch=True),
        "/v1/instances/{id}/password": {
            "parameters": [_ID],
            "get": _op("the password slot"),
            "post": _op("set the password once (≤ 1020 chars)", body="Password"),
            "delete": _op("clear the password"),
        },
        "/v1/instances/{id}/view": {"parameters": [_ID], "get": _op(
            "everything the metadata API needs about one instance")},
        "/v1/lookup": {"get": _op("ports holding an IP behind a router or on a network",
                                  params=_q("ip", "router_id", "network_id"))},
        "/v1/topology": {"get": _op("all networks, subnets, routers and ports")},
        "/v1/agents": {"post": _op(
            "heartbeat of one agent (the reader token may send it)", body="Heartbeat")},
        "/v1/hosts": {"get": _op("nodes: roles, alive, last heartbeat, routers, networks")},
        "/v1/hosts/{id}": {"parameters": [_ID], "get": _op("one node by name"),
                           "delete": _op("forget a dead node; its work is placed elsewhere")},
        "/v1/changes": {"get": _op(
            "changes after a revision, long-poll up to wait seconds (≤ 60); 410 = resync; "
            "answers {revision, changes, head, lease_s, hold_s}",
            params=[{"name": "since", "in": "query", "schema": {"type": "integer"}},
                    {"name": "wait", "in": "query", "schema": {"type": "number",
                                                               "maximum": 60}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}}])},
    }
    schemas: dict[str, Any] = {
        "Object": {"type": "object"},
        "Page": {"type": "object", "description": "{<plural>: [...], next: marker | null}"},
        "ProjectCreate": _obj(("name",), name=_S),
        "NetworkCreate": _obj(("name",), name=_S, project_id=_S,
                              mtu={"type": "integer", "default": 1500}),
        "SubnetCreate": _obj(
            ("network_id", "cidr"), name=_S, network_id=_S, cidr=_S, project_id=_S,
            ip_version={"enum": [4, 6]},
            gateway_ip={"type": ["string", "null"],
                        "description": "omitted = first host, null = no gateway"},
            enable_dhcp={"type": "boolean", "default": True},
            allocation_pools={"type": "array", "items": _obj(("start", "end"), start=_S,
                                                             end=_S)},
            dns_nameservers={"type": "array", "items": _S},
            host_routes={"type": "array", "items": _obj(("destination", "nexthop"),
                                                        destination=_S, nexthop=_S)},
            ipv6_address_mode={"enum": ["slaac", "dhcpv6-stateful", "dhcpv6-stateless", None]},
            ipv6_ra_mode={"enum": ["slaac", "dhcpv6-stateful", "dhcpv6-stateless", None]}),
        "RouterCreate": _obj(("name",), name=_S, project_id=_S),
        "Interface": _obj(("subnet_id",), subnet_id=_S),
        "PortCreate": _obj(("network_id",), network_id=_S, fixed_ips=_FIXED, device_id=_S,
                           device_owner=_S, mac_address=_S, name=_S, project_id=_S),
        "KeypairCreate": _obj(("name", "public_key"), name=_S, public_key=_S, project_id=_S),
        "InstanceCreate": _obj(
            ("name", "network_id"), name=_S, network_id=_S, fixed_ip=_S, key_name=_S,
            user_data={"type": "string", "contentEncoding": "base64",
                       "description": "≤ 65536 bytes decoded"},
            metadata={"type": "object", "additionalProperties": _S},
            availability_zone={"type": "string", "default": "nova"},
            flavor={"type": "string", "default": "m1.small"}, project_id=_S, hostname=_S,
            host={"type": "string", "description": "compute node it runs on"},
            image_id=_SN, id=_S),
        "InstanceUpdate": _obj((), name=_S,
                               metadata={"type": "object", "additionalProperties": _S},
                               metadata_unset={"type": "array", "items": _S}),
        "Password": _obj(("password",), password={"type": "string", "maxLength": 1020}),
        "Heartbeat": _obj(("host", "type"), host=_S,
                          type={"enum": ["registry", "api", "l3", "dhcp", "metadata", "l2"]}),
        "Error": _obj(("error", "reason"), error=_S, reason=_S, field=_S,
                      revision={"type": "integer"}),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "openimds registry", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {"Error": {"description": "error", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Error"}}}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
