"""Typed objects exchanged with hypervisor drivers.

They are msgspec Structs: cheap to build, validated when decoded, and the
transport sends them over the wire as they are. Memory figures are integer
MiB; migration RAM figures are bytes (QEMU's unit), so progress is exact.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import ParameterError, ParameterValueError


class HvInstanceState(str, enum.Enum):
    """What a driver can say about an instance that exists on its node."""

    RUNNING = "running"
    PAUSED = "paused"  # exists, vCPUs stopped (user pause, non-live or finished migration source)
    INCOMING = "incoming"  # a migration target waiting for / receiving the instance
    SHUTDOWN = "shutdown"  # the guest shut itself down; the process may remain

    @staticmethod
    def is_running(state: HvInstanceState | str) -> bool:
        return HvInstanceState(state) is HvInstanceState.RUNNING

    @staticmethod
    def is_shutdown(state: HvInstanceState | str) -> bool:
        return HvInstanceState(state) is HvInstanceState.SHUTDOWN


class NicMode(str, enum.Enum):
    BRIDGED = "bridged"
    ROUTED = "routed"
    OPENVSWITCH = "openvswitch"
    USER = "user"


class Network(msgspec.Struct, frozen=True, kw_only=True):
    """The network a NIC is attached to; exported to NIC scripts."""

    name: str
    subnet: str | None = None
    gateway: str | None = None
    subnet6: str | None = None
    gateway6: str | None = None
    mac_prefix: str | None = None
    tags: tuple[str, ...] = ()

    def hooks_env(self) -> dict[str, str]:
        """The NETWORK_* variables a NIC configuration script receives."""
        env = {"NETWORK_NAME": self.name}
        for key in ("subnet", "gateway", "subnet6", "gateway6", "mac_prefix"):
            value = getattr(self, key)
            if value:
                env[f"NETWORK_{key.upper()}"] = value
        if self.tags:
            env["NETWORK_TAGS"] = " ".join(self.tags)
        return env


class Nic(msgspec.Struct, frozen=True, kw_only=True):
    mac: str
    ip: str | None = None
    mode: NicMode = NicMode.USER
    link: str | None = None
    vlan: str | None = None
    name: str | None = None
    uuid: str = ""
    network: Network | None = None


class Disk(msgspec.Struct, frozen=True, kw_only=True):
    """A disk image attached to an instance (shared storage for migration)."""

    path: str
    name: str | None = None
    uuid: str = ""
    readonly: bool = False


#: The largest memory figure (MiB) an instance may have: 16 TiB.
MAX_MEMORY_MIB = 16 * 1024 * 1024
#: The most vCPUs an instance may have (Linux's largest NR_CPUS).
MAX_VCPUS = 8192


class BeParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Backend parameters: memory in MiB, vCPU count.

    Checked whenever built or decoded: ``0 < minmem <= maxmem <=``
    :data:`MAX_MEMORY_MIB`, ``1 <= vcpus <=`` :data:`MAX_VCPUS`, integers
    only; an unknown key is refused.
    """

    minmem: int = 128
    maxmem: int = 128
    vcpus: int = 1

    def __post_init__(self) -> None:
        for key, hi in (("minmem", MAX_MEMORY_MIB), ("maxmem", MAX_MEMORY_MIB), ("vcpus", MAX_VCPUS)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ParameterValueError(f"beparams {key!r} must be an integer, not {type(value).__name__}")
            if not 1 <= value <= hi:
                unit = " MiB" if key != "vcpus" else ""
                raise ParameterValueError(f"beparams {key!r} must be 1-{hi}{unit}, not {value}")
        if self.minmem > self.maxmem:
            raise ParameterValueError(f"beparams need minmem <= maxmem: 'minmem' ({self.minmem} MiB) is above 'maxmem' ({self.maxmem} MiB)")

    @classmethod
    def from_mapping(cls, data: Any, *, where: str = "") -> BeParams:
        """Decode ``data`` (a dict); a bad key or value raises ParameterError naming it (and ``where``)."""
        at = f"{where}: " if where else ""
        if not isinstance(data, Mapping):
            raise ParameterError(f"{at}beparams must be a mapping, not {type(data).__name__}")
        unknown = [k for k in data if k not in cls.__struct_fields__]
        if unknown:
            known = ", ".join(cls.__struct_fields__)
            raise ParameterError(f"{at}beparams: unknown key {str(unknown[0])[:80]!r} (known: {known})")
        try:
            return msgspec.convert(dict(data), cls)
        except msgspec.ValidationError as err:
            raise ParameterError(f"{at}{err}" if "beparams" in str(err) else f"{at}beparams: {err}") from err


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    uuid: str = ""
    hypervisor: str = "fake"
    hvparams: dict[str, Any] = msgspec.field(default_factory=dict)
    beparams: BeParams = msgspec.field(default_factory=BeParams)
    nics: tuple[Nic, ...] = ()
    disks: tuple[Disk, ...] = ()
    tags: tuple[str, ...] = ()


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The seed's (name, id, memory, vcpus, state, times) tuple, typed.

    ``times`` is the instance's uptime in seconds; ``runstate`` carries the
    hypervisor's own finer state (QEMU's ``postmigrate``, ``inmigrate``…).
    """

    name: str
    id: int
    memory: int
    vcpus: int
    state: HvInstanceState
    times: float = 0.0
    runstate: str | None = None


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    memory_total: int
    memory_free: int
    memory_dom0: int
    cpu_total: int
    cpu_dom0: int
    cpu_nodes: int
    cpu_sockets: int
    hv_name: str = ""
    hv_version: str = ""


class ConsoleInfo(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach an instance's console."""

    instance: str
    kind: str  # "unix-socket" | "vnc" | "message"
    node: str | None = None
    path: str | None = None
    host: str | None = None
    port: int | None = None
    message: str | None = None


