"""herd's hypervisor layer: the async driver interface and its drivers.

``hv`` knows nothing of jobs or SSH. Drivers are found by name::

    import hv
    node = hv.get_hypervisor("fake", state_dir="/tmp/node1", node="node1")
    await node.start_instance(hv.Instance(name="web1"))
"""

from __future__ import annotations

import importlib
from typing import Any

from ._faults import Fault, Faults
from ._objects import (
    MIGRATION_FAILED_STATUSES,
    MIGRATION_FINAL_STATUSES,
    BeParams,
    ConsoleInfo,
    Disk,
    HvInstanceState,
    Instance,
    InstanceInfo,
    MigrationState,
    MigrationStatus,
    Network,
    Nic,
    NicMode,
    NodeInfo,
    StageTiming,
    StopResult,
    StopStage,
)
from ._progress import progress_sink, report_progress
from .base import REMOTE_METHODS, BaseHypervisor, configure_nic, generate_tap_name, get_linux_node_info
from .errors import (
    HotplugError,
    HypervisorError,
    HypervisorTimeout,
    InjectedFault,
    InstanceNotFound,
    MigrationError,
    ParameterError,
    ParameterValueError,
    ParseError,
)

#: Driver name → "module:Class"; imported on first use so that a node without
#: QEMU can still run the fake driver.
_REGISTRY: dict[str, str] = {
    "fake": "hv.fake:FakeHypervisor",
    "kvm": "hv.qemu:QemuHypervisor",
}


def hypervisor_names() -> list[str]:
    return sorted(_REGISTRY)


def get_hypervisor_class(name: str) -> type[BaseHypervisor]:
    """The driver class registered as ``name``."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise HypervisorError(
            f"unknown hypervisor {name!r} (known: {', '.join(hypervisor_names())})"
        ) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_hypervisor(name: str, **config: Any) -> BaseHypervisor:
    """A driver instance: ``get_hypervisor("fake", state_dir=..., node=...)``."""
    return get_hypervisor_class(name)(**config)


__all__ = [
    "REMOTE_METHODS",
    "BaseHypervisor",
    "BeParams",
    "ConsoleInfo",
    "Disk",
    "Fault",
    "Faults",
    "HotplugError",
    "HvInstanceState",
    "HypervisorError",
    "HypervisorTimeout",
    "InjectedFault",
    "Instance",
    "InstanceInfo",
    "InstanceNotFound",
    "MIGRATION_FAILED_STATUSES",
    "MIGRATION_FINAL_STATUSES",
    "MigrationError",
    "MigrationState",
    "MigrationStatus",
    "Network",
    "Nic",
    "NicMode",
    "NodeInfo",
    "ParameterError",
    "ParameterValueError",
    "ParseError",
    "StageTiming",
    "StopResult",
    "StopStage",
    "configure_nic",
    "generate_tap_name",
    "get_hypervisor",
    "get_hypervisor_class",
    "get_linux_node_info",
    "hypervisor_names",
    "progress_sink",
    "report_progress",
]
