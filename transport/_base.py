"""The transport interface: how the engine reaches a node's hypervisor.

``transport.node(name)`` gives a :class:`NodeClient`, whose async methods
mirror :class:`hv.BaseHypervisor`'s node-side methods (``hv.REMOTE_METHODS``)
plus ``ping``. The engine never knows whether a node is in-process or behind
SSH. Deadlines and progress callbacks go through :meth:`NodeClient.call`,
since the driver methods' own keyword names (``timeout`` …) are taken.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from hv import REMOTE_METHODS

ProgressCallback = Callable[[dict[str, Any]], None]


class NodeClient(abc.ABC):
    """A proxy to one node's hypervisor driver."""

    name: str

    @abc.abstractmethod
    async def call(
        self,
        method: str,
        /,
        *args: Any,
        call_timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``method`` on the node's driver and return its decoded result.

        Raises the driver's own :mod:`hv.errors` class (``node`` set), or
        :class:`~transport.errors.NodeUnreachable`, ``CallTimeout`` when
        ``call_timeout`` runs out, ``ProtocolError``. Cancelling the caller
        sends a cancel frame, so the driver coroutine is cancelled on the node.
        """

    async def ping(self, *, call_timeout: float | None = None) -> dict[str, Any]:
        """Round-trip to the node agent; returns what the agent says of itself."""
        return await self.call("ping", call_timeout=call_timeout)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method in REMOTE_METHODS:

            async def bound(*args: Any, **kwargs: Any) -> Any:
                return await self.call(method, *args, **kwargs)

            bound.__name__ = method
            return bound
        raise AttributeError(f"{type(self).__name__} has no attribute {method!r}")


class Transport(abc.ABC):
    """Reaches the nodes of one cluster."""

    @property
    @abc.abstractmethod
    def node_names(self) -> list[str]:
        """The names of every node this transport can reach."""

    @abc.abstractmethod
    def node(self, name: str) -> NodeClient:
        """The client for node ``name`` (KeyError-like TransportError if unknown)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection and stop every in-process agent."""

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
