"""https to the metadata API with Neutron's options: auth_ca_cert, nova_client_cert +
nova_client_priv_key, nova_metadata_insecure. Certificates made with the openssl CLI."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_support import (
    RecordingApi,
    make_network,
    stack,
    unix_request,
    via_router,
)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=openimds test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "openimds-agent")):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)
        extra = ["-extfile", "san.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", *extra, cwd=d)
    return d


def server_context(pki: Path, *, require_client: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki / "ca.pem")
    return ctx


def run_case(tmp: Path, pki: Path, default: dict[str, Any], *, require_client: bool) -> Any:
    with stack(tmp, recording_api=False,
               DEFAULT={"nova_metadata_protocol": "https", **default}) as st:
        port = int(st.cfg["DEFAULT"]["nova_metadata_port"])
        st.api = RecordingApi("127.0.0.1", port, server_context(pki, require_client=require_client))
        st.api.start()
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.0.0.0/24", r["id"])
        inst = st.admin.create_instance("vm", net["id"], fixed_ip="10.0.0.10")
        st.start_agent()
        ans = unix_request(st.socket, headers=via_router(r["id"], "10.0.0.10"))
        record = st.api.last_record() if ans.status == 200 else None
        assert st.agent is not None
        return ans, record, inst, st.agent.log()


def test_ca_and_client_certificate(tmp_path: Path, pki: Path) -> None:
    ans, record, inst, _ = run_case(tmp_path, pki, {
        "auth_ca_cert": str(pki / "ca.pem"), "nova_client_cert": str(pki / "client.pem"),
        "nova_client_priv_key": str(pki / "client.key")}, require_client=True)
    assert ans.status == 200, ans.body
    assert dict(record["headers"])["X-Instance-ID"] == inst["id"]
    subject = dict(x[0] for x in record["peer_cert"]["subject"])
    assert subject["commonName"] == "openimds-agent"


def test_unknown_ca_is_refused_with_503(tmp_path: Path, pki: Path) -> None:
    ans, _, _, log = run_case(tmp_path, pki, {}, require_client=False)
    assert ans.status == 503 and ans.body.count(b"\n") == 1
    assert "CERTIFICATE_VERIFY_FAILED" in log


def test_insecure_skips_verification(tmp_path: Path, pki: Path) -> None:
    ans, record, inst, _ = run_case(tmp_path, pki, {"nova_metadata_insecure": True},
                                    require_client=False)
    assert ans.status == 200, ans.body
    assert dict(record["headers"])["X-Instance-ID"] == inst["id"]
