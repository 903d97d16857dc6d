"""`openimds api` as a real process against a real `openimds registry serve`: the status
matrix over HTTP, freshness through the change feed, IMDSv2, password, registry outage.

`api_stack()` (also used by test_api_clients.py) starts both from one config and seeds a
network, a subnet, a key pair and an instance; `SigningRelay` is a tiny HTTP relay that adds
the agent's identity headers, so unmodified clients can be pointed at it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from openimds.core.signing import sign_instance_id
from openimds.registry.client import RegistryClient
from tests.support import (
    Service,
    base_config,
    http_ready,
    openimds_service,
    tcp_ready,
    write_config,
)

PUBKEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"
          " test@openimds")
USER_DATA = b"#cloud-config\nruncmd:\n - echo hi\n\xff binary tail"


@dataclass
class Stack:
    config: Path
    registry_url: str
    api_host: str
    api_port: int
    secret: bytes
    registry: RegistryClient
    api: Service
    registry_service: Service
    instance: dict[str, Any]
    network: dict[str, Any]
    subnet: dict[str, Any]
    keypair: dict[str, Any]

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def headers(self, instance: dict[str, Any] | None = None, /,
                **extra: str) -> dict[str, str]:
        inst = instance or self.instance
        ip = inst["ports"][0]["fixed_ips"][0]["ip_address"] if inst.get("ports") else ""
        out = {"X-Forwarded-For": ip, "X-Instance-ID": inst["id"],
               "X-Tenant-ID": inst["project_id"],
               "X-Instance-ID-Signature": sign_instance_id(self.secret, inst["id"])}
        out.update(extra)
        return out

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.api_host, self.api_port, timeout=10)
        try:
            conn.request(method, path, body=body,
                         headers=self.headers() if headers is None else headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get(self, path: str, /, **extra: str) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, self.headers(**extra))


@contextlib.contextmanager
def api_stack(tmp: Path, *, api: dict[str, Any] | None = None) -> Iterator[Stack]:
    """Registry + API processes from one config, with one seeded instance."""
    cfg = base_config(tmp / "state", api=api or {})
    config = write_config(tmp / "openimds.ini", cfg)
    reg = cfg["registry"]
    url = f"http://127.0.0.1:{reg['bind_port']}"
    with contextlib.ExitStack() as stack:
        registry_svc = openimds_service("registry", config, "registry", "serve", log_dir=tmp)
        stack.callback(registry_svc.stop)
        registry_svc.start().wait_until(http_ready(url + "/v1/health"))
        client = RegistryClient(url, reg["admin_token"])
        stack.callback(client.close)
        net = client.create_network("private", project_id="demo", mtu=1450)
        subnet = client.create_subnet("private-v4", net["id"], "10.20.0.0/24",
                                      dns_nameservers=["10.20.0.53"])
        keypair = client.create("keypair", {"name": "mykey", "public_key": PUBKEY,
                                            "project_id": net["project_id"]})
        instance = client.create_instance(
            "web-1", net["id"], key_name="mykey", project_id=net["project_id"],
            user_data=base64.b64encode(USER_DATA).decode(),
            metadata={"role": "web", "tier": "1"}, image_id="c0ffee00-0000-4000-8000-000000000001")
        host, port = cfg["api"]["metadata_listen"], int(cfg["api"]["metadata_listen_port"])
        api_svc = openimds_service("api", config, "api", log_dir=tmp)
        stack.callback(api_svc.stop)
        api_svc.start().wait_until(tcp_ready(host, port))
        yield Stack(config, url, host, port,
                    cfg["DEFAULT"]["metadata_proxy_shared_secret"].encode(), client, api_svc,
                    registry_svc, instance, net, subnet, keypair)


class SigningRelay:
    """Relays any request to the API, adding the agent's identity headers for one instance
    (and dropping the client's identity headers, as the agent does)."""

    def __init__(self, stack: Stack, instance: dict[str, Any] | None = None) -> None:
        self.stack = stack
        self.instance = instance or stack.instance
        self.requests: list[tuple[str, str, int]] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if not k.lower().startswith(("x-instance-id", "x-tenant-id",
                                                        "x-forwarded-", "host"))}
                headers.update(relay.stack.headers(relay.instance))
                conn = http.client.HTTPConnection(stack.api_host, stack.api_port, timeout=10)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    relay.requests.append((self.command, self.path, resp.status))
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding", "date",
                                             "server"):
                            self.send_header(k, v)
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> SigningRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_stack(tmp_path_factory.mktemp("api")) as s:
        yield s


# ------------------------------------------------------------------------------ tests


def test_root_without_identity(stack: Stack) -> None:
    status, headers, body = stack.request("GET", "/", headers={})
    assert status == 200
    assert body == (b"1.0\n2007-01-19\n2007-03-01\n2007-08-29\n2007-10-10\n2007-12-15\n"
                    b"2008-02-01\n2008-09-01\n2009-04-04\nlatest")
    assert headers["content-type"] == "text/plain; charset=UTF-8"
    assert headers["etag"]


