"""Typed operations: what a job is asked to do.

Each operation is a frozen msgspec Struct tagged with its ``kind``; it knows
how to validate itself against the inventory and the cluster's nodes (at
``submit``, before anything is stored), which locks it needs, and its step
deadlines (per-method defaults, overridable per operation with
``deadlines={"stop_instance": 90}``).

Adding an operation: subclass :class:`Operation` with ``tag="kebab-name"``,
implement ``validate`` and ``lock_requests`` (or inherit
:class:`InstanceOperation`'s), then write a workflow with ``OP = YourOp``
and list it in the engine's table (built-ins: ``engine.workflows.BUILTIN_WORKFLOWS``;
the built-in operations: ``engine._optable.BUILTIN_OPERATIONS``).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import msgspec

import hv

from ._inventory import InstanceRecord
from ._locks import LockRequest, instance_lock, node_lock
from .errors import InvalidOperation, shorten

#: Seconds a step may take unless the operation says otherwise.
DEFAULT_STEP_DEADLINES: dict[str, float] = {
    "ping": 10.0,
    "get_instance_info": 15.0,
    "get_all_instances_info": 20.0,
    "list_instances": 15.0,
    "get_node_info": 15.0,
    "instance_startup_memory": 15.0,
    "validate_parameters": 30.0,
    "start_instance": 120.0,
    "reboot_instance": 120.0,
    "cleanup_instance": 60.0,
    "verify": 60.0,
    "migration_info": 30.0,
    "accept_instance": 60.0,
    "migrate_instance": 60.0,
    "get_migration_status": 30.0,
    "finalize_migration_dst": 120.0,
    "finalize_migration_source": 120.0,
    "balloon_instance_memory": 60.0,
}
#: When nothing else says: a generous bound, never infinity.
FALLBACK_DEADLINE = 300.0

class Operation(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", forbid_unknown_fields=True):
    """Base of every operation. ``deadlines`` overrides step deadlines (s)."""

    deadlines: dict[str, float] = msgspec.field(default_factory=dict)

    #: Whether the op migrates something (counts against the per-node limit).
    MIGRATES: ClassVar[bool] = False

    @property
    def kind(self) -> str:
        return str(type(self).__struct_config__.tag)

    # --- to override --------------------------------------------------------

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        """Raise :class:`InvalidOperation` naming what is wrong (touch nothing)."""
        for key, value in self.deadlines.items():
            check_seconds(self.kind, f"deadline for {shorten(key, 40)}", value, zero=False)

    def lock_requests(self, inventory: Mapping[str, InstanceRecord]) -> list[LockRequest]:
        """The locks to hold while the job runs (taken all at once, in order)."""
        return []

    def migration_nodes(self, inventory: Mapping[str, InstanceRecord]) -> tuple[str, ...]:
        """Nodes whose concurrent-migration limit this job counts against."""
        return ()

    def summary(self) -> str:
        return self.kind

    # --- helpers ------------------------------------------------------------

    def deadline_for(self, step_or_method: str, method: str | None = None) -> float:
        """The deadline for a step: override by step name, then by method, then defaults."""
        for key in (step_or_method, method):
            if key and key in self.deadlines:
                return float(self.deadlines[key])
        for key in (method, step_or_method):
            if key and key in DEFAULT_STEP_DEADLINES:
                return DEFAULT_STEP_DEADLINES[key]
        return FALLBACK_DEADLINE


#: The one rule for instance and node names, wherever they enter (cluster
#: file, ``add_instance``, every operation's fields): a letter or digit, then
#: up to 62 letters, digits, ``.``, ``_`` or ``-`` — what the drivers
#: (``hv``) and the transport's node names accept, and safe as a file name,
#: a process name and a command argument.
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
NAME_RULE_TEXT = "1-63 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"

#: The longest duration an operation or policy takes (seconds): 7 days.
MAX_SECONDS = 7 * 24 * 3600.0


def name_problem(value: Any, *, echo: bool = True) -> str | None:
    """Why ``value`` is not a valid instance/node name (None when it is).

    ``echo=False``: the caller already shows the value.
    """
    shown = f"{shorten(value)} " if echo else ""
    if not isinstance(value, str):
        return f"{shown}must be a name (a string), not {type(value).__name__}"
    if NAME_RULE.fullmatch(value) is None:
        return f"{shown}is not a valid name ({NAME_RULE_TEXT})"
    return None


def check_name(where: str, field: str, value: Any) -> None:
    """Refuse ``value`` as the name in ``field`` unless it follows :data:`NAME_RULE`."""
    problem = name_problem(value)
    if problem is not None:
        raise InvalidOperation(f"{where}: {field} {problem}")


_check_name = check_name


def check_seconds(where: str, field: str, value: Any, *, zero: bool = True, maximum: float = MAX_SECONDS) -> None:
    """Refuse a duration outside ``0 (<)<= value <= maximum`` seconds (finite, not a bool)."""
    low = ">= 0" if zero else "> 0"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
        or value > maximum
    ):
        raise InvalidOperation(f"{where}: {field} must be a finite number {low} and <= {maximum:g} (seconds), not {shorten(value)}")


def _check_timeout(kind: str, field: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    check_seconds(kind, field, value)


def check_hvparams(kind: str, spec: hv.Instance, hvparams: Mapping[str, Any] | None = None) -> None:
    """Submit-side syntax check of hvparams with the instance's driver class."""
    try:
        cls = hv.get_hypervisor_class(spec.hypervisor)
    except hv.HypervisorError as err:
        raise InvalidOperation(f"{kind}: instance {spec.name}: {err}") from err
    params = cls.fill_hvparams({**spec.hvparams, **(hvparams or {})})
    try:
        cls.check_parameter_syntax(params)
    except hv.HypervisorError as err:
        raise InvalidOperation(f"{kind}: instance {spec.name}: {err}") from err


