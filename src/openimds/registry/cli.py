"""`openimds registry serve` and the OpenStack-like resource commands.

    openimds network create NAME [--project P]
    openimds subnet create NAME --network NET --cidr CIDR [--gateway IP | --no-gateway] ...
    openimds router add-interface ROUTER SUBNET
    openimds server create NAME --network NET [--fixed-ip IP] ...

Every resource command talks to the registry REST API with the admin token; names or IDs
are accepted wherever an object is named (an ambiguous name is an error naming the matches).
"""

from __future__ import annotations

import argparse
import base64
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openimds.cli import add_command
from openimds.errors import BadRequest, Conflict, NotFound
from openimds.output import emit_list, emit_one

if TYPE_CHECKING:
    from openimds.registry.client import RegistryClient

    Sub = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Sub = argparse._SubParsersAction
Obj = dict[str, Any]


# ---------------------------------------------------------------------- helpers


def _client(settings: Any) -> RegistryClient:
    # Imported here, not above: httpx is for the resource commands, not serve/migrate/--help.
    from openimds.registry.client import RegistryClient

    return RegistryClient.from_settings(settings, admin=True)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def resolve(client: RegistryClient, kind: str, ref: str, **scope: Any) -> Obj:
    """The one object of kind named by ID or name; NotFound / Conflict naming the matches."""
    if _is_uuid(ref):
        try:
            return client.get(kind, ref)
        except NotFound:
            pass
    matches = client.list(kind, name=ref, **scope)
    if not matches:
        raise NotFound(f"no {kind} named or with ID {ref!r}")
    if len(matches) > 1:
        ids = ", ".join(m["id"] for m in matches)
        raise Conflict(f"{kind} name {ref!r} is ambiguous: {ids}; use an ID")
    return matches[0]


