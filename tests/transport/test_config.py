"""Cluster TOML: a good file loads with defaults resolved; bad ones name file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

import transport
from transport import ConfigError, load_cluster_config

GOOD = """
[cluster]
name = "lab"
user = "herd"
identity_file = "keys/id_ed25519"
known_hosts = "known_hosts"
keepalive_interval = 0.5

[nodes.n1]
address = "10.0.0.1"
hypervisor = "kvm"
[nodes.n1.hv_options]
run_dir = "/run/herd"

[nodes.n2]
address = "10.0.0.2"
port = 2222
user = "ops"
agent_command = ["/opt/herd/bin/herd-agent"]

[nodes.local1]
transport = "local"
[nodes.local1.hv_options]
state_dir = "/tmp/x"

[instances.web1]
node = "n1"

[engine]
db = "herd.db"
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "known_hosts").touch()
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return path


def test_good_file_loads_with_inherited_and_resolved_values(tmp_path: Path) -> None:
    cluster = load_cluster_config(write(tmp_path, GOOD))
    assert cluster.name == "lab" and cluster.keepalive_interval == 0.5 and cluster.keepalive_count_max == 2
    n1, n2, local = cluster.nodes["n1"], cluster.nodes["n2"], cluster.nodes["local1"]
    assert (n1.port, n1.user, n1.hypervisor, n1.hv_options) == (22, "herd", "kvm", {"run_dir": "/run/herd"})
    assert n1.identity_file == str(tmp_path / "keys/id_ed25519")  # relative to the file
    assert n1.known_hosts == str(tmp_path / "known_hosts")
    assert (n2.port, n2.user, n2.hypervisor) == (2222, "ops", "fake")
    assert n2.agent_argv()[:3] == ["/opt/herd/bin/herd-agent", "--node", "n2"]
    assert n1.agent_argv() == [
        "python3", "-m", "transport.agent", "--node", "n1", "--hypervisor", "kvm",
        "--hv-option", 'run_dir="/run/herd"', "--hv-option", 'listen_host="10.0.0.1"',
    ]
    assert local.transport == "local"
    # The description round-trips through TOML.
    again = load_cluster_config(write(tmp_path, cluster.to_toml()))
    assert again.nodes == cluster.nodes
    assert again.connect_settings() == cluster.connect_settings()


def test_ssh_settings_of_a_node_come_from_the_node_and_the_cluster_knobs(tmp_path: Path) -> None:
    cluster = load_cluster_config(write(tmp_path, GOOD))
    ssh = cluster.ssh_settings("n2")
    assert isinstance(ssh, transport.SshSettings)
    assert (ssh.node, ssh.host, ssh.port, ssh.username) == ("n2", "10.0.0.2", 2222, "ops")
    assert (ssh.identity_file, ssh.known_hosts) == (str(tmp_path / "keys/id_ed25519"), str(tmp_path / "known_hosts"))
    assert (ssh.keepalive_interval, ssh.keepalive_count_max, ssh.connect_timeout, ssh.agent_start_timeout) == (0.5, 2, 10.0, 10.0)
    marker = object()
    options = ssh.asyncssh_options(marker)
    assert options["known_hosts"] is marker and options["client_keys"] == [ssh.identity_file]
    assert (options["port"], options["username"], options["login_timeout"]) == (2222, "ops", 10.0)
    # Key authentication only: no ssh-agent, no forwarding, no password, no ~/.ssh/config.
    assert options["agent_path"] is None and options["agent_forwarding"] is False and options["password"] is None
    assert options["config"] == [] and options["preferred_auth"] == "publickey"


