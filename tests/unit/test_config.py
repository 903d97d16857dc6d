from pathlib import Path

import pytest

from openimds.config import (
    env_name,
    load_settings,
    render_settings,
    settings_as_dict,
    worker_ports,
    worker_socket,
    worker_sockets,
)
from openimds.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "openimds.ini"
    path.write_text(text)
    return str(path)


def test_defaults_follow_neutron(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""), environ={})
    assert s.metadata_port == 9697
    assert s.metadata_backlog == 4096
    assert s.nova_metadata_port == 8775
    assert s.metadata_proxy_socket_mode == "deduce"
    assert s.metadata_proxy_socket == "/var/lib/openimds/metadata_proxy"
    assert s.registry.bind_port == 9696
    assert s.registry_connection == "sqlite:////var/lib/openimds/registry.sqlite"
    assert s.access_mark == 1


def test_file_then_env_and_state_path_interpolation(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[DEFAULT]\nstate_path = /srv/imds\nmetadata_backlog = 128\n"
                          "[registry]\nbind_port = 19696\n[api]\nvendordata_providers = "
                          "StaticJSON, DynamicJSON\n")
    s = load_settings(cfg, environ={"OPENIMDS_METADATA_BACKLOG": "256",
                                    "OPENIMDS_REGISTRY_ADMIN_TOKEN": "tok"})
    assert s.metadata_backlog == 256
    assert s.registry.bind_port == 19696
    assert s.registry.admin_token == "tok"
    assert s.metadata_proxy_socket == "/srv/imds/metadata_proxy"
    assert s.proxy.listeners_dir == "/srv/imds/proxy/listeners"
    assert s.api.vendordata_providers == ("StaticJSON", "DynamicJSON")


def test_secrets_file_under_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secrets.ini").write_text("[DEFAULT]\nmetadata_proxy_shared_secret = s3\n"
                                          "[registry]\nadmin_token = a\n")
    cfg = write(tmp_path, f"[DEFAULT]\nstate_path = {tmp_path}\n[registry]\nadmin_token = b\n")
    s = load_settings(cfg, environ={})
    assert s.metadata_proxy_shared_secret == "s3"
    assert s.registry.admin_token == "b"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[DEFAULT]\nmetadata_backlog = lots\n", {},
         "[DEFAULT] metadata_backlog: value 'lots' is not an integer"),
        ("[DEFAULT]\nmetadata_backlog = 0\n", {}, "below the minimum"),
        ("[DEFAULT]\nnova_metadata_protocol = ftp\n", {}, "is not one of http, https"),
        ("[DEFAULT]\nfrobnicate = 1\n", {}, "[DEFAULT] frobnicate: unknown option"),
        ("[nova]\nx = 1\n", {}, "unknown section [nova]"),
        ("[DEFAULT]\nforce_metadata = maybe\n", {}, "is not a boolean"),
        ("", {"OPENIMDS_NOPE": "1"}, "environment OPENIMDS_NOPE: unknown option"),
        ("", {"OPENIMDS_REGISTRY_BIND_PORT": "99999"}, "environment OPENIMDS_REGISTRY_BIND_PORT"),
        ("[DEFAULT\n", {}, "cannot parse"),
        ("[api]\nclient_write_timeout = 0.5\n", {},
         "[api] client_write_timeout: value '0.5' is below the minimum 1.0"),
        ("[metadata_agent]\nclient_write_timeout = 86400\n", {},
         "[metadata_agent] client_write_timeout: value '86400' is above the maximum 3600.0"),
        ("[api]\nclient_keepalive_timeout = 0\n", {},
         "[api] client_keepalive_timeout: value '0' is below the minimum 0.1"),
        ("", {"OPENIMDS_METADATA_AGENT_CLIENT_KEEPALIVE_TIMEOUT": "7200"},
         "environment OPENIMDS_METADATA_AGENT_CLIENT_KEEPALIVE_TIMEOUT: value '7200' is above "
         "the maximum 3600.0"),
        ("", {"OPENIMDS_METADATA_AGENT_CLIENT_WRITE_TIMEOUT": "soon"},
         "environment OPENIMDS_METADATA_AGENT_CLIENT_WRITE_TIMEOUT: value 'soon' is not a "
         "number"),
    ],
)
def test_bad_settings_name_file_section_key_and_reason(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    cfg = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_settings(cfg, environ=env)
    assert message in exc.value.reason
    if not env:
        assert cfg in exc.value.reason


def test_missing_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(str(tmp_path / "nope.ini"), environ={})


def test_secret_values_are_masked_everywhere(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[DEFAULT]\nmetadata_proxy_shared_secret = hunter2\n"
                          "[registry]\nadmin_token = tok\n")
    s = load_settings(cfg, environ={})
    assert "hunter2" not in render_settings(s)
    assert "hunter2" not in repr(s)
    assert "metadata_proxy_shared_secret = ***" in render_settings(s)
    assert settings_as_dict(s)["registry"]["admin_token"] == "***"
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, "[registry]\nadmin_token = tok\nbind_port = x\n"),
                      environ={})
    assert "tok" not in exc.value.reason


