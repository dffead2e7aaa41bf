"""The node part of the engine: one call to a node, and each node's health.

:class:`NodeHealth` implements :class:`engine._seam.NodeLink` (what a
workflow's ``ctx.nodes`` stands on): a call fails fast with
:class:`NodeOffline` when the node is (or goes) offline; the pinger (or,
without one, a probe with backoff after a failure) keeps each node's
status, and every change is an event.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup

import hv
from transport import Transport
from transport.errors import TransportError

from ._cluster import Cluster
from ._recorder import Recorder
from .errors import NodeOffline


class NodeStatus(msgspec.Struct, kw_only=True):
    """What the engine knows of a node's health (``engine.nodes()``)."""

    name: str
    online: bool = True
    checked_at: float | None = None  # wall clock of the last ping
    since: float | None = None  # wall clock of the last change
    error: str | None = None


class _Health:
    def __init__(self, name: str) -> None:
        self.status = NodeStatus(name=name)
        self.offline_event = anyio.Event()  # set when the node goes offline


class NodeHealth:
    """Calls to nodes and their health (the engine's :class:`engine._seam.NodeLink`)."""

    def __init__(
        self, transport: Transport, cluster: Cluster, recorder: Recorder, *, rng: random.Random,
        ping_interval: float | None, ping_timeout: float, closing: Callable[[], bool],
    ) -> None:
        self.transport = transport
        self.cluster = cluster
        self._rec = recorder
        self._rng = rng
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._closing = closing
        self.tg: TaskGroup | None = None
        self._health: dict[str, _Health] = {n: _Health(n) for n in self.names}

    @property
    def names(self) -> list[str]:
        names = list(self.transport.node_names)
        for n in self.cluster.node_names:
            if n not in names:
                names.append(n)
        return names

    def online(self, name: str) -> bool:
        """Whether ``name`` is a known node currently considered online."""
        health = self._health.get(name)
        return health is not None and health.status.online

    def address(self, name: str) -> str:
        """The node's address as other nodes reach it ("" lets the driver choose)."""
        nodes = getattr(self.cluster.config, "nodes", None) or {}
        entry = nodes.get(name) if isinstance(nodes, dict) else None
        return str(getattr(entry, "address", "") or "")

    def statuses(self) -> list[NodeStatus]:
        return [msgspec.structs.replace(self._health[n].status) for n in self.names if n in self._health]

    async def call(
        self, node: str, method: str, args: Sequence[Any], kwargs: Mapping[str, Any], *,
        on_progress: Callable[[dict[str, Any]], None] | None, fail_fast: bool = True,
    ) -> Any:
        """One call; with ``fail_fast``, NodeOffline if the node is (or goes) offline."""
        health = self._health.get(node)
        if health is None:
            raise NodeOffline(f"node {node!r} is not part of the cluster", node=node)
        client = self.transport.node(node)
        if not fail_fast:
            return await client.call(method, *args, on_progress=on_progress, **kwargs)
        if not health.status.online:
            raise NodeOffline(f"node {node} is offline ({health.status.error}); not calling {method}", node=node)
        outcome: dict[str, Any] = {}
        offline_event = health.offline_event
        async with anyio.create_task_group() as tg:

            async def watch_offline() -> None:
                await offline_event.wait()
                outcome["offline"] = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch_offline)
            try:
                outcome["result"] = await client.call(method, *args, on_progress=on_progress, **kwargs)
            except Exception as exc:
                outcome["error"] = exc
            tg.cancel_scope.cancel()
        if "error" in outcome:
            raise outcome["error"]
        if outcome.get("offline") and "result" not in outcome:
            raise NodeOffline(
                f"node {node} went offline during {method}: NodeUnreachable: {health.status.error}", node=node
            )
        return outcome.get("result")

    async def ping(self, name: str) -> str | None:
        """One ping; the error text, or None when the node answered."""
        try:
            await self.transport.node(name).call("ping", call_timeout=self.ping_timeout)
        except (TransportError, TimeoutError, OSError, hv.HypervisorError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def set_online(self, name: str, error: str | None) -> None:
        """Record a node's health; an event when it changes."""
        health = self._health[name]
        now = self._rec.clock()
        status = health.status
        status.checked_at = now
        if error is None and not status.online:
            status.online, status.error, status.since = True, None, now
            health.offline_event = anyio.Event()
            self._rec.log.info("node online", node=name)
            await self._rec.add_event(None, "node-online", {"node": name})
        elif error is not None and status.online:
            status.online, status.error, status.since = False, error, now
            health.offline_event.set()
            self._rec.log.warning("node offline", node=name, error=error)
            await self._rec.add_event(None, "node-offline", {"node": name, "error": error})
            if self.ping_interval is None and self.tg is not None and not self._closing():
                self.tg.start_soon(self._probe_until_online, name)
        elif error is not None:
            status.error = error

    async def mark_unreachable(self, node: str, error: BaseException) -> None:
        """A call found the node unreachable: offline now, so others fail fast."""
        if node in self._health and not isinstance(error, NodeOffline):
            await self.set_online(node, f"{type(error).__name__}: {error}")

    async def pinger(self, name: str) -> None:
        assert self.ping_interval is not None
        while True:
            await self.set_online(name, await self.ping(name))
            await anyio.sleep(self.ping_interval)

    async def _probe_until_online(self, name: str) -> None:
        """Without a periodic pinger: ping an offline node with backoff until it answers."""
        delay = 0.2
        while not self._health[name].status.online:
            await anyio.sleep(delay * (0.75 + 0.5 * self._rng.random()))
            error = await self.ping(name)
            await self.set_online(name, error)
            delay = min(delay * 2, 5.0)