@pytest.mark.parametrize(
    ("node", "known_hosts", "expected"),
    [
        pytest.param("n9", "kh", r"\[nodes.n9\]: no such node", id="unknown-node"),
        pytest.param("n1", None, r"\[nodes.n1\] known_hosts: required for the ssh transport", id="no-known-hosts"),
    ],
)
def test_ssh_settings_refuse_what_cannot_be_reached(node: str, known_hosts: str | None, expected: str) -> None:
    cluster = transport.ClusterConfig(
        name="c", nodes={"n1": transport.NodeConfig(name="n1", known_hosts=known_hosts)}, source="c.toml"
    )
    with pytest.raises(ConfigError, match=expected) as info:
        cluster.ssh_settings(node)
    assert info.value.node == node and str(info.value.message).startswith("c.toml: ")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[cluster\nname='x'", "", "not valid TOML"),
        ("[nodes.n1]\naddress='a'", "[cluster]", "missing table"),
        ("[cluster]\nname='x'", "[nodes]", "missing or empty"),
        ("[cluster]\nname='x'\ncolour='red'\n[nodes.a]\ntransport='local'", "[cluster] colour", "unknown key"),
        ("[cluster]\nname='x'\n[nodes.a]\ntransport='local'\nport='22'", "[nodes.a] port", "Expected `int`, got `str`"),
        ("[cluster]\nname='x'\n[nodes.a]\ntransport='local'\nport=70000", "[nodes.a] port", "1..65535"),
        ("[cluster]\nname='x'\n[nodes.a]\ntransport='local'\nhypervisor='xen'", "[nodes.a] hypervisor", "'fake' or 'kvm'"),
        ("[cluster]\nname='x'\n[nodes.a]\ntransport='carrier-pigeon'", "[nodes.a] transport", "Invalid enum value"),
        ("[cluster]\nname='x'\n[nodes.a]\naddress='h'", "[nodes.a] user", "required for the ssh transport"),
        ("[cluster]\nname='x'\nkeepalive_interval=0\n[nodes.a]\ntransport='local'", "[cluster] keepalive_interval", "> 0"),
        ("[cluster]\nname='x'\n[nodes.a]\ntransport='local'\nagent_command=[]", "[nodes.a] agent_command", "non-empty"),
        ("[cluster]\nname='x'\n[nodes.'bad name']\ntransport='local'", "[nodes.bad name]", "not a valid node name"),
        ("[cluster]\nname='x'\n[nodes.a]\ntransport='local'\n[extras]\nx=1", "[extras]", "unknown table"),
    ],
)
def test_bad_files_name_file_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_cluster_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert f": {key}: " in message or not key, message
    assert reason in message, message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster_config(tmp_path / "nope.toml")


async def _local_cluster_roundtrip(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"[cluster]\nname='x'\n[nodes.a]\ntransport='local'\nhypervisor='tests.transport.drivers:RecordingHypervisor'\n"
        f"[nodes.a.hv_options]\nstate_dir='{tmp_path / 'a'}'\n",
    )
    async with transport.connect(load_cluster_config(path)) as t:
        assert isinstance(t, transport.LocalTransport)
        assert (await t.node("a").ping())["node"] == "a"
    async with transport.LocalTransport(load_cluster_config(path)) as t:
        assert (await t.node("a").ping())["hypervisor"] == "recording"


@pytest.mark.anyio
async def test_connect_picks_the_local_transport(tmp_path: Path) -> None:
    await _local_cluster_roundtrip(tmp_path)


@pytest.mark.parametrize(
    ("node", "listen_host"),
    [
        # An SSH node listens for incoming migrations where the others reach it: its address.
        (transport.NodeConfig(name="a", address="10.0.0.7", hypervisor="fake"), "10.0.0.7"),
        (transport.NodeConfig(name="a", address="n7.lab", hypervisor="kvm"), "n7.lab"),
        # An explicit listen_host wins.
        (transport.NodeConfig(name="a", address="10.0.0.7", hv_options={"listen_host": "0.0.0.0"}), "0.0.0.0"),
        # The local transport keeps the driver's loopback default; unknown drivers get nothing added.
        (transport.NodeConfig(name="a", address="10.0.0.7", transport="local"), None),
        (transport.NodeConfig(name="a", address="10.0.0.7", hypervisor="tests.transport.drivers:RecordingHypervisor"), None),
    ],
)
def test_driver_listen_host_defaults_to_the_node_address(node: transport.NodeConfig, listen_host: str | None) -> None:
    assert node.driver_options().get("listen_host") == listen_host
    options = [v for k, v in zip(node.agent_argv(), node.agent_argv()[1:]) if k == "--hv-option"]
    assert (f'listen_host="{listen_host}"' in options) is (listen_host is not None and node.transport == "ssh")
