"""The in-process side of a fake migration: its live record, stall guard and failure words."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import anyio

from .._objects import MigrationState, MigrationStatus
from ..errors import HypervisorError, MigrationError

MIB = 1024 * 1024
#: A waiting ``get_migration_status`` is woken at least this often while bytes flow.
PROGRESS_INTERVAL = 0.05
#: How often a running stream re-reads config.json (bandwidth, dirty rate).
CONFIG_INTERVAL = 0.1
#: Most a stream may fall behind its pace before it stops trying to catch up (s).
MAX_BURST = 0.1
#: The statuses of a migration still under way.
ACTIVE = frozenset({MigrationState.SETUP.value, MigrationState.ACTIVE.value, MigrationState.DEVICE.value})


def describe(err: BaseException) -> str:
    """A broken stream's cause in words (anyio's stream errors carry no message)."""
    if isinstance(err, HypervisorError):
        return err.message
    if isinstance(err, (anyio.EndOfStream, anyio.IncompleteRead)):
        return "the peer closed the connection"
    if isinstance(err, (anyio.BrokenResourceError, anyio.ClosedResourceError)):
        cause = err.__cause__ or err.__context__
        return "the connection broke" + (f" ({cause})" if cause else "")
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class StreamStalled(MigrationError):
    """A migration stream made no progress for ``stall_timeout`` seconds."""


@contextlib.contextmanager
def stall_guard(seconds: float | None, what: str) -> Any:
    """Fail a blocked send/receive after ``seconds`` (None: wait forever, like QEMU)."""
    if seconds is None:
        yield
        return
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise StreamStalled(f"migration stream stalled: {what} made no progress for {seconds:g}s") from None



@dataclass
class LiveMigration:
    """The live, in-process side of one migration (source or target)."""

    name: str
    role: str
    status: str = MigrationState.SETUP.value
    ram_total: int = 0
    transferred: int = 0
    to_send: int = 0  # bytes left in the current pass (source)
    dirty: int = 0  # bytes re-dirtied since the pass began (source)
    iterations: int = 0
    rate_bps: float | None = None
    dirty_rate_bps: float | None = None
    downtime_limit_ms: int = 300
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    started: float = 0.0
    error: str | None = None
    force: bool = False
    paused_at: float | None = None  # when the migration paused the guest (downtime starts)
    cancel_reason: str | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    bandwidth: int = 0

    @property
    def final(self) -> bool:
        return self.status not in ACTIVE

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def snapshot(self) -> MigrationStatus:
        remaining = self.to_send + self.dirty if self.role == "source" else max(0, self.ram_total - self.transferred)
        if self.status == MigrationState.COMPLETED.value:
            remaining = 0
        expected = None
        if self.bandwidth and self.status in ACTIVE:
            expected = int(remaining * 1000 / self.bandwidth)
        return MigrationStatus(
            status=self.status,
            ram_transferred=self.transferred,
            ram_remaining=remaining,
            ram_total=self.ram_total,
            rate_bps=self.rate_bps,
            dirty_rate_bps=self.dirty_rate_bps,
            downtime_ms=self.downtime_ms,
            expected_downtime_ms=expected,
            total_time_ms=self.total_time_ms,
            iterations=self.iterations,
            error=self.error,
        )
