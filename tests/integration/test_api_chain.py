"""The real agent in front of the real API: the agent's own signature is accepted, every
status the API answers (incl. 401/405 for IMDSv2) reaches the caller, and a guest-sent
X-Forwarded-For cannot pick another instance."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.agent_support import make_network, stack, unix_request, via_network
from tests.support import openimds_service, tcp_ready


def test_agent_to_api(tmp_path: Path) -> None:
    with stack(tmp_path, recording_api=False) as st:
        api = openimds_service("api", st.config, "api", log_dir=tmp_path)
        st.services.append(api)
        api.start().wait_until(tcp_ready("127.0.0.1", int(st.cfg["api"]["metadata_listen_port"])))
        st.start_agent()
        net, _ = make_network(st.admin, "chain", "10.40.0.0/24")
        inst = st.admin.create_instance("chain-1", net["id"], metadata={"k": "v"})
        ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
        other = st.admin.create_instance("chain-2", net["id"])
        headers = via_network(net["id"], ip)

        ans = unix_request(st.socket, "/openstack/latest/meta_data.json", headers=headers)
        assert ans.status == 200, ans.body
        md = json.loads(ans.body)
        assert md["uuid"] == inst["id"] and md["meta"] == {"k": "v"}
        ans = unix_request(st.socket, "/latest/meta-data/local-ipv4", headers=headers)
        assert ans.body == ip.encode()
        # the guest cannot choose its identity
        spoof = [*headers, ("X-Instance-ID", other["id"]),
                 ("X-Tenant-ID", other["project_id"])]
        ans = unix_request(st.socket, "/openstack/latest/meta_data.json", headers=spoof)
        assert ans.status == 200 and json.loads(ans.body)["uuid"] == inst["id"]
        # IMDSv2 through the agent
        ans = unix_request(st.socket, "/latest/api/token", method="PUT", headers=[
            *headers, ("X-aws-ec2-metadata-token-ttl-seconds", "300")])
        assert ans.status == 200
        assert ans.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "300"
        token = ans.body.decode()
        ok = unix_request(st.socket, "/latest/meta-data/instance-id",
                          headers=[*headers, ("X-aws-ec2-metadata-token", token)])
        assert ok.status == 200
        bad = unix_request(st.socket, "/latest/meta-data/instance-id",
                           headers=[*headers, ("X-aws-ec2-metadata-token", token + "x")])
        assert bad.status == 401
        ans = unix_request(st.socket, "/latest/api/token", headers=headers)
        assert ans.status == 405 and ans.headers["allow"] == "PUT"
        proxied = unix_request(st.socket, "/latest/api/token", method="PUT", headers=[
            *headers, ("X-aws-ec2-metadata-token-ttl-seconds", "300"), ("Via", "1.1 squid")])
        assert proxied.status == 403
