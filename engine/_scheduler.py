"""The scheduler: which waiting job gets its locks and runs next.

Priority then age; a better waiter that cannot run yet reserves its locks
(no starvation by smaller jobs); at most ``max_running_jobs`` run, and at
most ``max_migrations_per_node`` migrations touch one node at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._inventory import InstanceRecord
from ._locks import LockManager, LockRequest, conflicts
from ._ops import Operation
from ._recorder import JobHandle
from .errors import EngineError


class Scheduler:
    """Waiting and running jobs, the lock table and the per-node migration counts."""

    def __init__(self, max_running_jobs: int, max_migrations_per_node: int) -> None:
        self.max_running_jobs = max_running_jobs
        self.max_migrations_per_node = max_migrations_per_node
        self.locks = LockManager()
        self.waiting: dict[int, JobHandle] = {}
        self.running: set[int] = set()
        self.migrations: dict[str, int] = {}

    def schedule(self, *, draining: bool) -> None:
        """Grant locks to waiting jobs: priority then age; better waiters reserve theirs."""
        reserved: list[list[LockRequest]] = []
        for h in sorted(self.waiting.values(), key=lambda j: (j.priority, j.id)):
            if h.granted.is_set() or (draining and h.parent_id is None):
                continue
            if len(self.running) >= self.max_running_jobs:
                break
            blocked = any(conflicts(h.locks, r) for r in reserved)
            over = any(self.migrations.get(n, 0) >= self.max_migrations_per_node for n in h.migration_nodes)
            if not blocked and not over and self.locks.try_acquire(h.id, h.locks):
                del self.waiting[h.id]
                self.running.add(h.id)
                self.count_migrations(h, +1)
                h.granted.set()
            else:
                reserved.append(h.locks)

    def start_recovered(self, h: JobHandle) -> None:
        """A job recovered at open: its locks first, before any new job's."""
        self.locks.try_acquire(h.id, h.locks)
        self.running.add(h.id)
        self.count_migrations(h, +1)

    def release(self, h: JobHandle) -> None:
        self.waiting.pop(h.id, None)
        if h.id in self.running:
            self.running.discard(h.id)
            self.count_migrations(h, -1)
        self.locks.release_all(h.id)

    def count_migrations(self, h: JobHandle, delta: int) -> None:
        for n in h.migration_nodes:
            self.migrations[n] = self.migrations.get(n, 0) + delta


def safe_migration_nodes(op: Operation, inventory: Mapping[str, InstanceRecord]) -> tuple[str, ...]:
    """The nodes ``op`` migrates between (none when the inventory does not say)."""
    try:
        return tuple(op.migration_nodes(inventory))
    except (KeyError, EngineError):
        return ()
