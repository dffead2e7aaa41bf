"""Fault injection by method name: errors, delays and hangs on purpose.

The fake driver and the transports consult a :class:`Faults` object at the
start of each call, so a test or a chaos run can fail any step of any job.
Delays and hangs use anyio's clock, so they also run on virtual time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import anyio

from .errors import HypervisorError, InjectedFault


@dataclass
class Fault:
    """What to do when the method is called.

    ``error``: raise this (an exception instance, or a message for
    :class:`InjectedFault`); ``delay``: sleep first (seconds; ``math.inf``
    is a hang); ``times``: how many calls it hits (None: every call).
    """

    error: BaseException | str | None = None
    delay: float = 0.0
    times: int | None = None
    hits: int = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    async def apply(self, method: str, *, node: str | None = None) -> None:
        """Wait the delay (forever for a hang), then raise the error, if any."""
        if self.delay:
            if math.isinf(self.delay):
                await anyio.sleep_forever()
            await anyio.sleep(self.delay)
        if self.error is not None:
            error = self.error
            if isinstance(error, str):
                raise InjectedFault(f"injected fault in {method}: {error}", node=node)
            if isinstance(error, HypervisorError) and node and error.node is None:
                error.node = node
            raise error


@dataclass
class Faults:
    """A table of injected faults keyed by method name."""

    table: dict[str, Fault] = field(default_factory=dict)

    def inject(
        self,
        method: str,
        *,
        error: BaseException | str | None = None,
        delay: float = 0.0,
        hang: bool = False,
        times: int | None = None,
    ) -> Fault:
        fault = Fault(error=error, delay=math.inf if hang else delay, times=times)
        self.table[method] = fault
        return fault

    def clear(self, method: str | None = None) -> None:
        if method is None:
            self.table.clear()
        else:
            self.table.pop(method, None)

    async def hit(self, method: str, *, node: str | None = None) -> None:
        """Apply the fault for ``method``, if one is armed."""
        fault = self.table.get(method)
        if fault is None or fault.exhausted:
            return
        fault.hits += 1
        await fault.apply(method, node=node)
