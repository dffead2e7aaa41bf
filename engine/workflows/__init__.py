"""The built-in workflows and services, as explicit tables.

An engine is given its tables (``Engine.open(..., workflows=..., services=...)``,
default: these). To add an operation, extend the table for that engine::

    Engine.open(store, cluster, workflows={**BUILTIN_WORKFLOWS, "my-op": MyWorkflow})

Nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .._seam import Service
from .._workflow import Workflow
from .evacuate import EvacuateWorkflow
from .failover import FailoverWorkflow
from .migrate import MigrateWorkflow
from .noop import NoopWorkflow
from .reboot import RebootWorkflow
from .reconcile import ReconcileWorkflow, pending_cleanup_janitor
from .start import StartWorkflow
from .stop import StopWorkflow
from .verify import VerifyWorkflow

_CLASSES: tuple[type[Workflow[Any]], ...] = (
    NoopWorkflow, StartWorkflow, StopWorkflow, RebootWorkflow,
    MigrateWorkflow, FailoverWorkflow, EvacuateWorkflow, ReconcileWorkflow, VerifyWorkflow,
)

#: Workflow class per operation kind (read-only; extend a copy).
BUILTIN_WORKFLOWS: Mapping[str, type[Workflow[Any]]] = MappingProxyType({str(cls.OP.__struct_config__.tag): cls for cls in _CLASSES})

#: Services the owner engine runs from open to close (read-only; extend a copy).
BUILTIN_SERVICES: Mapping[str, Service] = MappingProxyType({"pending-cleanup janitor": pending_cleanup_janitor})

__all__ = ["BUILTIN_SERVICES", "BUILTIN_WORKFLOWS"]
