"""The QEMU driver's hvparams: checks and defaults."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from typing import Any

from .. import params as p

ACCELS = ("auto", "kvm", "tcg")
MIGRATION_CAPS = ("auto-converge", "postcopy-ram", "xbzrle")
DISK_CACHES = ("default", "none", "writeback", "writethrough", "directsync", "unsafe")
DISK_FORMATS = ("raw", "qcow2")
NIC_TYPES = ("virtio-net-pci", "e1000", "e1000e", "rtl8139")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _binary_ok(value: Any) -> bool:
    return isinstance(value, str) and (p.is_norm_abs_path(value) or _NAME.match(value) is not None)


def _binary_found(value: str) -> bool:
    return (os.path.isfile(value) and os.access(value, os.X_OK)) if os.path.isabs(value) else shutil.which(value) is not None


def _ip_ok(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def parse_caps(value: str) -> list[str]:
    """``"auto-converge:xbzrle"`` → ``["auto-converge", "xbzrle"]`` (":" or "," separated)."""
    return [c for c in re.split(r"[:,]", value or "") if c.strip()]


def _caps_ok(value: Any) -> bool:
    return isinstance(value, str) and all(c.strip() in MIGRATION_CAPS for c in parse_caps(value))


def _str_ok(value: Any) -> bool:
    return isinstance(value, str) and "\0" not in value


PARAMETERS: dict[str, p.Check] = {
    "qemu_binary": p.Check(True, _binary_ok, "must be a command name or an absolute normalized path", _binary_found, "not found or not executable"),
    "accel": p.param_in_set(True, ACCELS),
    "machine_type": p.Check(True, lambda x: isinstance(x, str) and _NAME.match(x) is not None, "must be a QEMU machine type name", None, None),
    "cpu_type": p.Check(False, lambda x: isinstance(x, str) and _NAME.match(x) is not None, "must be a QEMU CPU model name", None, None),
    "cpu_mask": p.OPT_MULTI_CPU_MASK_CHECK,
    "kernel_path": p.OPT_FILE_CHECK,
    "initrd_path": p.OPT_FILE_CHECK,
    "kernel_args": p.Check(False, _str_ok, "must be a string", None, None),
    "disk_format": p.param_in_set(True, DISK_FORMATS),
    "disk_cache": p.param_in_set(True, DISK_CACHES),
    "nic_type": p.param_in_set(True, NIC_TYPES),
    "nic_script": p.OPT_FILE_CHECK,
    "serial_console": p.bool_check(True),
    "vnc_bind_address": p.Check(False, _ip_ok, "must be an IP address", None, None),
    "migration_bandwidth": p.int_range_check(True, 0),
    "migration_downtime": p.int_range_check(True, 1),
    "migration_mode": p.MIGRATION_MODE_CHECK,
    "migration_caps": p.Check(False, _caps_ok, "must be a ':'-separated list of " + ", ".join(MIGRATION_CAPS), None, None),
    "acpi": p.bool_check(True),
    "mem_path": p.OPT_FILE_CHECK,
    "hotplug_slots": p.int_range_check(True, 0, 16),
}

DEFAULTS: dict[str, Any] = {
    "qemu_binary": "qemu-system-x86_64",
    "accel": "auto",
    "machine_type": "q35",
    "cpu_type": "",
    "cpu_mask": "all",
    "kernel_path": "",
    "initrd_path": "",
    "kernel_args": "",
    "disk_format": "raw",
    "disk_cache": "default",
    "nic_type": "virtio-net-pci",
    "nic_script": "",
    "serial_console": True,
    "vnc_bind_address": "",
    "migration_bandwidth": 128,
    "migration_downtime": 300,
    "migration_mode": p.MIGRATION_MODE_LIVE,
    "migration_caps": "",
    "acpi": True,
    "mem_path": "",
    "hotplug_slots": 4,
}

assert set(PARAMETERS) == set(DEFAULTS)