class InstanceOperation(Operation, frozen=True, kw_only=True):
    """An operation on one instance: instance lock exclusive, its node shared."""

    instance: str

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        _check_name(self.kind, "instance", self.instance)
        record = inventory.get(self.instance)
        if record is None:
            raise InvalidOperation(f"{self.kind}: unknown instance {shorten(self.instance)}")
        if record.primary not in nodes:
            raise InvalidOperation(
                f"{self.kind}: instance {self.instance!r} has primary node {record.primary!r}, which the cluster does not know"
            )

    def lock_requests(self, inventory: Mapping[str, InstanceRecord]) -> list[LockRequest]:
        record = inventory[self.instance]
        return [instance_lock(self.instance, exclusive=True), node_lock(record.primary, exclusive=False)]

    def summary(self) -> str:
        return f"{self.kind} {self.instance}"


class StartInstance(InstanceOperation, frozen=True, kw_only=True, tag="start-instance"):
    """Start an instance on its primary node and prove it runs.

    ``hvparams``: one-off overrides for this start (syntax-checked at submit).
    """

    hvparams: dict[str, Any] = msgspec.field(default_factory=dict)
    startup_paused: bool = False

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        check_hvparams(self.kind, inventory[self.instance].spec, self.hvparams)


class StopInstance(InstanceOperation, frozen=True, kw_only=True, tag="stop-instance"):
    """Stop an instance: soft, then hard after ``timeout`` s; ``force``: hard now."""

    timeout: float = 30.0
    force: bool = False

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        _check_timeout(self.kind, "timeout", self.timeout)

    def deadline_for(self, step_or_method: str, method: str | None = None) -> float:
        # The driver owns the soft→hard escalation: give it the soft timeout
        # plus room for the hard stages before the engine gives up.
        if (method or step_or_method) == "stop_instance" and not (
            step_or_method in self.deadlines or (method and method in self.deadlines)
        ):
            return float(self.timeout) + 60.0
        return super().deadline_for(step_or_method, method)


class RebootType(str, enum.Enum):
    SOFT = "soft"  # the hypervisor's reboot
    HARD = "hard"  # stop (forced) then start


class RebootInstance(InstanceOperation, frozen=True, kw_only=True, tag="reboot-instance"):
    reboot_type: RebootType = RebootType.SOFT
    timeout: float = 30.0

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        _check_timeout(self.kind, "timeout", self.timeout)


class Noop(Operation, frozen=True, kw_only=True, tag="noop"):
    """Does nothing on any node (benchmarks, tests of the machinery).

    ``steps`` local steps are journaled; ``hold_instance`` takes that
    instance's lock exclusively, so it orders against instance jobs.
    """

    steps: int = 1
    hold_instance: str | None = None
    sleep: float = 0.0  # seconds each step waits (a cancellable wait)

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)
        if not isinstance(self.steps, int) or not 0 <= self.steps <= 1000:
            raise InvalidOperation(f"noop: steps must be an int in 0..1000, not {shorten(self.steps)}")
        _check_timeout(self.kind, "sleep", self.sleep)
        if self.hold_instance is not None:
            check_name(self.kind, "hold_instance", self.hold_instance)
            if self.hold_instance not in inventory:
                raise InvalidOperation(f"noop: unknown instance {shorten(self.hold_instance)}")

    def lock_requests(self, inventory: Mapping[str, InstanceRecord]) -> list[LockRequest]:
        return [instance_lock(self.hold_instance, exclusive=True)] if self.hold_instance else []


def operation_type(kind: str, operations: Mapping[str, type[Operation]]) -> type[Operation]:
    """The operation class for ``kind`` in ``operations`` (InvalidOperation when unknown)."""
    try:
        return operations[kind]
    except KeyError:
        raise InvalidOperation(f"unknown operation kind {shorten(kind)} (known: {', '.join(sorted(operations))})") from None


def encode_op(op: Operation) -> bytes:
    return msgspec.json.encode(op)


def decode_op(kind: str, data: bytes | str, operations: Mapping[str, type[Operation]]) -> Operation:
    """Decode a stored or submitted operation of ``kind`` (validated by type; ``operations``: the kinds known)."""
    try:
        return msgspec.json.decode(data, type=operation_type(kind, operations))
    except msgspec.ValidationError as err:
        raise InvalidOperation(f"{kind}: {err}") from err


#: Field names the command line may not set: the operation is its first argument.
RESERVED_FIELDS = frozenset({"kind"})


def fields_from_pairs(kind: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Operation fields from ``(name, value)`` pairs, each name once (CLI, forms).

    A repeated field (``instance=a instance=b``, also ``reboot-type`` and
    ``reboot_type``) or a reserved one (``kind=``: the operation is named
    once, by the caller) is refused, naming it, instead of keeping the last.
    """
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in RESERVED_FIELDS:
            raise InvalidOperation(
                f"{kind}: field {shorten(name)} is reserved: the operation is {shorten(kind)} (the first argument); drop {name}="
            )
        if name in out:
            raise InvalidOperation(f"{kind}: field {shorten(name)} is given twice: give it once")
        out[name] = value
    return out
