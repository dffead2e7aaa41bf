"""The names other packages import from transport exist and fit together."""

from __future__ import annotations

import transport


def test_public_names_exist() -> None:
    for name in (
        "Transport", "NodeClient", "LocalTransport", "SshTransport", "ClusterConfig", "NodeConfig",
        "load_cluster", "connect", "PROTOCOL_VERSION", "TransportError", "NodeUnreachable",
        "CallTimeout", "ProtocolError", "HostKeyError", "ConfigError", "UnknownNode",
    ):
        assert getattr(transport, name) is not None, name
    assert issubclass(transport.CallTimeout, TimeoutError)
    for cls in (transport.NodeUnreachable, transport.CallTimeout, transport.ProtocolError, transport.ConfigError):
        assert issubclass(cls, transport.TransportError)
    assert issubclass(transport.LocalTransport, transport.Transport)
    assert issubclass(transport.SshTransport, transport.Transport)
    assert isinstance(transport.PROTOCOL_VERSION, int)
