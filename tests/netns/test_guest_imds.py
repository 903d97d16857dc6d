"""What a guest sees beyond Nova, from real VM namespaces through the real routed datapath
(proxy in the router namespace -> agent -> API): IMDSv2 token rules, the token hop limit
with a real container namespace NATed behind the VM, the signed identity document checked
with `openssl smime -verify`, the identity JWT checked with the JWKS, `ec2-metadata`
region/account_id, wait_for_change, and `Connection: close` on the VM's hop."""

from __future__ import annotations

import base64
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from openimds.host import links
from tests import reaper
from tests.netns.test_routed_e2e import make_tenant, ns_exec, wait_metadata, wait_router_ready
from tests.support import PYTHON, write_config

pytestmark = pytest.mark.netns

BASE = "http://169.254.169.254"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds: 60"


def vm_curl(stack: Any, sid: str, *args: str,
            timeout: int = 30) -> subprocess.CompletedProcess[str]:
    return stack.vm_exec(sid, "curl", "-sS", "-m", str(timeout), *args)


def status_of(stack: Any, sid: str, *args: str) -> str:
    proc = vm_curl(stack, sid, "-o", "/dev/null", "-w", "%{http_code}", *args)
    return proc.stdout.strip()


class Container:
    """A network namespace routed behind a VM namespace, as Docker puts a container: its own
    veth into the VM, default route via the VM, the VM forwarding and masquerading it."""

    def __init__(self, vm_ns: str) -> None:
        self.vm_ns = vm_ns
        self.ns = f"ctr-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Container:
        ns, vm = self.ns, self.vm_ns
        tag = self.ns[4:10]
        inner, outer = f"ce{tag}", f"cv{tag}"
        reaper.register_namespace(ns)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            cmds = [
                ["ip", "link", "add", inner, "type", "veth", "peer", "name", outer],
                ["ip", "link", "set", inner, "netns", ns],
                ["ip", "link", "set", outer, "netns", vm],
            ]
            for cmd in cmds:
                subprocess.run(cmd, check=True)
            for cmd in (
                ["ip", "addr", "add", "172.31.9.1/30", "dev", outer],
                ["ip", "link", "set", outer, "up"],
                ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                ["nft", "add table ip ctrnat; add chain ip ctrnat post { type nat hook "
                 "postrouting priority 100 ; } ; add rule ip ctrnat post ip saddr "
                 "172.31.9.0/30 masquerade"],
            ):
                ns_exec(vm, *cmd)
            for cmd in (
                ["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", "172.31.9.2/30", "dev", inner],
                ["ip", "link", "set", inner, "up"],
                ["ip", "route", "add", "default", "via", "172.31.9.1"],
            ):
                ns_exec(ns, *cmd)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if links.namespace_exists(self.ns):
            links.delete_namespace(self.ns)  # its veth end goes with it, and the peer too
        links.remove_netns_etc(self.ns)

    def curl(self, *args: str, timeout: int = 30) -> subprocess.CompletedProcess[str]:
        return ns_exec(self.ns, "curl", "-sS", "-m", str(timeout), *args, check=False)


