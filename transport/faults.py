"""Transport-level fault injection, by node and method (tests, chaos).

``transport.faults.inject("n1", "get_node_info", delay=2)`` delays that
call to that node on the engine side, before it is sent; ``hang=True``
never sends it (the call's deadline then applies); ``error=`` raises it as
if the node had (``node`` set); ``drop_connection=True`` sends the request
and then drops the node's connection, so the call fails with
``NodeUnreachable`` while the node may or may not have acted on it — the
ambiguous failure a real network gives. Delays run on anyio's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import hv


@dataclass
class DropFault:
    times: int | None = None
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


class TransportFaults:
    """Per-node :class:`hv.Faults` tables plus connection drops."""

    def __init__(self) -> None:
        self._nodes: dict[str, hv.Faults] = {}
        self._drops: dict[tuple[str, str], DropFault] = {}

    def for_node(self, node: str) -> hv.Faults:
        """The node's fault table (created empty on first use)."""
        return self._nodes.setdefault(node, hv.Faults())

    def inject(
        self,
        node: str,
        method: str,
        *,
        error: BaseException | str | None = None,
        delay: float = 0.0,
        hang: bool = False,
        drop_connection: bool = False,
        times: int | None = None,
    ) -> hv.Fault | DropFault:
        if drop_connection:
            fault = DropFault(times=times)
            self._drops[(node, method)] = fault
            return fault
        return self.for_node(node).inject(method, error=error, delay=delay, hang=hang, times=times)

    def clear(self, node: str | None = None, method: str | None = None) -> None:
        nodes = [node] if node is not None else list(self._nodes)
        for name in nodes:
            if name in self._nodes:
                self._nodes[name].clear(method)
        for key in list(self._drops):
            if (node is None or key[0] == node) and (method is None or key[1] == method):
                del self._drops[key]

    async def hit(self, node: str, method: str) -> None:
        """Apply a delay / hang / error armed for this call."""
        faults = self._nodes.get(node)
        if faults is not None:
            await faults.hit(method, node=node)

    def take_drop(self, node: str, method: str) -> bool:
        """Whether this call should drop the connection after sending (counts a hit)."""
        fault = self._drops.get((node, method))
        if fault is None or fault.exhausted:
            return False
        fault.hits += 1
        return True
