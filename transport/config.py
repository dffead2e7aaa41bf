"""The cluster description: which nodes, how to reach them, which driver they run.

Loaded from TOML by :func:`load_cluster_config`::

    [cluster]
    name = "lab"
    transport = "ssh"            # default for nodes: "local" | "ssh"
    user = "root"                # defaults for every node (a node may override)
    identity_file = "id_ed25519" # relative paths are relative to this file
    known_hosts = "known_hosts"
    connect_timeout = 10.0       # TCP connect + SSH handshake + authentication, seconds
    agent_start_timeout = 10.0   # opening the agent's session + its hello, seconds
    keepalive_interval = 1.0     # SSH keepalive period, seconds
    keepalive_count_max = 2      # unanswered keepalives before the node is unreachable
    reconnect_backoff_min = 0.2  # first wait after a failed connect, seconds
    reconnect_backoff_max = 5.0  # the wait doubles up to this
    call_timeout = 300.0         # default deadline of one call, seconds

    [nodes.n1]
    address = "10.0.0.1"
    port = 22
    hypervisor = "fake"          # "fake" | "kvm"
    agent_command = ["python3", "-m", "transport.agent"]   # argv; --node … is appended
    [nodes.n1.hv_options]
    state_dir = "/var/lib/herd/n1"

``[instances]`` and ``[engine]`` belong to the engine and are ignored here;
any other unknown table or key is an error naming the file, key and reason.

The ``[cluster]`` knobs are declared once, in :class:`ConnectSettings`; what
the SSH client uses to reach one node is one :class:`SshSettings`
(``cluster.ssh_settings(name)``).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from .errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DEFAULT_AGENT_COMMAND = ("python3", "-m", "transport.agent")
_ENGINE_TABLES = frozenset({"instances", "engine"})
#: Drivers that take a ``listen_host`` option (for incoming migrations).
LISTEN_HOST_DRIVERS = frozenset({"fake", "kvm"})


class NodeConfig(msgspec.Struct, kw_only=True, frozen=True):
    """How to reach one node and what it runs."""

    name: str
    address: str = "127.0.0.1"
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    hypervisor: str = "fake"
    hv_options: dict[str, Any] = msgspec.field(default_factory=dict)
    agent_command: list[str] | None = None
    transport: Literal["local", "ssh"] = "ssh"

    def driver_options(self) -> dict[str, Any]:
        """The driver's options as the node's agent gets them.

        The built-in drivers listen for incoming migrations on ``listen_host``
        (default 127.0.0.1), while the engine tells the source to connect to the
        target's ``address``: so an SSH node whose ``hv_options`` set no
        ``listen_host`` listens on its ``address``, which the other nodes reach.
        The local transport keeps the driver's loopback default.
        """
        options = dict(self.hv_options)
        if self.transport == "ssh" and self.hypervisor in LISTEN_HOST_DRIVERS and "listen_host" not in options:
            options["listen_host"] = self.address
        return options

    def agent_argv(self) -> list[str]:
        """The agent's full argv: the command, then this node's options (JSON values)."""
        argv = list(self.agent_command or DEFAULT_AGENT_COMMAND)
        argv += ["--node", self.name, "--hypervisor", self.hypervisor]
        for key, value in self.driver_options().items():
            argv += ["--hv-option", f"{key}={msgspec.json.encode(value).decode()}"]
        return argv


class ConnectSettings(msgspec.Struct, kw_only=True, frozen=True):
    """The cluster-wide connection knobs (``[cluster]`` keys) and their defaults, declared once.

    :class:`ClusterConfig`, the TOML loader and :class:`~transport.testing.LocalCluster`
    all take them from here.
    """

    connect_timeout: float = 10.0
    agent_start_timeout: float = 10.0
    keepalive_interval: float = 1.0
    keepalive_count_max: int = 2
    reconnect_backoff_min: float = 0.2
    reconnect_backoff_max: float = 5.0
    call_timeout: float | None = 300.0

    def connect_settings(self) -> dict[str, Any]:
        """Just the knobs, by name (for building another struct that has them)."""
        return {key: getattr(self, key) for key in CONNECT_SETTINGS}


#: The names of the knobs, in the order they are written.
CONNECT_SETTINGS: tuple[str, ...] = ConnectSettings.__struct_fields__


class SshSettings(msgspec.Struct, kw_only=True, frozen=True):
    """Everything herd's SSH client uses to reach one node, in one place.

    Built by :meth:`ClusterConfig.ssh_settings` from the node and the
    cluster's knobs; used by :class:`~transport.ssh.SshTransport`, the test
    cluster and the benchmarks alike. Fixed by design (not settings): key
    authentication only, no ssh-agent, no agent forwarding, no password, no
    GSS, no ``~/.ssh/config``.
    """

    node: str
    host: str
    port: int
    username: str | None  # None: the local user (the file loader requires it; a struct built in code may not)
    identity_file: str | None  # None: no key offered (authentication will fail)
    known_hosts: str
    connect_timeout: float
    agent_start_timeout: float
    keepalive_interval: float
    keepalive_count_max: int

    def asyncssh_options(self, known_hosts: Any) -> dict[str, Any]:
        """``asyncssh.connect`` keywords (host aside); ``known_hosts`` is the loaded file's object."""
        return {
            "port": self.port,
            "username": self.username,
            "client_keys": [self.identity_file] if self.identity_file else [],
            "known_hosts": known_hosts,
            "keepalive_interval": self.keepalive_interval,
            "keepalive_count_max": self.keepalive_count_max,
            # The caller's own stage deadline bounds the connect; asyncssh's
            # would end it without saying which stage it was stuck in.
            "connect_timeout": None,
            "login_timeout": self.connect_timeout,
            "preferred_auth": "publickey",
            "agent_path": None,
            "agent_forwarding": False,
            "password": None,
            "gss_host": None,
            "config": [],
        }