def test_status_matrix(stack: Stack) -> None:
    inst = stack.instance
    good = stack.headers()
    cases: list[tuple[str, str, dict[str, str], bytes | None, int]] = [
        ("GET", "/latest/meta-data/", good, None, 200),
        ("HEAD", "/latest/meta-data/", good, None, 200),
        ("GET", "/latest/meta-data/", {k: v for k, v in good.items()
                                       if k != "X-Instance-ID"}, None, 400),
        ("GET", "/latest/meta-data/", {k: v for k, v in good.items()
                                       if k != "X-Instance-ID-Signature"}, None, 400),
        ("GET", "/latest/meta-data/", {k: v for k, v in good.items()
                                       if k != "X-Tenant-ID"}, None, 400),
        ("GET", "/latest/meta-data/", {**good, "X-Instance-ID-Signature": "0" * 64}, None, 403),
        ("GET", "/latest/meta-data/", {**good, "X-Tenant-ID": "someone-else"}, None, 404),
        ("GET", "/latest/meta-data/", {
            **good, "X-Instance-ID": "00000000-0000-4000-8000-000000000000",
            "X-Instance-ID-Signature": sign_instance_id(
                stack.secret, "00000000-0000-4000-8000-000000000000")}, None, 404),
        ("GET", "/latest/meta-data/nope", good, None, 404),
        ("GET", "/latest/meta-data/hostname/below", good, None, 404),
        ("GET", "/latest/meta-data/security-groups/default", good, None, 404),
        ("GET", "/latest/user-data/x", good, None, 404),
        ("GET", "/2099-01-01/meta-data/", good, None, 404),
        ("GET", "/openstack/2099-01-01/meta_data.json", good, None, 404),
        ("GET", "/2009-04-04/dynamic/instance-identity/document", good, None, 404),
        ("PUT", "/2021-03-23/api/token", good, b"", 403),
        ("POST", "/latest/meta-data/hostname", good, b"x", 405),
        ("DELETE", "/openstack/latest/password", good, None, 405),
        ("GET", "/latest/api/token", good, None, 405),
        ("PUT", "/latest/api/token", good, b"", 400),
    ]
    for method, path, headers, body, expected in cases:
        status, resp_headers, _ = stack.request(method, path, headers, body)
        assert status == expected, (method, path, status)
        if status == 405:
            assert resp_headers["allow"]
    assert inst["id"]


