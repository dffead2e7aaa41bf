"""LocalTransport: every node's agent runs in the engine's process.

The embedded default. Each node gets a real :class:`~transport.agent.Agent`
reached through in-memory byte pipes with the very same framing, encoding
and dispatch code as over SSH — cancellation, errors and encodings behave
exactly alike; only the SSH link is missing.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from hv import BaseHypervisor

from ._conn import ConnectionTransport, NodeState
from ._agent import Agent, build_driver
from .client import AgentConnection

if TYPE_CHECKING:
    from .config import ClusterConfig


def _receiver(stream: MemoryObjectReceiveStream[bytes]) -> Callable[[], object]:
    async def receive() -> bytes:
        try:
            return await stream.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            return b""

    return receive


def _build_drivers(cluster: ClusterConfig) -> dict[str, BaseHypervisor]:
    """``hv.get_hypervisor(node.hypervisor, **node.driver_options(), node=name)`` for every node."""
    return {name: build_driver(node.hypervisor, name, node.driver_options()) for name, node in cluster.nodes.items()}


class LocalTransport(ConnectionTransport):
    """Agents in this process, one per node, over in-memory pipes.

    ``LocalTransport({"n1": driver1, "n2": driver2})`` serves the given
    drivers (the caller keeps owning them); ``LocalTransport(cluster)`` or
    :meth:`from_config` builds them from a cluster description, enters them
    and closes them with the transport.
    """

    def __init__(
        self,
        nodes: Mapping[str, BaseHypervisor] | ClusterConfig,
        *,
        call_timeout: float | None = None,
        backoff_min: float = 0.05,
        backoff_max: float = 1.0,
        rng: random.Random | None = None,
        owns_drivers: bool = False,
    ) -> None:
        from .config import ClusterConfig

        if isinstance(nodes, ClusterConfig):
            if call_timeout is None:
                call_timeout = nodes.call_timeout
            nodes, owns_drivers = _build_drivers(nodes), True
        super().__init__(nodes, call_timeout=call_timeout, backoff_min=backoff_min, backoff_max=backoff_max, rng=rng)
        self.drivers: dict[str, BaseHypervisor] = dict(nodes)
        self._owns_drivers = owns_drivers
        self._driver_stack: contextlib.AsyncExitStack | None = None

    @classmethod
    def from_config(cls, cluster: ClusterConfig, *, rng: random.Random | None = None) -> LocalTransport:
        """Drivers built from the cluster's nodes: ``hypervisor`` + ``hv_options``."""
        return cls(_build_drivers(cluster), call_timeout=cluster.call_timeout, rng=rng, owns_drivers=True)

    async def __aenter__(self) -> LocalTransport:
        await super().__aenter__()
        if self._owns_drivers:
            # Drivers with background work (the fake's migration streams) own a
            # task group while entered: it lives as long as the transport.
            stack = contextlib.AsyncExitStack()
            await stack.__aenter__()
            self._driver_stack = stack
            try:
                for driver in self.drivers.values():
                    if hasattr(driver, "__aenter__"):
                        await stack.enter_async_context(driver)  # type: ignore[arg-type]
            except BaseException:
                await self.aclose()
                raise
        return self

    async def _after_hangup(self) -> None:
        if not self._owns_drivers:
            return
        stack, self._driver_stack = self._driver_stack, None
        if stack is not None:
            await stack.__aexit__(None, None, None)  # the drivers' own aclose bounds its time
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            for driver in self.drivers.values():
                if not hasattr(driver, "__aenter__"):
                    await driver.aclose()

    async def _serve_connection(self, state: NodeState, started: Callable[[AgentConnection], None]) -> None:
        to_agent_send, to_agent_recv = anyio.create_memory_object_stream[bytes](math.inf)
        to_client_send, to_client_recv = anyio.create_memory_object_stream[bytes](math.inf)
        agent = Agent(self.drivers[state.name], node=state.name)
        conn = AgentConnection(state.name, to_agent_send.send)

        async def run_agent() -> None:
            try:
                await agent.serve(_receiver(to_agent_recv), to_client_send.send)  # type: ignore[arg-type]
            finally:
                to_client_send.close()

        # The hangup closes the agent's input: exactly what a dead SSH session does.
        state.hangup = to_agent_send.close
        with to_agent_send, to_agent_recv, to_client_send, to_client_recv:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_agent, name=f"local agent {state.name}")
                tg.start_soon(conn.run_reader, _receiver(to_client_recv), name=f"local reader {state.name}")
                await conn.wait_hello(self.connect_timeout)
                started(conn)
                await conn.wait_closed()
                to_agent_send.close()