class ClusterConfig(ConnectSettings, kw_only=True, frozen=True):
    """A whole cluster: nodes plus the SSH and call-timeout knobs."""

    name: str
    nodes: dict[str, NodeConfig]
    source: str | None = None  # the file it came from

    def ssh_settings(self, node: str) -> SshSettings:
        """How to reach ``node`` over SSH (ConfigError if unknown or without known_hosts)."""
        cfg = self.nodes.get(node)
        if cfg is None:
            raise ConfigError(f"{self.source or '<cluster>'}: [nodes.{node}]: no such node", node=node)
        if cfg.known_hosts is None:
            raise ConfigError(
                f"{self.source or '<cluster>'}: [nodes.{node}] known_hosts: required for the ssh transport (missing): "
                "set it there or in [cluster]",
                node=node,
            )
        return SshSettings(
            node=node,
            host=cfg.address,
            port=cfg.port,
            username=cfg.user,
            identity_file=cfg.identity_file,
            known_hosts=cfg.known_hosts,
            connect_timeout=self.connect_timeout,
            agent_start_timeout=self.agent_start_timeout,
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=self.keepalive_count_max,
        )

    def to_toml(self) -> str:
        """This description as TOML that :func:`load_cluster_config` reads back."""
        lines = ["[cluster]", f"name = {_toml(self.name)}"]
        for key in CONNECT_SETTINGS:
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {_toml(value)}")
        for node in self.nodes.values():
            lines += ["", f"[nodes.{_toml(node.name)}]"]
            for key in ("address", "port", "user", "identity_file", "known_hosts", "hypervisor", "agent_command", "transport"):
                value = getattr(node, key)
                if value is not None:
                    lines.append(f"{key} = {_toml(value)}")
            if node.hv_options:
                lines.append(f"[nodes.{_toml(node.name)}.hv_options]")
                lines += [f"{_toml(k)} = {_toml(v)}" for k, v in node.hv_options.items()]
        return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