def _kv(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise BadRequest(f"{flag}: {text!r} is not key=value")
    return key, value


def _pairs(text: str, flag: str, keys: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        k, v = _kv(part.strip(), flag)
        if k not in keys:
            raise BadRequest(f"{flag}: unknown key {k!r} in {text!r} (expected {', '.join(keys)})")
        out[k] = v
    missing = [k for k in keys if k not in out]
    if missing:
        raise BadRequest(f"{flag}: {text!r} lacks {', '.join(missing)}")
    return out


def _read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise BadRequest(f"{flag}: cannot read {path}: {exc.strerror}") from None


def _ips(port_list: Sequence[Obj]) -> list[str]:
    return [ip["ip_address"] for p in port_list for ip in p.get("fixed_ips", [])]


def _show(obj: Obj, args: argparse.Namespace) -> int:
    emit_one(obj, args.format)
    return 0


def _list(items: Sequence[Obj], columns: Sequence[str], args: argparse.Namespace,
          table_view: Callable[[Obj], Obj] | None = None) -> int:
    if args.format != "json" and table_view is not None:
        items = [table_view(i) for i in items]
    emit_list(items, columns, args.format)
    return 0


def _group(sub: Sub, name: str, help: str) -> Sub:
    parser = sub.add_parser(name, help=help, description=help)
    group: Sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    return group


# ---------------------------------------------------------------------- registry serve


def _serve(args: argparse.Namespace, settings: Any) -> int:
    import asyncio

    from openimds.log import setup_logging
    from openimds.registry.app import serve

    setup_logging(debug=settings.debug, log_file=settings.log_file, component="registry",
                  fmt=settings.log_format)
    asyncio.run(serve(settings))
    return 0


def _store(settings: Any) -> Any:
    from openimds.registry.store import Store

    return Store(settings.registry_connection,
                 change_retention=settings.registry.change_retention,
                 sqlite_synchronous=settings.registry.sqlite_synchronous)


def _backup(args: argparse.Namespace, settings: Any) -> int:
    from pathlib import Path

    from openimds.registry.backup import write_backup

    store = _store(settings)
    try:
        store.create_schema()
        done = write_backup(store, Path(args.file))
    finally:
        store.dispose()
    print(f"{args.file}: {done['rows']} rows at revision {done['revision']}, schema "
          f"{done['schema']}, sha256 {done['sha256']}")
    return 0


def _restore(args: argparse.Namespace, settings: Any) -> int:
    from pathlib import Path

    from openimds.registry.backup import read_backup, restore, summary

    data = read_backup(Path(args.file))  # checked: refuses a corrupt or mismatched file
    if args.check:
        s = summary(data)
        print(f"{args.file}: consistent, {s['rows']} rows at revision {s['revision']}"
              + _upgraded_note(s))
        return 0
    store = _store(settings)
    try:
        done = restore(store, data, replace=args.replace)
    finally:
        store.dispose()
    print(f"restored {done['rows']} rows from {args.file}; the registry is at revision "
          f"{done['revision']} (every agent and API resyncs)" + _upgraded_note(done))
    return 0


def _upgraded_note(s: Obj) -> str:
    if not s.get("upgraded_from"):
        return ""
    return f" (upgraded from schema revision {s['upgraded_from']} to {s['schema']})"


def _migrate(args: argparse.Namespace, settings: Any) -> int:
    from openimds.registry import migrations

    if args.sql:
        from openimds.registry.store import normalize_url

        sys.stdout.write(migrations.offline_sql(normalize_url(settings.registry_connection),
                                                args.start, args.to))
        return 0
    if args.start:
        raise BadRequest("--from goes with --sql (online, the database says where it is)")
    store = _store(settings)
    try:
        before, after = store.create_schema(to=args.to)
    finally:
        store.dispose()
    if not before:
        print(f"created the registry schema at revision {after}")
    elif before == after:
        print(f"the registry schema is at revision {after}: nothing to do")
    else:
        print(f"upgraded the registry schema from revision {before} to {after}")
    return 0


def _db_version(args: argparse.Namespace, settings: Any) -> int:
    from openimds.registry import migrations

    store = _store(settings)
    try:
        db = store.url.database
        if store.backend == "sqlite" and db not in (None, "", ":memory:") \
                and not Path(db).exists():  # do not create it (with the umask's mode)
            found: dict[str, str | None] = {"current": None, "detected": None,
                                             "head": migrations.head()}
        else:
            with store.read() as conn:
                found = migrations.status(conn)
    finally:
        store.dispose()
    current, head = found["current"] or found["detected"], found["head"]
    order = migrations.revisions()
    if current is None:
        note = f"empty: the registry creates it at revision {head} when it starts"
    elif current not in order:
        note = "made by a newer openimds: this release refuses to start on it"
    elif current == head:
        note = "up to date"
    else:
        pending = order[order.index(current) + 1:]
        note = (f"{len(pending)} migration(s) pending ({' '.join(pending)}): the registry "
                "applies them when it starts, or `openimds registry migrate`")
    if found["detected"]:
        note = f"no revision recorded (made before migrations), tables match it; {note}"
    emit_one({"schema": current, "head": head, "status": note}, args.format)
    return 0 if current is None or current in order else 1


# ---------------------------------------------------------------------- projects


def _project_create(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        return _show(c.create("project", {"name": args.name}), args)


def _project_list(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        return _list(c.list("project"), ["id", "name"], args)


# ---------------------------------------------------------------------- networks


def _network_create(args: argparse.Namespace, settings: Any) -> int:
    body: Obj = {"name": args.name}
    if args.project:
        body["project_id"] = args.project
    if args.mtu is not None:
        body["mtu"] = args.mtu
    with _client(settings) as c:
        return _show(c.create("network", body), args)


def _network_list(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        items = c.list("network", project_id=args.project)
    return _list(items, ["id", "name", "project_id", "mtu", "subnets", "hosts", "dhcp"], args,
                 _network_table)


def _network_table(n: Obj) -> Obj:
    """DHCP as host=ip,ip per serving node (a reserved port as -=ip)."""
    return {**n, "dhcp": [f"{d['host'] or '-'}={','.join(d['ip_addresses'])}"
                          for d in n.get("dhcp", ())]}


def _deleter(kind: str) -> Callable[[argparse.Namespace, Any], int]:
    """The handler of `<resource> delete REF...`: resolve each name or ID, delete it."""

    def delete(args: argparse.Namespace, settings: Any) -> int:
        with _client(settings) as c:
            for ref in args.refs:
                c.delete(kind, resolve(c, kind, ref)["id"])
        return 0

    return delete


def _network_show(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        return _show(resolve(c, "network", args.network), args)


# ---------------------------------------------------------------------- subnets


def _subnet_create(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        net = resolve(c, "network", args.network)
        body: Obj = {"name": args.name, "network_id": net["id"], "cidr": args.cidr,
                     "enable_dhcp": not args.no_dhcp}
        if args.no_gateway:
            body["gateway_ip"] = None
        elif args.gateway:
            body["gateway_ip"] = args.gateway
        if args.dns:
            body["dns_nameservers"] = args.dns
        for key in ("ip_version", "ipv6_address_mode", "ipv6_ra_mode"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        if args.allocation_pool:
            body["allocation_pools"] = [
                _pairs(p, "--allocation-pool", ("start", "end")) for p in args.allocation_pool]
        if args.host_route:
            routes = [_pairs(r, "--host-route", ("destination", "gateway"))
                      for r in args.host_route]
            body["host_routes"] = [{"destination": r["destination"], "nexthop": r["gateway"]}
                                   for r in routes]
        return _show(c.create("subnet", body), args)


def _subnet_table(s: Obj) -> Obj:
    pools = [f"{p['start']}-{p['end']}" for p in s.get("allocation_pools", [])]
    return {**s, "allocation_pools": pools}


def _subnet_list(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        filters: Obj = {}
        if args.network:
            filters["network_id"] = resolve(c, "network", args.network)["id"]
        items = c.list("subnet", **filters)
    return _list(items, ["id", "name", "network_id", "cidr", "gateway_ip", "enable_dhcp"],
                 args)


def _subnet_show(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        s = resolve(c, "subnet", args.subnet)
    return _show(s if args.format == "json" else _subnet_table(s), args)


# ---------------------------------------------------------------------- routers


def _router_table(r: Obj) -> Obj:
    ifaces = [f"{i['ip_address']} ({i['subnet_id']})" for i in r.get("interfaces", [])]
    return {**r, "interfaces": ifaces}


def _router_create(args: argparse.Namespace, settings: Any) -> int:
    body: Obj = {"name": args.name}
    if args.project:
        body["project_id"] = args.project
    with _client(settings) as c:
        return _show(c.create("router", body), args)


def _router_list(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        items = c.list("router")
    return _list(items, ["id", "name", "project_id", "interfaces", "hosts"], args,
                 _router_table)


def _router_show(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        r = resolve(c, "router", args.router)
    return _show(r if args.format == "json" else _router_table(r), args)


def _router_add_interface(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        router = resolve(c, "router", args.router)
        subnet = resolve(c, "subnet", args.subnet)
        port = c.add_interface(router["id"], subnet["id"])
    return _show(port if args.format == "json" else _port_table(port), args)


def _router_remove_interface(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        router = resolve(c, "router", args.router)
        subnet = resolve(c, "subnet", args.subnet)
        c.remove_interface(router["id"], subnet["id"])
    return 0


# ---------------------------------------------------------------------- ports


def _port_table(p: Obj) -> Obj:
    ips = [f"{i['ip_address']}" for i in p.get("fixed_ips", [])]
    return {**p, "fixed_ips": ips}


def _port_list(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        filters: Obj = {"device_owner": args.device_owner}
        if args.network:
            filters["network_id"] = resolve(c, "network", args.network)["id"]
        if args.server:
            filters["device_id"] = resolve(c, "instance", args.server)["id"]
        items = c.list("port", **filters)
    return _list(items, ["id", "name", "mac_address", "fixed_ips", "device_owner", "device_id"],
                 args, _port_table)


def _port_show(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        p = resolve(c, "port", args.port)
    return _show(p if args.format == "json" else _port_table(p), args)


# ---------------------------------------------------------------------- keypairs


def _keypair_create(args: argparse.Namespace, settings: Any) -> int:
    text = _read_file(args.public_key, "--public-key").decode("utf-8", "replace")
    body: Obj = {"name": args.name, "public_key": text}
    if args.project:
        body["project_id"] = args.project
    with _client(settings) as c:
        return _show(c.create("keypair", body), args)


def _keypair_list(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        items = c.list("keypair", project_id=args.project)
    return _list(items, ["id", "name", "fingerprint", "project_id"], args)


def _keypair_show(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        return _show(resolve(c, "keypair", args.keypair), args)


# ---------------------------------------------------------------------- servers


def _server_summary(inst: Obj) -> Obj:
    ports = inst.get("ports", [])
    macs = [p["mac_address"] for p in ports]
    head = {"id": inst["id"], "name": inst["name"], "ip_address": ", ".join(_ips(ports)),
            "mac_address": ", ".join(macs)}
    return {**head, **{k: v for k, v in inst.items() if k not in head}}


def _server_table(inst: Obj) -> Obj:
    s = _server_summary(inst)
    s["ports"] = [p["id"] for p in inst.get("ports", [])]
    if s.get("user_data"):
        s["user_data"] = f"<{len(base64.b64decode(s['user_data']))} bytes>"
    return s


def _server_create(args: argparse.Namespace, settings: Any) -> int:
    body: Obj = {"name": args.name, "availability_zone": args.availability_zone,
                 "flavor": args.flavor}
    for flag, key in (("fixed_ip", "fixed_ip"), ("key_name", "key_name"),
                      ("hostname", "hostname"), ("image", "image_id"), ("host", "host")):
        if getattr(args, flag):
            body[key] = getattr(args, flag)
    if args.user_data:
        body["user_data"] = base64.b64encode(_read_file(args.user_data, "--user-data")).decode()
    if args.property:
        body["metadata"] = dict(_kv(p, "--property") for p in args.property)
    with _client(settings) as c:
        net = resolve(c, "network", args.network)
        body["network_id"] = net["id"]
        if args.project:
            body["project_id"] = args.project
        inst = c.create("instance", body)
    return _show(_server_summary(inst) if args.format == "json" else _server_table(inst), args)


def _server_list(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        items = c.list("instance", project_id=args.project)

    def row(i: Obj) -> Obj:
        return {**i, "addresses": _ips(i.get("ports", []))}

    return _list(items, ["id", "name", "hostname", "addresses", "project_id", "flavor"], args,
                 row)


def _server_show(args: argparse.Namespace, settings: Any) -> int:
    with _client(settings) as c:
        inst = resolve(c, "instance", args.server)
    return _show(_server_summary(inst) if args.format == "json" else _server_table(inst), args)


def _server_set(args: argparse.Namespace, settings: Any) -> int:
    body: Obj = {}
    if args.property:
        body["metadata"] = dict(_kv(p, "--property") for p in args.property)
    if args.name:
        body["name"] = args.name
    if not body:
        raise BadRequest("server set: give --property k=v or --name")
    with _client(settings) as c:
        inst = c.update("instance", resolve(c, "instance", args.server)["id"], body)
    return _show(_server_summary(inst) if args.format == "json" else _server_table(inst), args)


def _server_unset(args: argparse.Namespace, settings: Any) -> int:
    if not args.property:
        raise BadRequest("server unset: give --property KEY")
    with _client(settings) as c:
        inst = c.update("instance", resolve(c, "instance", args.server)["id"],
                        {"metadata_unset": args.property})
    return _show(_server_summary(inst) if args.format == "json" else _server_table(inst), args)


# ---------------------------------------------------------------------- wiring


def register(sub: Sub) -> None:
    reg = _group(sub, "registry", "the registry (control plane)")
    add_command(reg, "serve", _serve, "run the registry REST API", formatted=False)
    p = add_command(reg, "backup", _backup, "write the whole registry to FILE (one "
                    "consistent snapshot, checksummed, mode 0600)", formatted=False)
    p.add_argument("file", metavar="FILE")
    p = add_command(reg, "restore", _restore, "replace the registry's contents with a backup "
                    "FILE, after checking it (checksum, row counts, schema, invariants)",
                    formatted=False)
    p.add_argument("file", metavar="FILE")
    p.add_argument("--replace", action="store_true",
                   help="replace a registry that is not empty (default: refuse)")
    p.add_argument("--check", action="store_true", help="only check FILE; change nothing")
    p = add_command(reg, "migrate", _migrate, "upgrade the registry's database schema in place "
                    "(the registry does it when it starts; back up first)", formatted=False)
    p.add_argument("--to", default="head", metavar="REV",
                   help="the revision to upgrade to (default: this release's newest)")
    p.add_argument("--sql", action="store_true",
                   help="print the SQL instead of running it (for the configured backend)")
    p.add_argument("--from", dest="start", default=None, metavar="REV",
                   help="with --sql: the revision the database is at (default: empty)")
    add_command(reg, "db-version", _db_version, "show the registry database's schema "
                "revision and this release's")

    proj = _group(sub, "project", "projects (tenants)")
    p = add_command(proj, "create", _project_create, "create a project")
    p.add_argument("name")
    add_command(proj, "list", _project_list, "list projects")

    net = _group(sub, "network", "networks")
    p = add_command(net, "create", _network_create, "create a network")
    p.add_argument("name")
    p.add_argument("--project", help="project name or ID (created if missing)")
    p.add_argument("--mtu", type=int)
    p = add_command(net, "list", _network_list, "list networks")
    p.add_argument("--project")
    p = add_command(net, "show", _network_show, "show a network")
    p.add_argument("network")
    p = add_command(net, "delete", _deleter("network"), "delete networks")
    p.add_argument("refs", nargs="+", metavar="network")

    subn = _group(sub, "subnet", "subnets")
    p = add_command(subn, "create", _subnet_create, "create a subnet")
    p.add_argument("name")
    p.add_argument("--network", required=True, help="network name or ID")
    p.add_argument("--cidr", required=True)
    gw = p.add_mutually_exclusive_group()
    gw.add_argument("--gateway", help="gateway IP (default: first host)")
    gw.add_argument("--no-gateway", action="store_true", help="no gateway")
    p.add_argument("--no-dhcp", action="store_true", help="disable DHCP")
    p.add_argument("--dns", action="append", metavar="IP", help="DNS nameserver (repeat)")
    p.add_argument("--allocation-pool", action="append", metavar="start=IP,end=IP")
    p.add_argument("--host-route", action="append", metavar="destination=CIDR,gateway=IP")
    p.add_argument("--ip-version", type=int, choices=(4, 6),
                   help="checked against --cidr (default: the CIDR's)")
    for opt in ("--ipv6-address-mode", "--ipv6-ra-mode"):
        p.add_argument(opt, choices=("slaac", "dhcpv6-stateful", "dhcpv6-stateless"),
                       help="Neutron's IPv6 mode (slaac/dhcpv6-stateless: EUI-64 addresses)")
    p = add_command(subn, "list", _subnet_list, "list subnets")
    p.add_argument("--network")
    p = add_command(subn, "show", _subnet_show, "show a subnet")
    p.add_argument("subnet")
    p = add_command(subn, "delete", _deleter("subnet"), "delete subnets")
    p.add_argument("refs", nargs="+", metavar="subnet")

    rt = _group(sub, "router", "routers")
    p = add_command(rt, "create", _router_create, "create a router")
    p.add_argument("name")
    p.add_argument("--project")
    add_command(rt, "list", _router_list, "list routers")
    p = add_command(rt, "show", _router_show, "show a router")
    p.add_argument("router")
    p = add_command(rt, "delete", _deleter("router"), "delete routers")
    p.add_argument("refs", nargs="+", metavar="router")
    p = add_command(rt, "add-interface", _router_add_interface,
                    "attach a subnet (a port holding its gateway IP)")
    p.add_argument("router")
    p.add_argument("subnet")
    p = add_command(rt, "remove-interface", _router_remove_interface, "detach a subnet")
    p.add_argument("router")
    p.add_argument("subnet")

    kp = _group(sub, "keypair", "SSH key pairs")
    p = add_command(kp, "create", _keypair_create, "import a public key")
    p.add_argument("name")
    p.add_argument("--public-key", required=True, metavar="FILE")
    p.add_argument("--project")
    p = add_command(kp, "list", _keypair_list, "list key pairs")
    p.add_argument("--project")
    p = add_command(kp, "show", _keypair_show, "show a key pair")
    p.add_argument("keypair")
    p = add_command(kp, "delete", _deleter("keypair"), "delete key pairs")
    p.add_argument("refs", nargs="+", metavar="keypair")

    srv = _group(sub, "server", "instances")
    p = add_command(srv, "create", _server_create,
                    "create an instance and its port in one transaction")
    p.add_argument("name")
    p.add_argument("--network", required=True, help="network name or ID")
    p.add_argument("--fixed-ip", metavar="IP")
    p.add_argument("--key-name", metavar="KEY")
    p.add_argument("--user-data", metavar="FILE")
    p.add_argument("--property", action="append", metavar="KEY=VALUE")
    p.add_argument("--availability-zone", default="nova", metavar="AZ")
    p.add_argument("--flavor", default="m1.small")
    p.add_argument("--project")
    p.add_argument("--hostname")
    p.add_argument("--image", metavar="IMAGE_ID")
    p.add_argument("--host", metavar="NODE",
                   help="the compute node it runs on (a lab VM is plugged there)")
    p = add_command(srv, "list", _server_list, "list instances")
    p.add_argument("--project")
    p = add_command(srv, "show", _server_show, "show an instance")
    p.add_argument("server")
    p = add_command(srv, "delete", _deleter("instance"), "delete instances and their ports")
    p.add_argument("refs", nargs="+", metavar="server")
    p = add_command(srv, "set", _server_set, "set properties or the name")
    p.add_argument("server")
    p.add_argument("--property", action="append", metavar="KEY=VALUE")
    p.add_argument("--name")
    p = add_command(srv, "unset", _server_unset, "remove properties")
    p.add_argument("server")
    p.add_argument("--property", action="append", metavar="KEY")

    port = _group(sub, "port", "ports")
    p = add_command(port, "list", _port_list, "list ports")
    p.add_argument("--network")
    p.add_argument("--server")
    p.add_argument("--device-owner")
    p = add_command(port, "show", _port_show, "show a port")
    p.add_argument("port")
