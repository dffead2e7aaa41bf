"""``QemuHypervisor``: real ``qemu-system-x86_64`` processes driven over QMP.

Each instance is a daemonized QEMU (it outlives the agent that started it)
with a pidfile, a QMP socket and a serial console socket in the node's
runtime directory. The driver holds one QMP connection per instance and puts
a timeout on every command. The parts: :mod:`._core` (processes, monitors),
:mod:`._migration`, :mod:`._hotplug`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio
import msgspec

from .. import params as _p
from .._objects import (
    ConsoleInfo,
    Disk,
    HvInstanceState,
    Instance,
    InstanceInfo,
    NodeInfo,
    StopResult,
)
from ..base import check_instance_name, get_linux_node_info
from ..errors import HypervisorError, HypervisorTimeout, InstanceNotFound, ParameterError
from . import _params
from ._core import _MIB, QemuCore
from ._hotplug import QemuHotplug
from ._migration import QemuMigration
from ._monitor import QmpCommandError
from ._runtime import Runtime, process_rss_mib, process_uptime

#: QEMU runstate → what the interface reports.
RUNSTATE_MAP: dict[str, HvInstanceState] = {
    "running": HvInstanceState.RUNNING,
    "paused": HvInstanceState.PAUSED,
    "postmigrate": HvInstanceState.PAUSED,
    "finish-migrate": HvInstanceState.PAUSED,
    "prelaunch": HvInstanceState.PAUSED,
    "suspended": HvInstanceState.PAUSED,
    "save-vm": HvInstanceState.PAUSED,
    "restore-vm": HvInstanceState.PAUSED,
    "debug": HvInstanceState.PAUSED,
    "io-error": HvInstanceState.PAUSED,
    "watchdog": HvInstanceState.PAUSED,
    "colo": HvInstanceState.PAUSED,
    "inmigrate": HvInstanceState.INCOMING,
    "shutdown": HvInstanceState.SHUTDOWN,
    "guest-panicked": HvInstanceState.SHUTDOWN,
    "internal-error": HvInstanceState.SHUTDOWN,
}


class QemuHypervisor(QemuMigration, QemuHotplug, QemuCore):
    """The ``kvm`` hypervisor: QEMU with KVM when usable, TCG otherwise."""

    NAME: ClassVar[str] = "kvm"
    CAN_MIGRATE: ClassVar[bool] = True
    PARAMETERS: ClassVar[dict[str, _p.Check]] = _params.PARAMETERS
    DEFAULTS: ClassVar[dict[str, Any]] = _params.DEFAULTS

    # --- lifecycle ----------------------------------------------------------

    async def start_instance(
        self, instance: Instance, block_devices: Sequence[Disk] | None = None, startup_paused: bool = False
    ) -> None:
        """Start a daemonized QEMU for ``instance`` (paused with ``startup_paused``)."""
        await self.faults.hit("start_instance", node=self.node)
        name = check_instance_name(instance.name)
        hvp = self.fill(instance.hvparams)
        await self.validate_parameters(hvp)
        async with self._lock(name):
            if self._pid(name) is not None:
                raise self._err(HypervisorError, f"instance {name} is already running on this node")
            disks = list(instance.disks if block_devices is None else block_devices)
            rt = Runtime(
                name=name,
                uuid=instance.uuid,
                hvparams=hvp,
                beparams=instance.beparams,
                nics=list(instance.nics),
                disks=disks,
                startup_paused=startup_paused,
            )
            await self._launch(rt, incoming=False, paused=startup_paused)

    async def stop_instance(
        self,
        instance: Instance | None,
        force: bool = False,
        retry: bool = False,
        name: str | None = None,
        timeout: float | None = None,
    ) -> StopResult:
        """ACPI powerdown → wait ``timeout`` → QMP quit → SIGTERM → SIGKILL.

        ``force`` starts at QMP quit. An instance already gone is success.
        """
        await self.faults.hit("stop_instance", node=self.node)
        name = check_instance_name(self._stop_name(instance, name))
        if timeout is not None and timeout < 0:
            raise self._err(ParameterError, f"stop timeout must be >= 0, not {timeout!r}")
        async with self._lock(name):
            return await self._stop(name, force=force, timeout=120.0 if timeout is None else timeout)

    async def cleanup_instance(self, instance_name: str) -> None:
        """Remove a dead QEMU's leftovers; refuse while it still runs."""
        await self.faults.hit("cleanup_instance", node=self.node)
        async with self._lock(instance_name):
            if self._pid(instance_name) is not None:
                raise self._err(HypervisorError, f"instance {instance_name} is still running; stop it first")
            await self._clean(instance_name)

    async def reboot_instance(self, instance: Instance) -> None:
        """Hard reset (``system_reset``), confirmed by QEMU's RESET event."""
        await self.faults.hit("reboot_instance", node=self.node)
        self._live_runtime(instance.name)
        mon = self._monitor(instance.name)
        await mon.connect()
        since = mon.event_count
        await mon.execute("system_reset")
        deadline = anyio.current_time() + self.qmp_timeout
        while mon.last_events.get("RESET") is None or mon.event_count <= since:
            if not await mon.wait_event(mon.event_count, deadline - anyio.current_time()):
                raise self._err(HypervisorTimeout, f"instance {instance.name}: no RESET event within {self.qmp_timeout}s")
        mon.last_events.pop("RESET", None)

    # --- inventory ----------------------------------------------------------

    async def list_instances(self, hvparams: Mapping[str, Any] | None = None) -> list[str]:
        """Names of instances whose QEMU process is alive on this node."""
        await self.faults.hit("list_instances", node=self.node)
        self._reap_daemon_leftovers()
        return [n for n in self.run_dir.names() if self.run_dir.pid(n) is not None]

    async def get_instance_info(
        self, instance_name: str, hvparams: Mapping[str, Any] | None = None
    ) -> InstanceInfo | None:
        await self.faults.hit("get_instance_info", node=self.node)
        return await self._info(instance_name)

    async def _info(self, name: str) -> InstanceInfo | None:
        pid = self._pid(name)
        if pid is None:
            return None
        rt = self.run_dir.read_runtime(name)
        try:
            status = await self._runstate(name)
        except InstanceNotFound:
            return None
        if self._pid(name) is None:
            return None
        memory = rt.beparams.maxmem if rt else 0
        vcpus = rt.beparams.vcpus if rt else 0
        if status != "inmigrate":
            try:
                memory = int((await self._qmp(name, "query-balloon"))["actual"]) // _MIB
            except QmpCommandError:
                pass
            vcpus = len(await self._qmp(name, "query-cpus-fast"))
        return InstanceInfo(
            name=name,
            id=pid,
            memory=memory,
            vcpus=vcpus,
            state=RUNSTATE_MAP.get(status, HvInstanceState.PAUSED),
            times=round(process_uptime(pid), 2),
            runstate=status,
        )

    async def get_all_instances_info(self, hvparams: Mapping[str, Any] | None = None) -> list[InstanceInfo]:
        await self.faults.hit("get_all_instances_info", node=self.node)
        self._reap_daemon_leftovers()
        result = []
        for name in self.run_dir.names():
            info = await self._info(name)
            if info is not None:
                result.append(info)
        return result

    async def get_node_info(self, hvparams: Mapping[str, Any] | None = None) -> NodeInfo:
        """Linux's view of the node, minus the memory instances hold or may still touch."""
        await self.faults.hit("get_node_info", node=self.node)
        base = get_linux_node_info()
        reserved = 0  # guest RAM not yet backed by host pages, but promised
        held = 0
        for name in self.run_dir.names():
            pid = self.run_dir.pid(name)
            rt = self.run_dir.read_runtime(name) if pid else None
            if pid is None or rt is None:
                continue
            rss = process_rss_mib(pid)
            held += rss
            reserved += max(0, rt.beparams.maxmem - rss)
        binary = self.fill(hvparams)["qemu_binary"]
        try:
            version = (await self.qemu_version(binary))[0]
        except HypervisorError:
            version = ""
        return msgspec.structs.replace(
            base,
            memory_free=max(0, base.memory_free - reserved),
            memory_dom0=max(0, base.memory_dom0 - held),
            hv_name=self.NAME,
            hv_version=version,
        )

    async def get_instance_console(
        self,
        instance: Instance,
        primary_node: str | None = None,
        node_group: str | None = None,
        hvparams: Mapping[str, Any] | None = None,
        beparams: Mapping[str, Any] | None = None,
    ) -> ConsoleInfo:
        """VNC when configured, else the serial console's unix socket."""
        await self.faults.hit("get_instance_console", node=self.node)
        _, rt = self._live_runtime(instance.name)
        node = primary_node or self.node
        if rt.hvparams["vnc_bind_address"]:
            vnc = await self._qmp(instance.name, "query-vnc")
            if vnc.get("enabled"):
                return ConsoleInfo(instance=instance.name, kind="vnc", node=node, host=vnc.get("host"), port=int(vnc["service"]))
        if rt.hvparams["serial_console"]:
            return ConsoleInfo(instance=instance.name, kind="unix-socket", node=node, path=str(self.run_dir.console_socket(instance.name)))
        return ConsoleInfo(instance=instance.name, kind="message", node=node, message=f"instance {instance.name} has no console (serial_console off, no VNC)")

    async def verify(self, hvparams: Mapping[str, Any] | None = None) -> str | None:
        """Binary present and its version readable; KVM usable when accel=kvm; run dir writable."""
        await self.faults.hit("verify", node=self.node)
        problems: list[str] = []
        try:
            hvp = self.fill(hvparams)
        except ParameterError as err:
            return str(err)
        try:
            await self.qemu_version(hvp["qemu_binary"])
        except HypervisorError as err:
            problems.append(err.message)
        ok, why = self.kvm_status()
        if hvp["accel"] == "kvm" and not ok:
            problems.append(f"accel=kvm but KVM is not usable: {why}")
        if not os.access(self.run_dir.root, os.W_OK):
            problems.append(f"runtime directory {self.run_dir.root} is not writable")
        return self.format_verify_results(problems)

    async def describe(self, hvparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What ``verify`` looked at: binary, version, KVM usable or not and why, the accel used."""
        hvp = self.fill(hvparams)
        ok, why = self.kvm_status()
        try:
            version: str | None = (await self.qemu_version(hvp["qemu_binary"]))[0]
        except HypervisorError:
            version = None
        accel = hvp["accel"] if hvp["accel"] != "auto" else ("kvm" if ok else "tcg")
        return {"binary": hvp["qemu_binary"], "version": version, "kvm_usable": ok, "kvm_reason": why, "accel": accel}

    # --- memory -------------------------------------------------------------

    async def balloon_instance_memory(self, instance: Instance, mem: int) -> None:
        """Ask the guest's virtio-balloon for ``mem`` MiB."""
        await self.faults.hit("balloon_instance_memory", node=self.node)
        _, rt = self._live_runtime(instance.name)
        if not isinstance(mem, int) or isinstance(mem, bool) or not 1 <= mem <= rt.beparams.maxmem:
            raise self._err(ParameterError, f"instance {instance.name}: balloon target {mem!r} MiB outside 1-{rt.beparams.maxmem}")
        await self._qmp(instance.name, "balloon", {"value": mem * _MIB})

    # --- node ---------------------------------------------------------------

    async def powercycle_node(self, hvparams: Mapping[str, Any] | None = None) -> None:
        await self.faults.hit("powercycle_node", node=self.node)
        self.linux_powercycle()

    async def aclose(self) -> None:
        """Close every QMP connection (the QEMU processes keep running)."""
        with anyio.CancelScope(shield=True):
            for name in list(self._monitors):
                await self._forget_monitor(name)