class _ClusterTable(ConnectSettings, kw_only=True, frozen=True, forbid_unknown_fields=True):
    name: str
    transport: Literal["local", "ssh"] = "ssh"
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    hypervisor: str = "fake"
    agent_command: list[str] | None = None


class _NodeTable(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    address: str = "127.0.0.1"
    port: int = 22
    user: str | None = None
    identity_file: str | None = None
    known_hosts: str | None = None
    hypervisor: str | None = None
    hv_options: dict[str, Any] = msgspec.field(default_factory=dict)
    agent_command: list[str] | None = None
    transport: Literal["local", "ssh"] | None = None


def load_cluster_config(path: str | os.PathLike[str]) -> ClusterConfig:
    """Read and validate a cluster TOML file (ConfigError names file, key, reason)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err}): check the path and its permissions") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}): fix the syntax there") from None
    cluster = parse_cluster(data, source=str(path), base_dir=path.parent)
    for node in cluster.nodes.values():
        if node.transport == "ssh":
            check_known_hosts(node, source=str(path))
    return cluster


def parse_cluster(data: dict[str, Any], *, source: str = "<cluster>", base_dir: Path | None = None) -> ClusterConfig:
    """Validate an already parsed cluster description."""

    def fail(key: str, reason: str) -> ConfigError:
        return ConfigError(f"{source}: {_where(key)}: {reason}")

    for key in data:
        if key not in ("cluster", "nodes") and key not in _ENGINE_TABLES:
            raise fail(key, "unknown table: remove it (known: cluster, nodes; engine tables: instances, engine)")
    if "cluster" not in data:
        raise fail("cluster", "missing table: add [cluster] with at least name = \"…\"")
    cluster = _convert(data["cluster"], _ClusterTable, "cluster", fail)
    if not _NAME.match(cluster.name):
        raise fail("cluster.name", f"not a valid name ({cluster.name!r}): use letters, digits, . _ - (at most 63)")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, dict) or not raw_nodes:
        raise fail("nodes", "missing or empty: describe at least one node as [nodes.NAME]")
    for key in ("connect_timeout", "agent_start_timeout", "keepalive_interval", "reconnect_backoff_min", "reconnect_backoff_max"):
        if getattr(cluster, key) <= 0:
            raise fail(f"cluster.{key}", f"must be > 0 ({getattr(cluster, key)!r}): set a positive number of seconds")
    if cluster.call_timeout is not None and cluster.call_timeout <= 0:
        raise fail("cluster.call_timeout", f"must be > 0 ({cluster.call_timeout!r}): set a positive number of seconds, or leave it out")
    if cluster.keepalive_count_max < 1:
        raise fail("cluster.keepalive_count_max", f"must be ≥ 1 ({cluster.keepalive_count_max!r}): set a positive count")
    if cluster.reconnect_backoff_max < cluster.reconnect_backoff_min:
        raise fail("cluster.reconnect_backoff_max", f"must be ≥ reconnect_backoff_min ({cluster.reconnect_backoff_max!r} < {cluster.reconnect_backoff_min!r}): raise it")

    def resolve(value: str | None, key: str) -> str | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return str(p)

    nodes: dict[str, NodeConfig] = {}
    for name, raw in raw_nodes.items():
        where = f"nodes.{name}"
        if not _NAME.match(name):
            raise fail(where, f"not a valid node name ({name!r}): use letters, digits, . _ - (at most 63)")
        if not isinstance(raw, dict):
            raise fail(where, f"must be a table ({type(raw).__name__}): write it as [nodes.{name}] with keys below it")
        table = _convert(raw, _NodeTable, where, fail)
        if not 0 < table.port < 65536:
            raise fail(f"{where}.port", f"must be in 1..65535 ({table.port}): set the node's SSH port")
        if not table.address or any(c.isspace() for c in table.address):
            raise fail(f"{where}.address", f"invalid address ({table.address!r}): set a host name or IP address without spaces")
        hypervisor = table.hypervisor or cluster.hypervisor
        if hypervisor not in ("fake", "kvm") and ":" not in hypervisor:
            raise fail(f"{where}.hypervisor", f"must be 'fake' or 'kvm' (or module:Class) ({hypervisor!r}): fix the name")
        command = table.agent_command if table.agent_command is not None else cluster.agent_command
        if command is not None and (not command or not all(command)):
            raise fail(f"{where}.agent_command", f"must be a non-empty list of non-empty strings ({command!r}): give the agent's argv")
        transport = table.transport or cluster.transport
        node = NodeConfig(
            name=name,
            address=table.address,
            port=table.port,
            user=table.user or cluster.user,
            identity_file=resolve(table.identity_file or cluster.identity_file, f"{where}.identity_file"),
            known_hosts=resolve(table.known_hosts or cluster.known_hosts, f"{where}.known_hosts"),
            hypervisor=hypervisor,
            hv_options=dict(table.hv_options),
            agent_command=list(command) if command is not None else None,
            transport=transport,
        )
        if transport == "ssh":
            for key in ("user", "identity_file", "known_hosts"):
                if getattr(node, key) is None:
                    raise fail(f"{where}.{key}", "required for the ssh transport (missing): set it here or in [cluster]")
        nodes[name] = node
    return ClusterConfig(name=cluster.name, nodes=nodes, source=source, **cluster.connect_settings())


def _where(key: str) -> str:
    """``nodes.n1.port`` → ``[nodes.n1] port``; ``cluster.name`` → ``[cluster] name``; ``nodes`` → ``[nodes]``."""
    if key in ("cluster", "nodes") or "." not in key:
        return f"[{key}]"
    if key.startswith("nodes."):
        parts = key.split(".", 2)
        return f"[nodes.{parts[1]}]" + (f" {parts[2]}" if len(parts) > 2 else "")
    table, _, rest = key.partition(".")
    return f"[{table}] {rest}"


def check_known_hosts(node: NodeConfig, *, source: str | None) -> None:
    """Refuse a known_hosts file that is missing or unreadable, naming it (ConfigError).

    Checked when a cluster file is loaded and again at each SSH connect: else
    asyncssh reports a missing file as a failed connect and an unreadable one
    as an unknown host key.
    """
    path = node.known_hosts
    if path is None:
        return
    where = f"{source or '<cluster>'}: [nodes.{node.name}] known_hosts"
    scan = f"ssh-keyscan {node.address}" if node.port == 22 else f"ssh-keyscan -p {node.port} {node.address}"
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: file does not exist ({path}): create it ({scan} >> {path}) or fix [nodes.{node.name}] known_hosts"
        ) from None
    except OSError as err:
        raise ConfigError(
            f"{where}: file cannot be read ({path}: {err.strerror or err}): fix its permissions or [nodes.{node.name}] known_hosts"
        ) from None


def _convert(raw: Any, type_: type, where: str, fail: Any) -> Any:
    try:
        return msgspec.convert(raw, type_, strict=True)
    except msgspec.ValidationError as err:
        text = str(err)
        # "Object contains unknown field `x` - at `$`" / "Expected `int`, got `str` - at `$.port`"
        match = re.search(r" - at `\$(.*)`$", text)
        key = where + (match.group(1) if match else "")
        reason = text[: match.start()] if match else text
        unknown = re.search(r"unknown field `([^`]*)`", reason)
        if unknown:
            key, reason = f"{key}.{unknown.group(1)}", "unknown key: remove it or fix its spelling"
        elif match:
            value = _at_path(raw, match.group(1))
            if value is not _MISSING:
                reason += f" ({value!r:.60}): fix its type"
        raise fail(key, reason) from None


_MISSING = object()


def _at_path(raw: Any, path: str) -> Any:
    """The value at msgspec's error path (``.port``, ``.agent_command[0]``) inside ``raw``."""
    value = raw
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        try:
            value = value[name] if name else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return value
