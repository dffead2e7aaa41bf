"""The async hypervisor interface (Ganeti's ``hv_base``, rebuilt).

A driver subclasses :class:`BaseHypervisor`. Methods that do I/O are
coroutines; each owns its timeouts (a timeout raises
:class:`~hv.errors.HypervisorTimeout`, never hangs). Pure class-level checks
(`check_parameter_syntax`, `versions_safe_for_migration`,
`get_ancillary_files`) are synchronous and touch nothing outside the process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio

from . import params as _params
from ._objects import (
    ConsoleInfo,
    Disk,
    Instance,
    InstanceInfo,
    MigrationStatus,
    Nic,
    NicMode,
    NodeInfo,
    StopResult,
)
from .errors import HotplugError, HypervisorError, HypervisorTimeout, MigrationError

#: The methods a node agent may serve: every node-side method of the interface.
REMOTE_METHODS: tuple[str, ...] = (
    "start_instance",
    "stop_instance",
    "cleanup_instance",
    "reboot_instance",
    "list_instances",
    "get_instance_info",
    "get_all_instances_info",
    "get_node_info",
    "get_instance_console",
    "verify",
    "migration_info",
    "accept_instance",
    "migrate_instance",
    "get_migration_status",
    "finalize_migration_dst",
    "finalize_migration_source",
    "set_migration_downtime",
    "force_complete_migration",
    "cancel_migration",
    "balloon_instance_memory",
    "instance_startup_memory",
    "validate_parameters",
    "powercycle_node",
    "hot_add_device",
    "hot_del_device",
    "hot_mod_device",
    "verify_hotplug_support",
    "hotplug_supported",
)

TAP_PREFIX = "gnt.com."

_HOST_PORT = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$"
_TARGET_TCP = re.compile(r"^tcp:" + _HOST_PORT)
_TARGET_ANY = re.compile(r"^(?:tcp:)?" + _HOST_PORT)


#: What an instance name may be on a node: safe as a file name (no separators, no dot-files), ≤ 63 chars.
_INSTANCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def is_instance_name(name: Any) -> bool:
    """Whether ``name`` is a valid instance name (see :func:`check_instance_name`)."""
    return isinstance(name, str) and _INSTANCE_NAME.match(name) is not None


def check_instance_name(name: Any, *, node: str | None = None) -> str:
    """``name`` when it is safe as a file name: no separators, no dot-files, ≤ 63 chars."""
    if not is_instance_name(name):
        raise HypervisorError(
            f"invalid instance name {name!r}: 1-63 characters of letters, digits, '.', '_', '-', starting alphanumeric",
            node=node,
        )
    return name


def tcp_address(host: str, port: int) -> str:
    """``"tcp:HOST:PORT"`` with an IPv6 host in brackets."""
    return f"tcp:{bracket_host(host)}:{port}"


def bracket_host(host: str) -> str:
    """``host`` as it stands before ``:PORT`` (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class BaseHypervisor:
    """Abstract virtualisation interface.

    ``PARAMETERS`` maps each hvparam to a 5-tuple check (see
    :mod:`hv.params`); ``DEFAULTS`` gives every parameter's default value.
    """

    NAME: ClassVar[str] = "base"
    PARAMETERS: ClassVar[dict[str, _params.Check]] = {}
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    ANCILLARY_FILES: ClassVar[list[str]] = []
    ANCILLARY_FILES_OPT: ClassVar[list[str]] = []
    CAN_MIGRATE: ClassVar[bool] = False

    def __init__(self, *, node: str | None = None) -> None:
        self.node = node
        self._locks: dict[str, anyio.Lock] = {}

    # --- lifecycle ----------------------------------------------------------

    async def start_instance(
        self, instance: Instance, block_devices: Sequence[Disk] | None = None, startup_paused: bool = False
    ) -> None:
        """Start ``instance`` (``block_devices`` None: the instance's disks)."""
        raise NotImplementedError

    async def stop_instance(
        self,
        instance: Instance | None,
        force: bool = False,
        retry: bool = False,
        name: str | None = None,
        timeout: float | None = None,
    ) -> StopResult:
        """Stop an instance: soft, then hard after ``timeout``; ``force``: hard now.

        With ``name`` set the instance object is not used (it may be lost);
        with ``retry`` an instance that is already gone is success.
        """
        raise NotImplementedError

    async def cleanup_instance(self, instance_name: str) -> None:
        """Remove what a stopped instance left behind (optional)."""
        return None

    async def reboot_instance(self, instance: Instance) -> None:
        raise NotImplementedError

    # --- inventory ----------------------------------------------------------

    async def list_instances(self, hvparams: Mapping[str, Any] | None = None) -> list[str]:
        raise NotImplementedError

    async def get_instance_info(
        self, instance_name: str, hvparams: Mapping[str, Any] | None = None
    ) -> InstanceInfo | None:
        """The instance's info, or None when it does not exist here."""
        raise NotImplementedError

    async def get_all_instances_info(self, hvparams: Mapping[str, Any] | None = None) -> list[InstanceInfo]:
        raise NotImplementedError

    async def get_node_info(self, hvparams: Mapping[str, Any] | None = None) -> NodeInfo:
        raise NotImplementedError

    async def get_instance_console(
        self,
        instance: Instance,
        primary_node: str | None = None,
        node_group: str | None = None,
        hvparams: Mapping[str, Any] | None = None,
        beparams: Mapping[str, Any] | None = None,
    ) -> ConsoleInfo:
        raise NotImplementedError

    @classmethod
    def get_ancillary_files(cls) -> tuple[list[str], list[str]]:
        """(all files, optional files) to copy to every node."""
        if not set(cls.ANCILLARY_FILES).issuperset(cls.ANCILLARY_FILES_OPT):
            raise HypervisorError(
                f"{cls.__name__}: optional ancillary files must be a subset of the ancillary files"
            )
        return list(cls.ANCILLARY_FILES), list(cls.ANCILLARY_FILES_OPT)

    async def verify(self, hvparams: Mapping[str, Any] | None = None) -> str | None:
        """A problem description, or None when all is well."""
        raise NotImplementedError

    @staticmethod
    def versions_safe_for_migration(src: Any, target: Any) -> bool:
        """Whether migrating between these hypervisor versions is likely to work."""
        return src == target

    # --- migration ----------------------------------------------------------

    async def migration_info(self, instance: Instance) -> str:
        """Opaque data the target needs to accept the instance."""
        return ""

    async def accept_instance(self, instance: Instance, info: str, target: str) -> str:
        """Prepare to receive ``instance``; return the address to migrate to.

        ``target`` is this node's address as the source sees it.
        """
        return target

    async def migrate_instance(self, instance: Instance, target: str, live: bool) -> None:
        """Start migrating ``instance`` to ``target`` (what accept returned)."""
        raise NotImplementedError

    async def get_migration_status(self, instance: Instance, wait: float = 0.0) -> MigrationStatus:
        """The migration's status; with ``wait`` > 0, return early on a change.

        Waiting lets callers long-poll instead of sleeping between reads.
        """
        raise NotImplementedError

    async def finalize_migration_dst(self, instance: Instance, info: str, success: bool) -> None:
        """Resume the received instance, or revert what accept prepared."""
        return None

    async def finalize_migration_source(self, instance: Instance, success: bool, live: bool) -> None:
        """Remove the migrated source, or make it run again after a failure."""
        return None

    # Convergence controls used by the engine's migration policy.

    async def set_migration_downtime(self, instance: Instance, ms: int) -> None:
        """Change the downtime (ms) a running migration may take to finish."""
        raise MigrationError(f"set_migration_downtime is not supported by the {self.NAME} hypervisor", node=self.node)

    async def force_complete_migration(self, instance: Instance) -> None:
        """Pause the source guest so that a non-converging migration finishes."""
        raise MigrationError(f"force_complete_migration is not supported by the {self.NAME} hypervisor", node=self.node)

    async def cancel_migration(self, instance: Instance) -> None:
        """Abort a running migration; the source keeps (or goes back to) running."""
        raise MigrationError(f"cancel_migration is not supported by the {self.NAME} hypervisor", node=self.node)

    async def balloon_instance_memory(self, instance: Instance, mem: int) -> None:
        raise NotImplementedError

    async def instance_startup_memory(self, instance: Instance) -> int:
        """max(minmem, min(maxmem, the node's free memory)), in MiB."""
        free = (await self.get_node_info(hvparams=instance.hvparams)).memory_free
        return max(instance.beparams.minmem, min(instance.beparams.maxmem, free))

    # --- parameters ---------------------------------------------------------

    @classmethod
    def fill_hvparams(cls, hvparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``hvparams`` over the driver's defaults (unknown keys kept, to be refused)."""
        filled = dict(cls.DEFAULTS)
        filled.update(hvparams or {})
        return filled

    @classmethod
    def check_parameter_syntax(cls, hvparams: Mapping[str, Any]) -> None:
        """Master-side checks; raise :class:`~hv.errors.ParameterError`."""
        _params.check_syntax(cls.PARAMETERS, hvparams, hypervisor=cls.NAME)

    async def validate_parameters(self, hvparams: Mapping[str, Any]) -> None:
        """Node-side checks (files exist, …); raise ParameterError."""
        _params.check_validity(self.PARAMETERS, hvparams, hypervisor=self.NAME)

    # --- node ---------------------------------------------------------------

    async def powercycle_node(self, hvparams: Mapping[str, Any] | None = None) -> None:
        raise NotImplementedError

    @staticmethod
    def get_linux_node_info(
        meminfo: str = "/proc/meminfo",
        cpuinfo: str = "/proc/cpuinfo",
        sys_node_dir: str = "/sys/devices/system/node",
    ) -> NodeInfo:
        """The node's memory (MiB) and CPUs as Linux sees them."""
        return get_linux_node_info(meminfo=meminfo, cpuinfo=cpuinfo, sys_node_dir=sys_node_dir)

    @classmethod
    def linux_powercycle(cls) -> None:
        """Hard-reboot this Linux machine via sysrq (does not return on success)."""
        try:
            fd = os.open("/proc/sysrq-trigger", os.O_WRONLY)
            try:
                os.write(fd, b"b")
            finally:
                os.close(fd)
        except OSError as err:
            raise HypervisorError(f"cannot powercycle through /proc/sysrq-trigger: {err}") from err

    # --- hotplug (unsupported by default) -----------------------------------

    async def hot_add_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        raise HotplugError(f"Hotplug is not supported by the {self.NAME} hypervisor", node=self.node)

    async def hot_del_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        raise HotplugError(f"Hotplug is not supported by the {self.NAME} hypervisor", node=self.node)

    async def hot_mod_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        raise HotplugError(f"Hotplug is not supported by the {self.NAME} hypervisor", node=self.node)

    async def verify_hotplug_support(self, instance: Instance, action: str, dev_type: str) -> None:
        raise HotplugError(f"Hotplug is not supported by the {self.NAME} hypervisor", node=self.node)

    async def hotplug_supported(self, instance: Instance) -> None:
        raise HotplugError(f"Hotplug is not supported by the {self.NAME} hypervisor", node=self.node)

    # --- helpers ------------------------------------------------------------

    @staticmethod
    def format_verify_results(msgs: Sequence[str]) -> str | None:
        return "; ".join(msgs) if msgs else None

    async def aclose(self) -> None:
        """Release what the driver holds (monitor connections, listeners)."""
        return None

    # --- shared by the drivers ------------------------------------------------
    # Small steps both drivers take the same way, written once here.

    def _err(self, cls: type[HypervisorError], msg: str) -> HypervisorError:
        """``cls(msg)`` naming this driver's node."""
        return cls(msg, node=self.node)

    def _lock(self, name: str) -> anyio.Lock:
        """The lock serialising state changes of instance ``name`` in this driver."""
        return self._locks.setdefault(name, anyio.Lock())

    def _stop_name(self, instance: Instance | None, name: str | None) -> str:
        """The instance ``stop_instance`` is about: ``name``, else the instance's name."""
        if name is None:
            if instance is None:
                raise self._err(HypervisorError, "stop_instance needs an instance or a name")
            name = instance.name
        return name

    def _incoming_host(self, name: str, target: str, listen_host: str) -> str:
        """The host ``accept_instance`` answers with: ``target``, else ``listen_host``; never a wildcard."""
        host = target or listen_host
        if host in ("0.0.0.0", "::"):
            raise self._err(MigrationError, f"instance {name}: accept_instance needs this node's address, not {host}")
        return host

    def _migration_target(self, name: str, target: str, *, scheme_optional: bool = False) -> tuple[str, int]:
        """``(host, port)`` of ``"tcp:HOST:PORT"`` (``[v6]`` hosts unbracketed); a MigrationError otherwise."""
        m = (_TARGET_ANY if scheme_optional else _TARGET_TCP).match(target if isinstance(target, str) else "")
        if m is None or not 0 < int(m.group(2)) <= 65535:
            raise self._err(MigrationError, f"instance {name}: bad migration target {_params.shorten(target)} (want tcp:HOST:PORT)")
        return m.group(1).strip("[]"), int(m.group(2))


# --- Linux node info ---------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError as err:
        raise HypervisorError(f"cannot read node info from {path}: {err}") from err


def get_linux_node_info(
    meminfo: str = "/proc/meminfo",
    cpuinfo: str = "/proc/cpuinfo",
    sys_node_dir: str = "/sys/devices/system/node",
) -> NodeInfo:
    """Parse ``meminfo`` and ``cpuinfo`` (paths injectable for tests)."""
    fields: dict[str, int] = {}
    for lineno, line in enumerate(_read(meminfo).splitlines(), 1):
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            raise HypervisorError(f"malformed line {lineno} in {meminfo}: {line!r}")
        try:
            fields[key.strip()] = int(parts[0])
        except ValueError as err:
            raise HypervisorError(f"malformed value on line {lineno} in {meminfo}: {line!r}") from err
    for needed in ("MemTotal",):
        if needed not in fields:
            raise HypervisorError(f"{meminfo} has no {needed} line")
    if "MemAvailable" in fields:
        free_kib = fields["MemAvailable"]
    else:
        free_kib = fields.get("MemFree", 0) + fields.get("Buffers", 0) + fields.get("Cached", 0)

    text = _read(cpuinfo)
    cpu_total = len(re.findall(r"(?m)^processor\s*:\s*[0-9]+\s*$", text))
    if cpu_total == 0:
        raise HypervisorError(f"{cpuinfo} lists no 'processor : N' lines")
    sockets = set(re.findall(r"(?m)^physical id\s*:\s*([0-9]+)\s*$", text))
    try:
        numa = [n for n in os.listdir(sys_node_dir) if re.fullmatch(r"node[0-9]+", n)]
    except OSError:
        numa = []
    return NodeInfo(
        memory_total=fields["MemTotal"] // 1024,
        memory_free=free_kib // 1024,
        memory_dom0=fields.get("Active", 0) // 1024,
        cpu_total=cpu_total,
        cpu_dom0=cpu_total,
        cpu_nodes=max(1, len(numa)),
        cpu_sockets=max(1, len(sockets)),
    )


# --- NICs --------------------------------------------------------------------


def next_tap_name(ip_link_output: str) -> str:
    """The first free ``gnt.com.N`` name given ``ip link show`` output."""
    indexes: set[int] = set()
    for line in ip_link_output.splitlines():
        if not line or line[0].isspace():
            continue
        parts = line.split(": ")
        if len(parts) < 2:
            raise HypervisorError(f"cannot parse interface line from 'ip link show': {line!r}")
        match = re.match(r"gnt\.com\.([0-9]+)(@\S+)?$", parts[1])
        if match:
            indexes.add(int(match.group(1)))
    return f"{TAP_PREFIX}{max(indexes) + 1 if indexes else 0}"


async def generate_tap_name(ip_command: Sequence[str] = ("ip", "link", "show")) -> str:
    """A TAP interface name for instance communication unique on this node."""
    try:
        result = await anyio.run_process(list(ip_command), check=False)
    except OSError as err:
        raise HypervisorError(f"Failed to list TUN/TAP interfaces: {err}") from err
    if result.returncode != 0:
        raise HypervisorError(
            f"Failed to list TUN/TAP interfaces: {' '.join(ip_command)} exited {result.returncode}: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return next_tap_name(result.stdout.decode(errors="replace"))


def nic_environment(instance: Instance, seq: int, nic: Nic, tap: str) -> dict[str, str]:
    """The environment a NIC configuration script receives."""
    env = {
        "PATH": f"{os.environ.get('PATH', '/usr/bin:/bin')}:/sbin:/usr/sbin",
        "INSTANCE": instance.name,
        "MAC": nic.mac,
        "MODE": NicMode(nic.mode).value,
        "INTERFACE": tap,
        "INTERFACE_INDEX": str(seq),
        "INTERFACE_UUID": nic.uuid,
        "TAGS": " ".join(instance.tags),
    }
    if nic.ip:
        env["IP"] = nic.ip
    if nic.name:
        env["INTERFACE_NAME"] = nic.name
    if nic.link:
        env["LINK"] = nic.link
    if nic.vlan:
        env["VLAN"] = nic.vlan
    if nic.network is not None:
        env.update(nic.network.hooks_env())
    if NicMode(nic.mode) is NicMode.BRIDGED and nic.link:
        env["BRIDGE"] = nic.link
    return env


async def configure_nic(
    cmd: str | Sequence[str], instance: Instance, seq: int, nic: Nic, tap: str, *, timeout: float = 30.0
) -> None:
    """Run the NIC configuration script (an argument list, never a shell)."""
    argv = [cmd] if isinstance(cmd, str) else list(cmd)
    env = nic_environment(instance, seq, nic, tap)
    try:
        with anyio.fail_after(timeout):
            result = await anyio.run_process(argv, env=env, check=False)
    except TimeoutError as err:
        raise HypervisorTimeout(f"Failed to configure interface {tap}: {argv[0]} did not finish in {timeout}s") from err
    except OSError as err:
        raise HypervisorError(f"Failed to configure interface {tap}: cannot run {argv[0]}: {err}") from err
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace").strip()
        raise HypervisorError(
            f"Failed to configure interface {tap}: {argv[0]} exited {result.returncode}; "
            f"network configuration script output: {output}"
        )
