"""herd's job engine: durable, cancellable, recoverable multi-step jobs.

::

    from engine import Engine, StopInstance, JobState
    async with Engine.open(store="herd.db", cluster="cluster.toml") as engine:
        job_id = await engine.submit(StopInstance(instance="web1", timeout=30))
        async for event in engine.watch(job_id): ...
        job = await engine.wait(job_id)

This is the public face (``__all__``): the engine, the operations, jobs and
their parts, the inventory record, the errors, and for workflow authors
:class:`Workflow`, :class:`Outcome`, :class:`Context` and the built-in
tables. Everything else lives in the private modules (``engine._store``,
``engine._locks``, ``engine._inventory``, …) and may change.
"""

from __future__ import annotations

from ._cluster import Cluster, load_cluster
from ._engine import Engine
from ._health import NodeStatus
from ._inventory import AdminState, InstanceRecord
from ._jobs import ErrorInfo, Event, Job, JobState, Step, StepState
from ._ops import Noop, Operation, RebootInstance, RebootType, StartInstance, StopInstance
from ._ops_migration import EvacuateNode, Failover, Migrate, Reconcile, VerifyCluster
from ._policy import MigrationPolicy, TimeoutAction
from ._workflow import Context, Outcome, Workflow
from .errors import (
    CompensationFailed,
    DependencyFailed,
    EngineBusy,
    EngineError,
    InstanceNotKnown,
    InvalidOperation,
    JobCancelled,
    JobNotFound,
    NodeOffline,
    RecoveryPending,
    StepFailed,
    StepTimeout,
    StepUnreachable,
    StoreError,
)
from .workflows import BUILTIN_SERVICES, BUILTIN_WORKFLOWS

__all__ = [
    # the engine and its cluster
    "Engine",
    "Cluster",
    "load_cluster",
    "NodeStatus",
    # operations
    "Operation",
    "Noop",
    "StartInstance",
    "StopInstance",
    "RebootInstance",
    "RebootType",
    "Migrate",
    "Failover",
    "EvacuateNode",
    "Reconcile",
    "VerifyCluster",
    "MigrationPolicy",
    "TimeoutAction",
    # jobs
    "Job",
    "JobState",
    "Event",
    "Step",
    "StepState",
    "ErrorInfo",
    # the inventory
    "InstanceRecord",
    "AdminState",
    # errors
    "EngineError",
    "InvalidOperation",
    "InstanceNotKnown",
    "JobNotFound",
    "StoreError",
    "StepFailed",
    "StepTimeout",
    "StepUnreachable",
    "NodeOffline",
    "JobCancelled",
    "CompensationFailed",
    "DependencyFailed",
    "RecoveryPending",
    "EngineBusy",
    # for workflow authors
    "Workflow",
    "Outcome",
    "Context",
    "BUILTIN_WORKFLOWS",
    "BUILTIN_SERVICES",
]
