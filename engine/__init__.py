"""herd's job engine: durable, cancellable, recoverable multi-step jobs.

::

    from engine import Engine, StopInstance, JobState
    async with Engine.open(store="herd.db", cluster="cluster.toml") as engine:
        job_id = await engine.submit(StopInstance(instance="web1", timeout=30))
        async for event in engine.watch(job_id): ...
        job = await engine.wait(job_id)
"""

from __future__ import annotations

from ._cluster import Cluster, instance_from_table, load_cluster
from ._engine import Engine, NodeStatus
from ._inventory import (
    AddPendingCleanup,
    AdminState,
    ClearPendingCleanup,
    InstanceRecord,
    InventoryChange,
    PendingCleanup,
    SetAdminState,
    SetPrimary,
)
from ._jobs import ErrorInfo, Event, Job, JobState, Step, StepState
from ._locks import LockRequest, instance_lock, node_lock
from ._log import configure_logging
from ._ops import (
    DEFAULT_STEP_DEADLINES,
    InstanceOperation,
    Noop,
    Operation,
    RebootInstance,
    RebootType,
    StartInstance,
    StopInstance,
    op_from_dict,
    operation_type,
)
from ._ops_migration import EvacuateNode, Failover, Migrate, Reconcile, VerifyCluster
from ._policy import MigrationPolicy, TimeoutAction
from ._store import SqliteStore, Store
from ._workflow import Context, Outcome, Workflow, register_service, register_workflow, workflow_for
from .errors import (
    CompensationFailed,
    DependencyFailed,
    EngineError,
    InstanceNotKnown,
    InvalidOperation,
    JobCancelled,
    JobNotFound,
    NodeOffline,
    EngineBusy,
    RecoveryPending,
    StepFailed,
    StepTimeout,
    StepUnreachable,
    StoreError,
)

__all__ = [
    "AddPendingCleanup",
    "AdminState",
    "ClearPendingCleanup",
    "Cluster",
    "CompensationFailed",
    "Context",
    "DEFAULT_STEP_DEADLINES",
    "DependencyFailed",
    "Engine",
    "EngineError",
    "EvacuateNode",
    "Failover",
    "Migrate",
    "MigrationPolicy",
    "Reconcile",
    "TimeoutAction",
    "VerifyCluster",
    "ErrorInfo",
    "Event",
    "InstanceNotKnown",
    "InstanceOperation",
    "InstanceRecord",
    "InvalidOperation",
    "InventoryChange",
    "Job",
    "JobCancelled",
    "JobNotFound",
    "JobState",
    "LockRequest",
    "NodeOffline",
    "NodeStatus",
    "Noop",
    "Operation",
    "Outcome",
    "PendingCleanup",
    "RebootInstance",
    "RebootType",
    "EngineBusy",
    "RecoveryPending",
    "SetAdminState",
    "SetPrimary",
    "SqliteStore",
    "StartInstance",
    "Step",
    "StepFailed",
    "StepState",
    "StepTimeout",
    "StepUnreachable",
    "StopInstance",
    "Store",
    "StoreError",
    "Workflow",
    "configure_logging",
    "instance_from_table",
    "instance_lock",
    "load_cluster",
    "node_lock",
    "op_from_dict",
    "operation_type",
    "register_service",
    "register_workflow",
    "workflow_for",
]
