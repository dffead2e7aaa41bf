"""How the engine reaches a node: wire protocol, node agent, local and SSH transports.

``async with connect(load_cluster_config("cluster.toml")) as t:`` then
``await t.node("n1").get_node_info()`` — the same call whether the node's
agent runs in this process (:class:`LocalTransport`) or behind SSH
(:class:`SshTransport`). See docs/transport.md.
"""

from __future__ import annotations

from ._base import NodeClient, ProgressCallback, Transport
from .config import ClusterConfig, ConnectSettings, NodeConfig, SshSettings, load_cluster_config, parse_cluster
from .errors import (
    CallTimeout,
    ConfigError,
    HostKeyError,
    NodeUnreachable,
    ProtocolError,
    TransportError,
    UnknownNode,
)
from .faults import TransportFaults
from .local import LocalTransport
from .protocol import PROTOCOL_VERSION


def __getattr__(name: str) -> object:
    # asyncssh is imported only when the SSH transport is used.
    if name == "SshTransport":
        from .ssh import SshTransport

        return SshTransport
    if name == "MultiTransport":
        from .multi import MultiTransport

        return MultiTransport
    raise AttributeError(f"module 'transport' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names only (``__all__``), the lazily imported transports included."""
    return sorted(__all__)


def connect(cluster: ClusterConfig) -> Transport:
    """The transport for ``cluster``: local, SSH, or both routed per node.

    Not yet open: use it as ``async with connect(cluster) as transport:``.
    """
    local = [n for n in cluster.nodes.values() if n.transport == "local"]
    if len(local) == len(cluster.nodes):
        return LocalTransport.from_config(cluster)
    from .ssh import SshTransport

    if not local:
        return SshTransport(cluster)
    from .multi import MultiTransport

    return MultiTransport.from_config(cluster)


__all__ = [
    "PROTOCOL_VERSION",
    "CallTimeout",
    "ClusterConfig",
    "ConfigError",
    "ConnectSettings",
    "HostKeyError",
    "LocalTransport",
    "MultiTransport",
    "NodeClient",
    "NodeConfig",
    "NodeUnreachable",
    "ProgressCallback",
    "ProtocolError",
    "SshSettings",
    "SshTransport",
    "Transport",
    "TransportError",
    "TransportFaults",
    "UnknownNode",
    "connect",
    "load_cluster_config",
    "parse_cluster",
]
