"""The transport's error tree (root :class:`TransportError`).

Errors the driver raised on the node are *not* wrapped: the transport
re-raises the same :mod:`hv.errors` class with ``node`` set. These classes
are for what goes wrong between the engine and the node.
"""

from __future__ import annotations


class TransportError(Exception):
    """Root of every error about reaching a node."""

    def __init__(self, message: str = "", *, node: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node

    def __str__(self) -> str:
        if self.node:
            return f"[node {self.node}] {self.message}"
        return self.message


class NodeUnreachable(TransportError):
    """The node cannot be reached (connection refused, keepalive lost, …).

    Transient: a later call may succeed once the node is back.
    """


class CallTimeout(TransportError, TimeoutError):
    """A call did not answer within its deadline (it was cancelled on the node)."""


class ProtocolError(TransportError):
    """A frame broke the wire protocol (malformed, wrong version, bad field)."""


class HostKeyError(NodeUnreachable):
    """The node's SSH host key is unknown or changed: refused, never trusted."""


class ConfigError(TransportError):
    """A cluster description is invalid (names the file, key and reason)."""


class UnknownNode(TransportError, KeyError):
    """The transport knows no node by that name."""
