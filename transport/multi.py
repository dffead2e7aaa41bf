"""MultiTransport: some nodes in-process, others behind SSH, one interface."""

from __future__ import annotations

import random
from collections.abc import Mapping

from ._base import NodeClient, Transport
from .config import ClusterConfig
from .errors import UnknownNode
from .faults import TransportFaults


class MultiTransport(Transport):
    """Routes each node to the transport that serves it."""

    def __init__(self, transports: Mapping[str, Transport]) -> None:
        self._parts = list(transports.values())
        #: One fault table for every node (node names are disjoint between parts).
        self.faults = TransportFaults()
        for part in self._parts:
            if hasattr(part, "faults"):
                part.faults = self.faults  # type: ignore[attr-defined]
        self._route: dict[str, Transport] = {}
        for part in self._parts:
            for name in part.node_names:
                self._route[name] = part

    @classmethod
    def from_config(cls, cluster: ClusterConfig, *, rng: random.Random | None = None) -> MultiTransport:
        from .local import LocalTransport
        from .ssh import SshTransport

        local = {n: c for n, c in cluster.nodes.items() if c.transport == "local"}
        local_cluster = ClusterConfig(
            name=cluster.name, nodes=local, call_timeout=cluster.call_timeout, source=cluster.source
        )
        return cls({"local": LocalTransport.from_config(local_cluster, rng=rng), "ssh": SshTransport(cluster, rng=rng)})

    @property
    def node_names(self) -> list[str]:
        return list(self._route)

    def node(self, name: str) -> NodeClient:
        try:
            return self._route[name].node(name)
        except KeyError:
            raise UnknownNode(f"unknown node {name!r} (known: {', '.join(self._route)})") from None

    async def drop_connection(self, name: str) -> None:
        """Drop the node's connection now (see ConnectionTransport.drop_connection)."""
        self.node(name)
        await self._route[name].drop_connection(name)  # type: ignore[attr-defined]

    async def __aenter__(self) -> MultiTransport:
        entered: list[Transport] = []
        try:
            for part in self._parts:
                await part.__aenter__()
                entered.append(part)
        except BaseException:
            for part in reversed(entered):
                await part.aclose()
            raise
        return self

    async def aclose(self) -> None:
        for part in reversed(self._parts):
            await part.aclose()
