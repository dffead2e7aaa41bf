"""The inventory: which instances exist, their spec, and where each runs.

It lives in the store beside the jobs and changes only through jobs (plus an
explicit ``add_instance``/``remove_instance`` for set-up). A step that makes
something true on a node (the instance now runs on ``target``) carries the
matching :data:`InventoryChange` so the store applies it in the same
transaction that journals the step's end.
"""

from __future__ import annotations

import enum
from typing import Union

import msgspec

import hv


class AdminState(str, enum.Enum):
    UP = "up"
    DOWN = "down"


class PendingCleanup(msgspec.Struct, frozen=True, kw_only=True):
    """Something left on a node that a later job (Reconcile) must clean."""

    node: str
    reason: str
    job_id: int | None = None


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    spec: hv.Instance
    primary: str
    admin_state: AdminState = AdminState.DOWN
    pending_cleanup: tuple[PendingCleanup, ...] = ()
    version: int = 0  # bumped on every change


class SetPrimary(msgspec.Struct, frozen=True, kw_only=True, tag="set-primary"):
    instance: str
    node: str


class SetAdminState(msgspec.Struct, frozen=True, kw_only=True, tag="set-admin-state"):
    instance: str
    state: AdminState


class AddPendingCleanup(msgspec.Struct, frozen=True, kw_only=True, tag="add-pending-cleanup"):
    instance: str
    node: str
    reason: str


class ClearPendingCleanup(msgspec.Struct, frozen=True, kw_only=True, tag="clear-pending-cleanup"):
    instance: str
    node: str | None = None  # None: every entry


InventoryChange = Union[SetPrimary, SetAdminState, AddPendingCleanup, ClearPendingCleanup]


def apply_change(record: InstanceRecord, change: InventoryChange, *, job_id: int | None) -> InstanceRecord:
    """The record after ``change`` (pure; the store persists the result)."""
    rep = msgspec.structs.replace
    if isinstance(change, SetPrimary):
        record = rep(record, primary=change.node)
    elif isinstance(change, SetAdminState):
        record = rep(record, admin_state=AdminState(change.state))
    elif isinstance(change, AddPendingCleanup):
        entry = PendingCleanup(node=change.node, reason=change.reason, job_id=job_id)
        record = rep(record, pending_cleanup=(*record.pending_cleanup, entry))
    elif isinstance(change, ClearPendingCleanup):
        kept = tuple(p for p in record.pending_cleanup if change.node is not None and p.node != change.node)
        record = rep(record, pending_cleanup=kept)
    else:  # pragma: no cover - the Union is closed
        raise TypeError(f"unknown inventory change {change!r}")
    return rep(record, version=record.version + 1)