class MigrationState(str, enum.Enum):
    """Migration status values; drivers may report others (carried as str)."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


MIGRATION_FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
MIGRATION_FAILED_STATUSES = frozenset({"failed", "cancelled"})


class MigrationStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One reading of a migration's progress (RAM in bytes, times in ms)."""

    status: str
    ram_transferred: int = 0
    ram_remaining: int = 0
    ram_total: int = 0
    rate_bps: float | None = None  # transfer rate, bytes per second
    dirty_rate_bps: float | None = None  # guest dirtying rate, bytes per second
    downtime_ms: int | None = None  # actual downtime, once completed
    expected_downtime_ms: int | None = None
    setup_time_ms: int | None = None
    total_time_ms: int | None = None
    iterations: int | None = None  # memory passes (QEMU's dirty-sync-count)
    error: str | None = None

    @property
    def is_final(self) -> bool:
        return self.status in MIGRATION_FINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == MigrationState.COMPLETED.value

    @property
    def failed(self) -> bool:
        return self.status in MIGRATION_FAILED_STATUSES

    @property
    def progress(self) -> float:
        """Fraction of RAM sent compared with what is left, in [0, 1]."""
        if self.status == MigrationState.COMPLETED.value:
            return 1.0
        if self.ram_total <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.ram_remaining / self.ram_total))


class StopStage(str, enum.Enum):
    """Which stage of the soft→hard stop escalation ended an instance."""

    ALREADY_STOPPED = "already-stopped"
    SOFT = "soft"  # ACPI powerdown honoured by the guest
    MONITOR = "monitor"  # the hypervisor's monitor was told to quit
    SIGTERM = "sigterm"
    SIGKILL = "sigkill"

    @property
    def hard(self) -> bool:
        return self in (StopStage.MONITOR, StopStage.SIGTERM, StopStage.SIGKILL)


class StageTiming(msgspec.Struct, frozen=True, kw_only=True):
    stage: StopStage
    seconds: float
    ended_it: bool


class StopResult(msgspec.Struct, frozen=True, kw_only=True):
    """What ``stop_instance`` did: the stage that ended it and each try's time."""

    name: str
    stage: StopStage
    stages: tuple[StageTiming, ...] = ()

    @property
    def hard(self) -> bool:
        return self.stage.hard