def test_oversized_and_malformed(stack: Stack) -> None:
    import socket

    def raw(data: bytes) -> bytes:
        with socket.create_connection((stack.api_host, stack.api_port), timeout=5) as s:
            s.sendall(data)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                out += chunk

    assert raw(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    assert raw(huge).startswith(b"HTTP/1.1 431")
    body = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    assert raw(body).startswith(b"HTTP/1.1 413")
    # still serving
    assert stack.get("/latest/meta-data/instance-id")[0] == 200


def test_documents_match_registry(stack: Stack) -> None:
    inst = stack.registry.get("instance", stack.instance["id"])
    status, headers, body = stack.get("/openstack/latest/meta_data.json")
    assert status == 200 and headers["content-type"] == "application/json"
    md = json.loads(body)
    assert md["uuid"] == inst["id"]
    assert md["meta"] == inst["metadata"]
    assert md["public_keys"] == {"mykey": PUBKEY}
    assert md["hostname"] == f"{inst['hostname']}.novalocal"
    assert md["project_id"] == inst["project_id"]
    assert stack.get("/openstack/latest/user_data")[2] == USER_DATA
    assert stack.get("/latest/user-data")[2] == USER_DATA
    assert stack.get("/latest/meta-data/instance-id")[2] == b"i-%08x" % inst["ec2_id"]
    ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
    assert stack.get("/latest/meta-data/local-ipv4")[2] == ip.encode()
    status, headers, body = stack.get("/openstack/latest/network_data.json")
    assert headers["content-type"] == "application/json"
    nd = json.loads(body)
    assert nd["links"][0]["ethernet_mac_address"] == inst["ports"][0]["mac_address"]
    assert nd["networks"][0]["network_id"] == stack.network["id"]
    assert nd["services"] == [{"type": "dns", "address": "10.20.0.53"}]


def test_etag_304(stack: Stack) -> None:
    status, headers, _ = stack.get("/openstack/latest/network_data.json")
    etag = headers["etag"]
    again = stack.get("/openstack/latest/network_data.json", **{"If-None-Match": etag})
    assert again[0] == 304 and again[2] == b""


def test_property_change_visible_within_1s(stack: Stack) -> None:
    iid = stack.instance["id"]
    assert stack.get("/openstack/latest/meta_data.json")[0] == 200  # cached now
    for round_ in range(3):
        value = f"v{round_}-{time.monotonic_ns()}"
        start = time.monotonic()
        stack.registry.update("instance", iid, {"metadata": {"probe": value}})
        while True:
            md = json.loads(stack.get("/openstack/latest/meta_data.json")[2])
            if md.get("meta", {}).get("probe") == value:
                break
            assert time.monotonic() - start < 1.0, "change not visible within 1 s"
            time.sleep(0.01)


def test_port_change_invalidates_network_data(stack: Stack) -> None:
    """A DHCP port appearing on an isolated static subnet adds the metadata route to the
    documents of every instance on the network (a change to a port the instance does not own)."""
    client = stack.registry
    net = client.create_network("static", project_id=stack.network["project_id"])
    sub = client.create_subnet("static-v4", net["id"], "10.30.0.0/24", enable_dhcp=False)
    inst = client.create_instance("static-1", net["id"], project_id=net["project_id"])
    hdrs = stack.headers(inst)

    def routes() -> list[dict[str, str]]:
        nd = json.loads(stack.request("GET", "/openstack/latest/network_data.json", hdrs)[2])
        result: list[dict[str, str]] = nd["networks"][0]["routes"]
        return result

    assert nd_type(stack, hdrs) == "ipv4"
    assert all(r["network"] != "169.254.169.254" for r in routes())
    port = client.create("port", {"network_id": net["id"], "device_owner": "network:dhcp",
                                  "device_id": "dhcp-agent",
                                  "fixed_ips": [{"subnet_id": sub["id"]}]})
    dhcp_ip = port["fixed_ips"][0]["ip_address"]
    deadline = time.monotonic() + 30.0  # for a loaded machine; ends once seen
    while {"network": "169.254.169.254", "netmask": "255.255.255.255",
           "gateway": dhcp_ip} not in routes():
        assert time.monotonic() < deadline, routes()
        time.sleep(0.01)


def nd_type(stack: Stack, hdrs: dict[str, str]) -> str:
    nd = json.loads(stack.request("GET", "/openstack/latest/network_data.json", hdrs)[2])
    return str(nd["networks"][0]["type"])


def test_password_post_once(stack: Stack) -> None:
    other = stack.registry.create_instance(
        "pw", stack.network["id"], project_id=stack.network["project_id"])
    hdrs = stack.headers(other)
    assert stack.request("GET", "/openstack/latest/password", hdrs)[2] == b""
    too_big = stack.request("POST", "/openstack/latest/password", hdrs, b"x" * 1021)
    assert too_big[0] == 400
    assert stack.request("POST", "/openstack/latest/password", hdrs, b"c2VjcmV0")[0] == 200
    assert stack.request("GET", "/openstack/latest/password", hdrs)[2] == b"c2VjcmV0"
    assert stack.registry.get_password(other["id"]) == "c2VjcmV0"
    assert stack.request("POST", "/openstack/latest/password", hdrs, b"again")[0] == 409


def test_get_never_writes(stack: Stack) -> None:
    before = stack.registry.health()["revision"]
    for path in ("/latest/meta-data/", "/openstack/latest/meta_data.json",
                 "/openstack/latest/password", "/latest/meta-data/instance-id"):
        stack.get(path)
    assert stack.registry.health()["revision"] == before


def test_imdsv2(stack: Stack) -> None:
    ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}
    status, headers, token = stack.request("PUT", "/latest/api/token", stack.headers(**ttl))
    assert status == 200 and headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    ok = stack.get("/latest/meta-data/instance-id",
                   **{"X-aws-ec2-metadata-token": token.decode()})
    assert ok[0] == 200
    bad = stack.get("/latest/meta-data/instance-id", **{"X-aws-ec2-metadata-token": "nope"})
    assert bad[0] == 401
    for value in ("0", "21601", "abc"):
        r = stack.request("PUT", "/latest/api/token",
                          stack.headers(**{"X-aws-ec2-metadata-token-ttl-seconds": value}))
        assert r[0] == 400
    proxied = stack.request("PUT", "/latest/api/token",
                            stack.headers(**ttl, Via="1.1 squid"))
    assert proxied[0] == 403


def test_tokens_required(tmp_path: Path) -> None:
    with api_stack(tmp_path, api={"imds_tokens": "required"}) as s:
        assert s.get("/latest/meta-data/instance-id")[0] == 401
        _, _, token = s.request(
            "PUT", "/latest/api/token",
            s.headers(**{"X-aws-ec2-metadata-token-ttl-seconds": "60"}))
        ok = s.get("/latest/meta-data/instance-id", **{"X-aws-ec2-metadata-token": token.decode()})
        assert ok[0] == 200


def test_registry_down_503_then_recovers(tmp_path: Path) -> None:
    with api_stack(tmp_path) as s:
        assert s.get("/latest/meta-data/instance-id")[0] == 200
        time.sleep(1.0)  # the feed's first (resync) batch empties the cache once at start
        assert s.get("/latest/meta-data/instance-id")[0] == 200
        s.registry_service.stop()
        # cached documents are still served; an uncached instance gets 503 + Retry-After
        assert s.get("/latest/meta-data/instance-id")[0] == 200
        fake = {"id": "11111111-2222-4333-8444-555555555555", "project_id": "p", "ports": []}
        status, headers, _ = s.request("GET", "/latest/meta-data/", s.headers(fake))
        assert status == 503 and headers["retry-after"]
        s.registry_service.start().wait_until(http_ready(s.registry_url + "/v1/health"))
        deadline = time.monotonic() + 15
        while s.get("/latest/meta-data/instance-id")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert s.api.alive()
