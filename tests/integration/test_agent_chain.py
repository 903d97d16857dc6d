"""The full chain behind the proxy: agent -> real `openimds api` -> real registry, all as
processes started through the CLI. What a VM gets: its own documents, changes within 1 s, IP
reuse never serving the old instance, every API status passed through."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from openimds.core.signing import sign_instance_id
from tests.integration.agent_support import (
    Stack,
    make_network,
    stack,
    unix_request,
    via_router,
)
from tests.support import PYTHON, Service, http_ready, openimds_service, unix_ready

META = "/openstack/latest/meta_data.json"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("agent-chain")
    # a short reuse hold: test_ip_reuse_never_serves_the_old_instance re-creates on one IP
    with stack(tmp, recording_api=False, registry={"reuse_hold": 3.0}) as st:
        api = openimds_service("api", st.config, "api", log_dir=tmp)
        port = st.cfg["DEFAULT"]["nova_metadata_port"]
        api.start().wait_until(http_ready(f"http://127.0.0.1:{port}/"))
        st.services.append(api)
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.40.0.0/24", r["id"])
        inst = st.admin.create_instance("vm1", net["id"], fixed_ip="10.40.0.10",
                                        metadata={"role": "v1"})
        st.start_agent()
        st.wait_feed(True)
        yield {"st": st, "api": api, "r": r, "net": net, "inst": inst, "port": port}


def get(c: Any, path: str = META, ip: str = "10.40.0.10", **kw: Any) -> Any:
    st: Stack = c["st"]
    extra = kw.pop("extra", ())
    return unix_request(st.socket, path, headers=via_router(c["r"]["id"], ip, *extra), **kw)


def test_vm_gets_its_own_documents(chain: Any) -> None:
    ans = get(chain)
    assert ans.status == 200, ans.body
    meta = ans.json()
    assert meta["uuid"] == chain["inst"]["id"]
    assert meta["meta"] == {"role": "v1"}
    ans = get(chain, "/latest/meta-data/local-ipv4")
    assert (ans.status, ans.body) == (200, b"10.40.0.10")


def test_property_change_visible_within_one_second(chain: Any) -> None:
    st: Stack = chain["st"]
    assert get(chain).json()["meta"]["role"] in ("v1", "v2")  # warm every cache on the path
    st.admin.update("instance", chain["inst"]["id"], {"metadata": {"role": "v2"}})
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        if get(chain).json()["meta"].get("role") == "v2":
            break
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    assert get(chain).json()["meta"]["role"] == "v2"
    assert elapsed < 1.0, elapsed


def test_ip_reuse_never_serves_the_old_instance(chain: Any) -> None:
    st: Stack = chain["st"]
    ip = "10.40.0.20"
    old = st.admin.create_instance("reuse0", chain["net"]["id"], fixed_ip=ip)
    assert get(chain, ip=ip).json()["uuid"] == old["id"]
    assert get(chain, ip=ip).json()["uuid"] == old["id"]  # cached now
    for i in range(1, 4):  # each create waits the reuse hold (3 s here)
        st.admin.delete("instance", old["id"])
        new = st.admin.create_instance(f"reuse{i}", chain["net"]["id"], fixed_ip=ip)
        ans = get(chain, ip=ip)
        assert ans.status == 200, ans.body
        assert ans.json()["uuid"] == new["id"]
        old = new


def test_api_statuses_pass_through(chain: Any) -> None:
    # 405: a method the API refuses (stock Neutron turns this into a dropped socket / 502)
    ans = get(chain, method="DELETE")
    assert ans.status == 405 and ans.body
    # 404: a path that does not exist
    assert get(chain, "/openstack/latest/nope.json").status == 404
    # 409: the password can be set once
    st: Stack = chain["st"]
    inst = st.admin.create_instance("pw", chain["net"]["id"], fixed_ip="10.40.0.30")
    st.wait_feed_caught_up()
    pw = "/openstack/2013-04-04/password"
    assert get(chain, pw, ip="10.40.0.30", method="POST", body=b"x" * 500).status == 200
    second = get(chain, pw, ip="10.40.0.30", method="POST", body=b"y")
    assert second.status == 409 and second.body
    assert get(chain, pw, ip="10.40.0.30").body == b"x" * 500
    assert inst["id"]


def test_imds_v2_token_flow_and_401(chain: Any) -> None:
    ttl = ("X-aws-ec2-metadata-token-ttl-seconds", "60")
    tok = get(chain, "/latest/api/token", method="PUT", extra=[ttl], body=b"")
    assert tok.status == 200, tok.body
    token = tok.body.decode()
    ok = get(chain, "/latest/meta-data/instance-id",
             extra=[("X-aws-ec2-metadata-token", token)])
    assert ok.status == 200
    bad = get(chain, "/latest/meta-data/instance-id",
              extra=[("X-aws-ec2-metadata-token", "nonsense")])
    assert bad.status == 401 and bad.body


def test_secret_mismatch_is_the_apis_403(chain: Any) -> None:
    st: Stack = chain["st"]
    sock = str(st.tmp / "wrong-secret.sock")
    wrong = Service("agent-wrong-secret",
                    [PYTHON, "-m", "openimds", "--config", str(st.config), "agent"], st.tmp,
                    env={"OPENIMDS_METADATA_PROXY_SHARED_SECRET": "not-the-secret",
                         "OPENIMDS_METADATA_PROXY_SOCKET": sock})
    wrong.start().wait_until(unix_ready(sock))
    try:
        ans = unix_request(sock, META, headers=via_router(chain["r"]["id"], "10.40.0.10"))
        assert ans.status == 403 and ans.body
        assert "shared secrets may not match" in wrong.log()
        assert "not-the-secret" not in wrong.log()
    finally:
        wrong.stop()


def test_api_killed_is_503_then_recovers(chain: Any) -> None:
    st: Stack = chain["st"]
    assert get(chain).status == 200
    chain["api"].kill()
    ans = get(chain)
    assert ans.status == 503 and "retry-after" in ans.headers
    api = openimds_service("api2", st.config, "api", log_dir=st.tmp)
    api.start().wait_until(http_ready(f"http://127.0.0.1:{chain['port']}/"))
    st.services.append(api)
    assert get(chain).status == 200
    assert json.loads(get(chain).body)["uuid"] == chain["inst"]["id"]


def test_debug_mode_logs_requests_but_no_secrets(chain: Any) -> None:
    st: Stack = chain["st"]
    sock = str(st.tmp / "debug.sock")
    dbg = Service("agent-debug",
                  [PYTHON, "-m", "openimds", "--config", str(st.config), "agent"], st.tmp,
                  env={"OPENIMDS_DEBUG": "true", "OPENIMDS_METADATA_PROXY_SOCKET": sock})
    dbg.start().wait_until(unix_ready(sock))
    try:
        spoof = ("X-Instance-ID-Signature", "f" * 64)
        ans = unix_request(sock, META, headers=via_router(chain["r"]["id"], "10.40.0.10", spoof))
        assert ans.status == 200
        pw = unix_request(sock, "/openstack/2013-04-04/password", method="POST",
                          headers=via_router(chain["r"]["id"], "10.40.0.10"),
                          body=b"guest-password-123")
        assert pw.status in (200, 409)
        time.sleep(0.2)
        log = dbg.log()
        assert "Request: GET /openstack/latest/meta_data.json" in log
        real_sig = sign_instance_id(st.secret.encode(), chain["inst"]["id"])
        for secret in (st.secret, real_sig, "f" * 64, "guest-password-123",
                       st.cfg["registry"]["reader_token"], st.cfg["registry"]["admin_token"]):
            assert secret not in log
    finally:
        dbg.stop()
