"""Operations around live migration: Migrate, Failover, EvacuateNode, Reconcile, VerifyCluster.

Each is validated at ``submit`` against the inventory and the cluster's
nodes (a bad one never enters the queue); the node-side checks (is it
really running there? enough memory?) are the workflow's first steps.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import msgspec

import hv

from ._inventory import InstanceRecord
from ._locks import LockRequest, instance_lock, node_lock
from ._ops import InstanceOperation, Operation, _check_name, check_hvparams
from ._policy import DEFAULT_POLICY, MigrationPolicy
from .errors import InvalidOperation, shorten


def check_policy(kind: str, overrides: Mapping[str, Any], base: MigrationPolicy = DEFAULT_POLICY) -> MigrationPolicy:
    """The policy ``overrides`` make of ``base`` (InvalidOperation naming the knob)."""
    if not isinstance(overrides, Mapping):
        raise InvalidOperation(f"{kind}: policy must be a table of knobs, not {shorten(overrides)}")
    return base.with_overrides(overrides, where=f"{kind}: policy")


def _check_node(kind: str, field: str, node: Any, nodes: Collection[str]) -> None:
    _check_name(kind, field, node)
    if node not in nodes:
        raise InvalidOperation(f"{kind}: {field} {node!r} is not a node of the cluster (nodes: {', '.join(sorted(nodes))})")


class Migrate(InstanceOperation, frozen=True, kw_only=True, tag="migrate"):
    """Live-migrate ``instance`` from its primary node to ``target``.

    ``live=False`` pauses the guest for the copy. ``allow_runtime_changes``:
    balloon the guest down (not below minmem) when the target lacks memory.
    ``ignore_hv_versions``: migrate even between hypervisor versions the
    driver does not call safe. ``policy``: convergence knobs over the cluster
    default (see :class:`engine.MigrationPolicy`).
    """

    target: str
    live: bool = True
    allow_runtime_changes: bool = True
    ignore_hv_versions: bool = False
    policy: dict[str, Any] = msgspec.field(default_factory=dict)

    MIGRATES: ClassVar[bool] = True

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        record = inventory[self.instance]
        _check_node(self.kind, "target", self.target, nodes)
        if self.target == record.primary:
            raise InvalidOperation(f"{self.kind}: target node {self.target} is the source: {self.instance} already has it as primary")
        cls = hv.get_hypervisor_class(record.spec.hypervisor)
        if not cls.CAN_MIGRATE:
            raise InvalidOperation(f"{self.kind}: instance {self.instance}: the {cls.NAME} hypervisor cannot migrate")
        check_hvparams(self.kind, record.spec)
        check_policy(self.kind, self.policy)

    def lock_requests(self, inventory: Mapping[str, InstanceRecord]) -> list[LockRequest]:
        source = inventory[self.instance].primary
        return [instance_lock(self.instance, exclusive=True), node_lock(source, exclusive=False), node_lock(self.target, exclusive=False)]

    def migration_nodes(self, inventory: Mapping[str, InstanceRecord]) -> tuple[str, ...]:
        return (inventory[self.instance].primary, self.target)

    def summary(self) -> str:
        return f"{self.kind} {self.instance} -> {self.target}{'' if self.live else ' (non-live)'}"


class Failover(InstanceOperation, frozen=True, kw_only=True, tag="failover"):
    """Start ``instance`` on ``target`` because its primary node is down.

    Only when the primary is unreachable *and* the operator confirms it is
    down (``primary_down=True``): a primary that is merely partitioned may
    still run the guest, and failing over then makes two.
    """

    target: str
    primary_down: bool = False

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        record = inventory[self.instance]
        _check_node(self.kind, "target", self.target, nodes)
        if self.target == record.primary:
            raise InvalidOperation(f"{self.kind}: target node {self.target} is {self.instance}'s primary")
        if self.primary_down is not True:
            raise InvalidOperation(
                f"{self.kind}: {self.instance}: confirm that primary node {record.primary} is down with primary_down=True "
                f"(a partitioned primary may still run the instance)"
            )
        check_hvparams(self.kind, record.spec)

    def lock_requests(self, inventory: Mapping[str, InstanceRecord]) -> list[LockRequest]:
        primary = inventory[self.instance].primary
        return [instance_lock(self.instance, exclusive=True), node_lock(primary, exclusive=False), node_lock(self.target, exclusive=False)]

    def summary(self) -> str:
        return f"{self.kind} {self.instance} -> {self.target}"


class EvacuateNode(Operation, frozen=True, kw_only=True, tag="evacuate-node"):
    """Migrate every instance off ``node`` as child jobs, ``concurrency`` at a time.

    Targets are chosen by free memory (most free first, accounting for what
    was already placed). ``targets``: restrict to these nodes.
    """

    node: str
    live: bool = True
    concurrency: int = 2
    targets: list[str] = msgspec.field(default_factory=list)
    allow_runtime_changes: bool = True
    policy: dict[str, Any] = msgspec.field(default_factory=dict)

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        _check_node(self.kind, "node", self.node, nodes)
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or not 1 <= self.concurrency <= 64:
            raise InvalidOperation(f"{self.kind}: concurrency must be an integer in 1..64, not {shorten(self.concurrency)}")
        for target in self.targets:
            _check_node(self.kind, "targets entry", target, nodes)
            if target == self.node:
                raise InvalidOperation(f"{self.kind}: targets must not include the evacuated node {self.node}")
        if len(set(nodes) - {self.node}) == 0:
            raise InvalidOperation(f"{self.kind}: the cluster has no node other than {self.node} to evacuate to")
        check_policy(self.kind, self.policy)

    def summary(self) -> str:
        return f"{self.kind} {self.node}"


class Reconcile(InstanceOperation, frozen=True, kw_only=True, tag="reconcile"):
    """Ask the nodes where ``instance`` really runs and settle the inventory.

    Ganeti's ``gnt-instance migrate --cleanup``, made an operation: finishes
    or rolls back an orphaned migration, stops a duplicate only when the
    inventory's copy is proven running, marks the instance down when it runs
    nowhere. ``nodes``: also ask these (default: every node).
    """

    nodes: list[str] = msgspec.field(default_factory=list)

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        for node in self.nodes:
            _check_node(self.kind, "nodes entry", node, nodes)


class VerifyCluster(Operation, frozen=True, kw_only=True, tag="verify-cluster"):
    """Report every instance running on zero or several nodes, or not where the inventory says.

    Read-only: it takes no locks and changes nothing.
    """

    def summary(self) -> str:
        return self.kind