def put_token(run: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    return run("-X", "PUT", "-H", TTL_HEADER, *extra, f"{BASE}/latest/api/token")


def set_hop_limit(stack: Any, hops: int) -> None:
    """Rewrite the config with [api] token_hop_limit and restart the proxy (which reads it)."""
    stack.cfg["api"]["token_hop_limit"] = hops
    write_config(stack.config, stack.cfg)
    stack.restart("proxy")


def test_token_rules_and_hop_limit_with_a_container_behind_the_vm(stack: Any) -> None:
    t = make_tenant(stack, "tok")
    sid = t["server"]["id"]
    wait_router_ready(stack, t["router"]["id"])
    vm_ns = stack.plug(sid)
    wait_metadata(stack, sid)

    def vm(*args: str) -> subprocess.CompletedProcess[str]:
        return vm_curl(stack, sid, *args)

    # the VM itself gets a token (hop limit 1 reaches the VM: no router in between)
    tok = put_token(vm, "-f")
    assert tok.returncode == 0 and len(tok.stdout) > 40, tok.stderr
    token = tok.stdout
    got = vm("-f", "-H", f"X-aws-ec2-metadata-token: {token}",
             f"{BASE}/latest/meta-data/instance-id")
    assert got.stdout == f"i-{t['server']['ec2_id']:08x}"
    # Firecracker's header names, the TTL echoed
    fc = vm("-i", "-X", "PUT", "-H", "X-metadata-token-ttl-seconds: 30",
            f"{BASE}/latest/api/token")
    assert " 200 " in fc.stdout.splitlines()[0]
    assert "x-metadata-token-ttl-seconds: 30" in fc.stdout.lower()
    # the rules, each through the proxy and the agent
    assert status_of(stack, sid, "-X", "PUT", f"{BASE}/latest/api/token") == "400"
    for bad in ("0", "21601", "abc"):
        assert status_of(stack, sid, "-X", "PUT", "-H",
                         f"X-aws-ec2-metadata-token-ttl-seconds: {bad}",
                         f"{BASE}/latest/api/token") == "400"
    assert status_of(stack, sid, "-X", "PUT", "-H", TTL_HEADER,
                     f"{BASE}/2021-03-23/api/token") == "403"
    fwd = vm("-i", "-X", "PUT", "-H", TTL_HEADER, "-H", "X-Forwarded-For: 192.168.7.7",
             f"{BASE}/latest/api/token")
    assert " 403 " in fwd.stdout.splitlines()[0] and token[:10] not in fwd.stdout
    allow = vm("-i", f"{BASE}/latest/api/token")
    assert " 405 " in allow.stdout.splitlines()[0] and "allow: put" in allow.stdout.lower()
    bad_tok = vm("-H", "X-aws-ec2-metadata-token: forged", f"{BASE}/latest/meta-data/")
    assert "not valid" in bad_tok.stdout
    # Connection: close on the VM's hop
    closing = vm("-i", "-H", "Connection: close", f"{BASE}/latest/meta-data/instance-id")
    assert "connection: close" in closing.stdout.lower()

    with Container(vm_ns) as ctr:
        # the container reaches the metadata service (IMDSv1 GET answers, TTL 64) ...
        v1 = ctr.curl("-f", f"{BASE}/latest/meta-data/instance-id")
        assert v1.returncode == 0 and v1.stdout.startswith("i-"), v1.stderr
        # ... but the token answer (TTL 1) dies at the VM's forwarding hop: no response
        blocked = put_token(lambda *a: ctr.curl(*a, timeout=3))  # no answer: curl's timeout
        assert blocked.returncode == 28, (blocked.returncode, blocked.stdout, blocked.stderr)

        set_hop_limit(stack, 2)
        # the restarted proxy reopens its listeners; the VM's token PUT proves it is back
        stack.wait(lambda: put_token(vm, "-f").returncode == 0, 60, "proxy back")
        ok = put_token(ctr.curl, "-f")
        assert ok.returncode == 0 and len(ok.stdout) > 40, ok.stderr
        used = ctr.curl("-f", "-H", f"X-aws-ec2-metadata-token: {ok.stdout}",
                        f"{BASE}/latest/meta-data/instance-id")
        assert used.stdout == got.stdout


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_identity_verified_and_change_notification(make_stack: Any, tmp_path: Path) -> None:
    # ordinary answers must come within HOP_S at the proxy and the agent: held requests pass
    # both hops over their long-poll pools, with the longer deadline (metadata.longpoll).
    # 4 s, not 2: on a loaded machine an ordinary answer took longer than 2 s
    hop_s = 4
    stack = make_stack(overrides={"metadata_haproxy": {"timeout_server": hop_s},
                                  "metadata_agent": {"upstream_timeout": hop_s}})
    t = make_tenant(stack, "idn")
    sid = t["server"]["id"]
    pid = t["project"]["id"]
    wait_router_ready(stack, t["router"]["id"])
    stack.plug(sid)
    wait_metadata(stack, sid)
    base = f"{BASE}/latest/dynamic/instance-identity"

    # ec2-metadata (the PyPI package, IMDSv2) inside the VM
    probe = stack.vm_exec(sid, PYTHON, "-c", (
        "import json; from ec2_metadata import ec2_metadata as m; "
        "print(json.dumps({'region': m.region, 'account_id': m.account_id, "
        "'instance_id': m.instance_id}))"))
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == {"region": "RegionOne", "account_id": pid,
                                        "instance_id": f"i-{t['server']['ec2_id']:08x}"}

    # the document and its PKCS#7 signatures, verified by openssl with `identity cert`
    doc = vm_curl(stack, sid, "-f", f"{base}/document")
    assert doc.returncode == 0 and json.loads(doc.stdout)["accountId"] == pid
    (tmp_path / "document").write_text(doc.stdout)
    cert = stack.cli("identity", "cert").stdout
    assert cert.startswith("-----BEGIN CERTIFICATE-----")
    (tmp_path / "cert.pem").write_text(cert)
    for name in ("pkcs7", "rsa2048"):
        body = vm_curl(stack, sid, "-f", f"{base}/{name}")
        assert body.returncode == 0 and not body.stdout.startswith("-----")
        (tmp_path / name).write_text(f"-----BEGIN PKCS7-----\n{body.stdout}\n-----END PKCS7-----\n")
        ok = subprocess.run(["openssl", "smime", "-verify", "-in", str(tmp_path / name),
                             "-inform", "PEM", "-content", str(tmp_path / "document"),
                             "-certfile", str(tmp_path / "cert.pem"), "-noverify"],
                            capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and "Verification successful" in ok.stderr, ok.stderr
        (tmp_path / "forged").write_text(doc.stdout.replace(pid, "someone-else"))
        forged = subprocess.run(["openssl", "smime", "-verify", "-in", str(tmp_path / name),
                                 "-inform", "PEM", "-content", str(tmp_path / "forged"),
                                 "-certfile", str(tmp_path / "cert.pem"), "-noverify"],
                                capture_output=True, text=True, timeout=30)
        assert forged.returncode != 0

    # the JWT, checked with the JWKS `openimds identity jwks` prints
    jwt = vm_curl(stack, sid, "-f", f"{BASE}/openstack/latest/identity?audience=vault")
    assert jwt.returncode == 0, jwt.stderr
    jwks = json.loads(stack.cli("identity", "jwks").stdout)
    head_b64, claims_b64, sig_b64 = jwt.stdout.split(".")
    head = json.loads(_unb64(head_b64))
    (key,) = [k for k in jwks["keys"] if k["kid"] == head["kid"]]
    public = rsa.RSAPublicNumbers(int.from_bytes(_unb64(key["e"]), "big"),
                                  int.from_bytes(_unb64(key["n"]), "big")).public_key()
    public.verify(_unb64(sig_b64), f"{head_b64}.{claims_b64}".encode(), padding.PKCS1v15(),
                  hashes.SHA256())
    claims = json.loads(_unb64(claims_b64))
    assert claims["aud"] == "vault" and claims["instance_id"] == sid
    assert claims["project_id"] == pid and claims["exp"] - time.time() <= 3600

    # wait_for_change: held past the hops' deadline, answered at `server set --property`
    # (within 10 s: a loaded machine delays the feed, but never to the 25 s timeout) ...
    url = f"{BASE}/openstack/latest/meta_data.json"
    head_resp = vm_curl(stack, sid, "-fi", url)
    etag = next(line.split(":", 1)[1].strip() for line in head_resp.stdout.splitlines()
                if line.lower().startswith("etag:"))
    result: dict[str, Any] = {}

    def hold() -> None:
        # `date` runs inside the VM the moment curl has the answer (same clock as ours): the
        # CLI's own start-up and exit times stay out of the measurement
        result["proc"] = stack.vm_exec(sid, "sh", "-c", (
            f"curl -sS -f -m 30 '{url}?wait_for_change=true&last_etag={etag}&timeout_sec=25'"
            "; echo; date +%s.%N"), timeout=60)

    waiter = threading.Thread(target=hold)
    waiter.start()
    time.sleep(hop_s + 1.0)
    assert waiter.is_alive()  # held (a hop's deadline would have answered 504)
    changing = time.time()
    stack.cli("server", "set", sid, "--property", "role=db")
    changed = time.time()  # the registry has committed the change by now
    waiter.join(60)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stderr
    body, answered = proc.stdout.rstrip("\n").rsplit("\n", 1)
    assert json.loads(body)["meta"]["role"] == "db"
    assert changing < float(answered) < changed + 10.0, (float(answered) - changed)
    # ... and at the timeout when nothing changes (the same document, the same ETag): not
    # before it, and not at a hop's deadline either (the upper bound is for a loaded machine,
    # curl gives up at 60 s)
    again = vm_curl(stack, sid, "-fi", url)
    etag2 = next(line.split(":", 1)[1].strip() for line in again.stdout.splitlines()
                 if line.lower().startswith("etag:"))
    wait_s = hop_s + 2
    idle = vm_curl(stack, sid, "-fi", "-w", "\n%{time_total}",
                   f"{url}?wait_for_change=true&last_etag={etag2}&timeout_sec={wait_s}",
                   timeout=60)
    took = float(idle.stdout.rsplit("\n", 1)[1])
    assert idle.returncode == 0 and wait_s - 0.1 < took < wait_s + 20, (took, idle.stderr)
    assert f"etag: {etag2}".lower() in idle.stdout.lower()