def test_env_names_do_not_collide() -> None:
    from openimds.config import _env_index

    index = _env_index()
    assert env_name("DEFAULT", "metadata_port") == "OPENIMDS_METADATA_PORT"
    assert len(index) == len(set(index.values()))


def test_api_unix_socket_options(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""), environ={})
    assert (s.api.unix_socket, s.api.unix_socket_mode, s.nova_metadata_socket) == ("", "user", "")
    cfg = write(tmp_path, "[DEFAULT]\nstate_path = /srv/imds\n"
                          "nova_metadata_socket = $state_path/api.sock\n"
                          "[api]\nunix_socket = $state_path/api.sock\nunix_socket_mode = group\n")
    s = load_settings(cfg, environ={})
    assert s.api.unix_socket == s.nova_metadata_socket == "/srv/imds/api.sock"
    assert s.api.unix_socket_mode == "group"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[api]\nunix_socket = run/api.sock\n", {},
         "[api] unix_socket: value 'run/api.sock' is not an absolute path"),
        ("", {"OPENIMDS_NOVA_METADATA_SOCKET": "api.sock"},
         "environment OPENIMDS_NOVA_METADATA_SOCKET: value 'api.sock' is not an absolute path"),
        (f"[api]\nunix_socket = /{'x' * 110}\n", {}, "is 111 bytes long; a Unix socket path "
         "holds at most 107"),
        # $state_path counts at its value: 100 bytes of it plus /api.sock is too long
        (f"[DEFAULT]\nstate_path = /{'s' * 99}\nnova_metadata_socket = $state_path/api.sock\n",
         {}, "[DEFAULT] nova_metadata_socket: value '$state_path/api.sock' is 109 bytes long"),
        ("[api]\nunix_socket = /run/openimds/\n", {}, "names a directory, not a socket file"),
        ("[api]\nunix_socket_mode = 0777\n", {}, "is not one of user, group, all"),
        # the agent would send every request back to itself
        ("[DEFAULT]\nmetadata_proxy_socket = /run/o/agent.sock\n"
         "nova_metadata_socket = /run/o//agent.sock\n", {},
         "[DEFAULT] nova_metadata_socket: value '/run/o//agent.sock' is the agent's own socket"),
        ("[DEFAULT]\nstate_path = /srv/o\n[api]\nunix_socket = /srv/o/metadata_proxy\n", {},
         "[api] unix_socket: value '/srv/o/metadata_proxy' is the agent's own socket"),
    ],
)
def test_bad_unix_socket_paths_name_the_value(
    tmp_path: Path, text: str, env: dict[str, str], message: str,
) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text), environ=env)
    assert message in str(err.value)


def test_write_timeouts_of_the_agent_and_the_api(tmp_path: Path) -> None:
    """Both default to the 30 s the HTTP layer had fixed; each is its own option."""
    s = load_settings(write(tmp_path, ""), environ={})
    assert s.api.client_write_timeout == 30.0
    assert s.metadata_agent.client_write_timeout == 30.0
    s = load_settings(write(tmp_path, "[api]\nclient_write_timeout = 2.5\n"),
                      environ={"OPENIMDS_METADATA_AGENT_CLIENT_WRITE_TIMEOUT": "7"})
    assert (s.api.client_write_timeout, s.metadata_agent.client_write_timeout) == (2.5, 7.0)


