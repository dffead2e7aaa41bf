"""Transport's public face: exactly the public names, and they fit together."""

from __future__ import annotations

import transport

#: What other packages may import from ``transport`` (everything else is internal).
PUBLIC = {
    "PROTOCOL_VERSION", "CallTimeout", "ClusterConfig", "ConfigError", "ConnectSettings", "HostKeyError",
    "LocalTransport", "MultiTransport", "NodeClient", "NodeConfig", "NodeUnreachable", "ProgressCallback",
    "ProtocolError", "SshSettings", "SshTransport", "Transport", "TransportError", "TransportFaults",
    "UnknownNode", "connect", "load_cluster_config", "parse_cluster",
}


def test_the_public_face_is_exactly_the_public_names() -> None:
    assert set(transport.__all__) == PUBLIC and len(transport.__all__) == len(PUBLIC)
    assert set(dir(transport)) == PUBLIC
    namespace: dict[str, object] = {}
    exec("from transport import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC
    # One name per concept: engine.load_cluster gives engine's Cluster, this a ClusterConfig.
    assert not hasattr(transport, "load_cluster")


def test_public_names_fit_together() -> None:
    assert issubclass(transport.CallTimeout, TimeoutError)
    for cls in (transport.NodeUnreachable, transport.CallTimeout, transport.ProtocolError, transport.ConfigError,
                transport.HostKeyError, transport.UnknownNode):
        assert issubclass(cls, transport.TransportError)
    for cls in (transport.LocalTransport, transport.SshTransport, transport.MultiTransport):
        assert issubclass(cls, transport.Transport)
    assert issubclass(transport.ClusterConfig, transport.ConnectSettings)
    assert isinstance(transport.PROTOCOL_VERSION, int)
