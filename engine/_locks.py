"""Locks: instance locks and node locks, granted all at once in one order.

A job declares every lock it needs up front (:class:`LockRequest`). The
scheduler grants a job's whole set atomically or not at all, so no job ever
holds some locks while waiting for others — two jobs cannot deadlock. The
set is also kept sorted in one global order (nodes, then instances, by name)
so a future incremental acquirer stays deadlock-free by the classic rule.

Fairness: waiters are considered by priority then age; a lock that a
better-placed waiter is blocked on is *reserved* for it, so a stream of later
jobs cannot starve it (a later job may still pass if it conflicts with
neither the held locks nor any better waiter's reservation).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

#: Lock levels in acquisition order.
LEVELS = ("node", "instance")


class LockRequest(msgspec.Struct, frozen=True, kw_only=True, order=True):
    level: str
    name: str
    exclusive: bool = True

    @property
    def key(self) -> tuple[int, str]:
        return (LEVELS.index(self.level), self.name)

    def __str__(self) -> str:
        return f"{self.level}/{self.name}({'x' if self.exclusive else 's'})"


def instance_lock(name: str, *, exclusive: bool = True) -> LockRequest:
    return LockRequest(level="instance", name=name, exclusive=exclusive)


def node_lock(name: str, *, exclusive: bool = False) -> LockRequest:
    return LockRequest(level="node", name=name, exclusive=exclusive)


def normalise(requests: Iterable[LockRequest]) -> list[LockRequest]:
    """One request per lock (exclusive wins), in the global order."""
    merged: dict[tuple[int, str], LockRequest] = {}
    for req in requests:
        if req.level not in LEVELS:
            raise ValueError(f"unknown lock level {req.level!r} in {req}")
        prev = merged.get(req.key)
        if prev is None or (req.exclusive and not prev.exclusive):
            merged[req.key] = req
    return [merged[k] for k in sorted(merged)]


class _Held:
    __slots__ = ("exclusive", "owners")

    def __init__(self) -> None:
        self.exclusive = False
        self.owners: set[int] = set()


class LockManager:
    """Who holds which lock; pure bookkeeping (the scheduler is its only caller)."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, str], _Held] = {}
        self._by_owner: dict[int, list[LockRequest]] = {}

    def held_by(self, owner: int) -> list[LockRequest]:
        return list(self._by_owner.get(owner, ()))

    def holders(self, level: str, name: str) -> set[int]:
        held = self._held.get((LEVELS.index(level), name))
        return set(held.owners) if held else set()

    def snapshot(self) -> dict[str, list[int]]:
        return {f"{LEVELS[k[0]]}/{k[1]}{'(x)' if h.exclusive else '(s)'}": sorted(h.owners) for k, h in self._held.items()}

    def available(self, requests: Iterable[LockRequest], owner: int | None = None) -> bool:
        for req in requests:
            held = self._held.get(req.key)
            if held is None or not held.owners or held.owners == {owner}:
                continue
            if req.exclusive or held.exclusive:
                return False
        return True

    def try_acquire(self, owner: int, requests: Iterable[LockRequest]) -> bool:
        """Take every lock in ``requests`` for ``owner``, or none of them."""
        reqs = normalise(requests)
        if not self.available(reqs, owner):
            return False
        for req in reqs:
            held = self._held.setdefault(req.key, _Held())
            held.owners.add(owner)
            held.exclusive = held.exclusive or req.exclusive
        self._by_owner.setdefault(owner, []).extend(reqs)
        return True

    def release_all(self, owner: int) -> list[LockRequest]:
        reqs = self._by_owner.pop(owner, [])
        for req in reqs:
            held = self._held.get(req.key)
            if held is None:
                continue
            held.owners.discard(owner)
            if not held.owners:
                del self._held[req.key]
            else:
                # Still held: exclusive only if a remaining owner asked so.
                held.exclusive = any(
                    r.exclusive for o in held.owners for r in self._by_owner.get(o, ()) if r.key == req.key
                )
        return reqs


def conflicts(a: Iterable[LockRequest], b: Iterable[LockRequest]) -> bool:
    """Whether two request sets could not be held at the same time."""
    index = {r.key: r for r in b}
    for req in a:
        other = index.get(req.key)
        if other is not None and (req.exclusive or other.exclusive):
            return True
    return False