def test_keepalive_timeouts_of_the_agent_and_the_api(tmp_path: Path) -> None:
    """Both default to the 30 s the HTTP layer had fixed (and the proxy's option has); each
    is its own option, and the proxy's stays [metadata_haproxy] timeout_http_keep_alive."""
    s = load_settings(write(tmp_path, ""), environ={})
    assert s.api.client_keepalive_timeout == 30.0
    assert s.metadata_agent.client_keepalive_timeout == 30.0
    assert s.metadata_haproxy.timeout_http_keep_alive == 30.0
    s = load_settings(write(tmp_path, "[api]\nclient_keepalive_timeout = 0.5\n"),
                      environ={"OPENIMDS_METADATA_AGENT_CLIENT_KEEPALIVE_TIMEOUT": "7"})
    assert (s.api.client_keepalive_timeout, s.metadata_agent.client_keepalive_timeout) == (
        0.5, 7.0)
    assert s.metadata_haproxy.timeout_http_keep_alive == 30.0


def test_worker_sockets_are_named_beside_the_shared_one(tmp_path: Path) -> None:
    """`<metadata_proxy_socket>.w<N>`, found in index order; other names are not taken."""
    base = str(tmp_path / "metadata_proxy")
    for name in ("metadata_proxy", "metadata_proxy.w10", "metadata_proxy.w2",
                 "metadata_proxy.wx", "metadata_proxy.w", "other.w1"):
        (tmp_path / name).write_text("")
    assert worker_socket(base, 3) == base + ".w3"
    assert worker_sockets(base) == [base + ".w2", base + ".w10"]
    assert worker_sockets(str(tmp_path / "gone" / "metadata_proxy")) == []


def test_the_last_worker_socket_path_must_fit(tmp_path: Path) -> None:
    """A shared path that fits but whose `.w<N>` does not is refused at load, by name."""
    path = "/" + "a" * 104  # 105 bytes: .w1 makes it 108, over 107
    text = f"[DEFAULT]\nmetadata_proxy_socket = {path}\nmetadata_workers = 2\n"
    with pytest.raises(ConfigError, match="worker sockets"):
        load_settings(write(tmp_path, text), environ={})
    one = load_settings(write(tmp_path, text.replace("= 2", "= 1")), environ={})
    assert one.metadata_proxy_socket == path


def test_the_api_workers_own_addresses_are_checked_at_load(tmp_path: Path) -> None:
    """`[api] unix_socket.w<N>` must fit; `[api] worker_port_base` + workers stays a port
    range without metadata_listen_port; nova_metadata_worker_ports is FIRST-LAST without
    nova_metadata_port."""
    path = "/" + "a" * 104
    with pytest.raises(ConfigError, match=r"\[api\] unix_socket \(its worker sockets\)"):
        load_settings(write(tmp_path, f"[api]\nunix_socket = {path}\nworkers = 2\n"),
                      environ={})
    assert load_settings(write(tmp_path, f"[api]\nunix_socket = {path}\n"),
                         environ={}).api.unix_socket == path
    ok = load_settings(write(tmp_path, "[api]\nworker_port_base = 8781\nworkers = 2\n"),
                       environ={})
    assert (ok.api.worker_port_base, ok.api.workers) == (8781, 2)
    for text in ("[api]\nworker_port_base = 8774\nworkers = 2\n",
                 "[api]\nworker_port_base = 65535\nworkers = 2\n"):
        with pytest.raises(ConfigError, match="worker_port_base"):
            load_settings(write(tmp_path, text), environ={})
    s = load_settings(write(tmp_path, "[DEFAULT]\nnova_metadata_worker_ports = 8781-8783\n"),
                      environ={})
    assert worker_ports(s.nova_metadata_worker_ports) == [8781, 8782, 8783]
    assert worker_ports("9000") == [9000] and worker_ports("") == []
    for bad in ("8781-", "x-8782", "8782-8781", "0-2", "8774-8776"):
        with pytest.raises(ConfigError, match="nova_metadata_worker_ports"):
            load_settings(write(tmp_path, f"[DEFAULT]\nnova_metadata_worker_ports = {bad}\n"),
                          environ={})
