"""The ``kvm`` hypervisor driver: real QEMU processes over QMP (see docs/qemu.md)."""

from __future__ import annotations

from ._driver import RUNSTATE_MAP, QemuHypervisor
from ._monitor import QmpCommandError

__all__ = ["RUNSTATE_MAP", "QemuHypervisor", "QmpCommandError"]
