"""Helpers for tests whose timing depends on how busy the machine is.

A test that needs a timing property sets up its preconditions or measures the
machine first, then derives its limits from what it measured; it never relies
on a fixed sleep or deadline being "long enough".
"""

from __future__ import annotations

from typing import Any, Protocol

import anyio


class _Pingable(Protocol):
    async def ping(self, *, call_timeout: float | None = None) -> dict[str, Any]: ...


async def warm_call_deadline(node: _Pingable, *, floor: float = 0.5, factor: float = 10.0, pings: int = 3) -> float:
    """Open ``node``'s connection, then a call deadline that a request is sure to outlast on the wire.

    The connection is opened by a first ping, so its set-up (SSH handshake, agent
    start) stays outside the caller's timed call. The few pings after it measure
    a full round trip through the agent on this machine now; the deadline is
    ``factor`` times the slowest, and never below ``floor``: so a call that hangs
    on the node has reached the node (and its cancel reaches it) well before its
    deadline runs out, however loaded the machine is.
    """
    await node.ping()
    slowest = 0.0
    for _ in range(pings):
        began = anyio.current_time()
        await node.ping()
        slowest = max(slowest, anyio.current_time() - began)
    return max(floor, round(factor * slowest, 1))
