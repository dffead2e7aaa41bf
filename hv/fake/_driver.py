"""``FakeHypervisor``: a simulated node whose migration really moves bytes.

Not Ganeti's fake (whose migration only logs and always succeeds). State is
durable in a per-node directory (an agent restart keeps it), guests answer
ACPI after a configurable delay or never, migrations stream the instance's
simulated memory over a real byte stream at a configurable bandwidth while a
configurable dirty rate re-dirties pages, and any method can be made to fail,
stall or hang. Every call is journaled in ``<state_dir>/events.jsonl``:

``{"event": "start"|"end"|"error"|"cancelled", "method", "instance", ...}``
for calls; ``stream-start``/``stream-end`` (``role`` source/target, ``status``,
``error``) for migration streams; ``stop-stage`` for each stop stage tried;
``recovered`` for a migration found orphaned by a restart; ``powercycle``.

The parts: :mod:`._core` (directory, config, journal, tasks, records),
:mod:`._migration` (both ends of a stream), :mod:`._live` (a running
migration's in-process record), :mod:`._journal` (the call journal).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio

from .. import params as _p
from .._objects import (
    ConsoleInfo,
    Disk,
    HvInstanceState,
    Instance,
    InstanceInfo,
    MigrationState,
    NodeInfo,
    StageTiming,
    StopResult,
    StopStage,
)
from .._progress import report_progress
from ..errors import HypervisorError, InstanceNotFound, ParameterError
from ._journal import journaled
from ._live import ACTIVE
from ._migration import FakeMigration
from ._state import InstanceRecord, check_instance_name


class FakeHypervisor(FakeMigration):
    """The ``fake`` hypervisor: a simulated node in a directory of its own.

    Use ``async with FakeHypervisor(dir) as node:`` or call :meth:`aclose`
    when done: migration listeners and streams run as background tasks owned
    by the driver object.
    """

    NAME: ClassVar[str] = "fake"
    CAN_MIGRATE: ClassVar[bool] = True
    PARAMETERS: ClassVar[dict[str, _p.Check]] = {
        "migration_mode": _p.MIGRATION_MODE_CHECK,
        "migration_downtime": _p.int_range_check(True, 1),
    }
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "migration_mode": _p.MIGRATION_MODE_LIVE,
        "migration_downtime": 300,
    }

    # --- lifecycle ----------------------------------------------------------------

    @journaled
    async def start_instance(
        self, instance: Instance, block_devices: Sequence[Disk] | None = None, startup_paused: bool = False
    ) -> None:
        """Create the instance: RUNNING (or PAUSED with ``startup_paused``)."""
        name = check_instance_name(instance.name, node=self.node)
        self._hvparams(instance.hvparams)
        be = instance.beparams
        if be.minmem <= 0 or be.maxmem < be.minmem or be.vcpus <= 0:
            raise self._err(ParameterError, f"instance {name}: bad beparams {be} (want 0 < minmem <= maxmem, vcpus > 0)")
        async with self._lock(name):
            if self.state.read(name) is not None:
                raise self._err(HypervisorError, f"instance {name} already exists on this node")
            free = self._free_memory()
            if free < be.minmem:
                raise self._err(HypervisorError, f"not enough memory to start instance {name}: needs {be.minmem} MiB, node has {free} MiB free")
            memory = max(be.minmem, min(be.maxmem, free))
            rec = InstanceRecord(
                spec=instance,
                state=HvInstanceState.PAUSED if startup_paused else HvInstanceState.RUNNING,
                id=self.rng.randrange(1, 1 << 31),
                memory=memory,
                vcpus=be.vcpus,
                started_at=self.clock(),
            )
            self.state.write(rec)

    @journaled
    async def instance_startup_memory(self, instance: Instance) -> int:
        """max(minmem, min(maxmem, free memory)), in MiB."""
        return max(instance.beparams.minmem, min(instance.beparams.maxmem, self._free_memory()))

    @journaled
    async def stop_instance(
        self,
        instance: Instance | None,
        force: bool = False,
        retry: bool = False,
        name: str | None = None,
        timeout: float | None = None,
    ) -> StopResult:
        """Soft (ACPI, honoured after ``soft_stop_delay``) → after ``timeout`` s, hard (MONITOR).

        ``force``: hard at once. An instance that is not here is
        ``ALREADY_STOPPED`` with ``retry``, else :class:`InstanceNotFound`.
        A paused guest never honours ACPI. A migration in progress is aborted first.
        """
        name = check_instance_name(self._stop_name(instance, name), node=self.node)
        if timeout is not None and (not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0 or math.isnan(timeout)):
            raise self._err(ParameterError, f"stop timeout must be a number >= 0, not {timeout!r}")
        wait = 120.0 if timeout is None else float(timeout)
        async with self._lock(name):
            rec = self.state.read(name)
            if rec is None:
                if retry:
                    return StopResult(name=name, stage=StopStage.ALREADY_STOPPED)
                raise self._err(InstanceNotFound, f"instance {name} is not running on this node")
            await self._abort_migration(name, "the instance was stopped")
            rec = self._record(name)
            stages: list[StageTiming] = []
            settings = self._settings
            if not force:
                began = anyio.current_time()
                report_progress(instance=name, stage=StopStage.SOFT.value, timeout=wait)
                delay = settings.soft_stop_delay
                honours = rec.state is HvInstanceState.RUNNING and delay is not None and delay <= wait
                await anyio.sleep(delay if honours and delay is not None else wait)
                took = round(anyio.current_time() - began, 4)
                stages.append(StageTiming(stage=StopStage.SOFT, seconds=took, ended_it=honours))
                self._event("stop-stage", instance=name, stage=StopStage.SOFT.value, seconds=took, ended_it=honours)
                if honours:
                    self.state.remove(name)
                    self._migrations.pop(name, None)
                    return StopResult(name=name, stage=StopStage.SOFT, stages=tuple(stages))
            began = anyio.current_time()
            report_progress(instance=name, stage=StopStage.MONITOR.value)
            await anyio.sleep(settings.hard_stop_delay)
            took = round(anyio.current_time() - began, 4)
            stages.append(StageTiming(stage=StopStage.MONITOR, seconds=took, ended_it=True))
            self._event("stop-stage", instance=name, stage=StopStage.MONITOR.value, seconds=took, ended_it=True)
            self.state.remove(name)
            self._migrations.pop(name, None)
            return StopResult(name=name, stage=StopStage.MONITOR, stages=tuple(stages))

    @journaled
    async def cleanup_instance(self, instance_name: str) -> None:
        """Remove what a crash left behind for a stopped instance (temp files)."""
        name = check_instance_name(instance_name, node=self.node)
        self.state.remove_leftovers(name)
        rec = self.state.read(name)
        if rec is not None and rec.state is HvInstanceState.SHUTDOWN:
            self.state.remove(name)

    @journaled
    async def reboot_instance(self, instance: Instance) -> None:
        """Reset the guest: uptime restarts, ``boots`` counts up."""
        name = check_instance_name(instance.name, node=self.node)
        async with self._lock(name):
            rec = self._record(name)
            if rec.state not in (HvInstanceState.RUNNING, HvInstanceState.PAUSED):
                raise self._err(HypervisorError, f"instance {name} cannot be rebooted while {rec.state.value}")
            if rec.migration is not None and rec.migration.status in ACTIVE:
                raise self._err(HypervisorError, f"instance {name} cannot be rebooted during a migration")
            await anyio.sleep(self._settings.reboot_delay)
            self._update(name, started_at=self.clock(), boots=rec.boots + 1)

    # --- inventory ----------------------------------------------------------------

    @journaled
    async def list_instances(self, hvparams: Mapping[str, Any] | None = None) -> list[str]:
        """Every instance present: running, paused or incoming."""
        return self.state.names()

    @journaled
    async def get_instance_info(self, instance_name: str, hvparams: Mapping[str, Any] | None = None) -> InstanceInfo | None:
        check_instance_name(instance_name, node=self.node)
        return self._info(instance_name)

    def _info(self, name: str) -> InstanceInfo | None:
        rec = self.state.read(name)
        if rec is None:
            return None
        runstate = rec.state.value
        mig = rec.migration
        if rec.state is HvInstanceState.INCOMING:
            runstate = "inmigrate"
        elif mig is not None and mig.role == "source" and rec.state is HvInstanceState.PAUSED:
            if mig.status == MigrationState.COMPLETED.value:
                runstate = "postmigrate"
            elif mig.status in ACTIVE:
                runstate = "finish-migrate" if not mig.live or self._migration_forced(name) else "paused"
        return InstanceInfo(
            name=name,
            id=rec.id,
            memory=rec.memory,
            vcpus=rec.vcpus,
            state=rec.state,
            times=round(max(0.0, self.clock() - rec.started_at), 3),
            runstate=runstate,
        )

    def _migration_forced(self, name: str) -> bool:
        mig = self._migrations.get(name)
        return mig is not None and mig.force

    @journaled
    async def get_all_instances_info(self, hvparams: Mapping[str, Any] | None = None) -> list[InstanceInfo]:
        return [info for name in self.state.names() if (info := self._info(name)) is not None]

    @journaled
    async def get_node_info(self, hvparams: Mapping[str, Any] | None = None) -> NodeInfo:
        """Configured memory and CPUs; free = total − memory of the instances present."""
        total = self._settings_memory()
        cpus = self._settings.cpu_total or self.cpu_total
        return NodeInfo(
            memory_total=total,
            memory_free=max(0, total - self._used_memory()),
            memory_dom0=0,
            cpu_total=cpus,
            cpu_dom0=cpus,
            cpu_nodes=1,
            cpu_sockets=1,
            hv_name=self.NAME,
            hv_version=self._settings.hv_version,
        )

    @journaled
    async def get_instance_console(
        self,
        instance: Instance,
        primary_node: str | None = None,
        node_group: str | None = None,
        hvparams: Mapping[str, Any] | None = None,
        beparams: Mapping[str, Any] | None = None,
    ) -> ConsoleInfo:
        name = check_instance_name(instance.name, node=self.node)
        self._record(name)
        return ConsoleInfo(
            instance=name, kind="message", node=primary_node or self.node, message=f"fake instance {name} has no console"
        )

    @journaled
    async def verify(self, hvparams: Mapping[str, Any] | None = None) -> str | None:
        """The state directory is writable and config.json is valid."""
        problems: list[str] = []
        probe = self.state.root / f".verify.{os.getpid()}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as err:
            problems.append(f"state directory {self.state.root} is not writable: {err}")
        try:
            self._config.read()
        except HypervisorError as err:
            problems.append(err.message)
        if hvparams:
            try:
                self._hvparams(hvparams)
            except ParameterError as err:
                problems.append(err.message)
        return self.format_verify_results(problems)

    @journaled
    async def validate_parameters(self, hvparams: Mapping[str, Any]) -> None:
        await super().validate_parameters(hvparams)

    @journaled
    async def balloon_instance_memory(self, instance: Instance, mem: int) -> None:
        """Set the instance's memory (MiB) within [minmem, maxmem] and the node's free memory."""
        name = check_instance_name(instance.name, node=self.node)
        async with self._lock(name):
            rec = self._record(name)
            be = rec.spec.beparams
            if isinstance(mem, bool) or not isinstance(mem, int) or not be.minmem <= mem <= be.maxmem:
                raise self._err(ParameterError, f"instance {name}: balloon target {mem!r} MiB is outside [{be.minmem}, {be.maxmem}]")
            if rec.migration is not None and rec.migration.status in ACTIVE:
                raise self._err(HypervisorError, f"instance {name}: cannot balloon during a migration")
            grow = mem - rec.memory
            if grow > self._free_memory():
                raise self._err(HypervisorError, f"instance {name}: cannot grow by {grow} MiB, node has {self._free_memory()} MiB free")
            self._update(name, memory=mem)

    @journaled
    async def powercycle_node(self, hvparams: Mapping[str, Any] | None = None) -> None:
        """Simulated power cycle: every instance and migration on the node is gone."""
        for mig in list(self._migrations.values()):
            mig.cancel_reason = "the node was power-cycled"
            mig.scope.cancel()
        with anyio.CancelScope(shield=True):
            for mig in list(self._migrations.values()):
                await mig.done.wait()
        self._migrations.clear()
        names = self.state.names()
        for name in names:
            self.state.remove(name)
        self._event("powercycle", instances=names)

    # Hotplug is not supported; the calls are still journaled and honour faults.

    @journaled
    async def hot_add_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        await super().hot_add_device(instance, dev_type, device, extra, seq)

    @journaled
    async def hot_del_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        await super().hot_del_device(instance, dev_type, device, extra, seq)

    @journaled
    async def hot_mod_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        await super().hot_mod_device(instance, dev_type, device, extra, seq)

    @journaled
    async def verify_hotplug_support(self, instance: Instance, action: str, dev_type: str) -> None:
        await super().verify_hotplug_support(instance, action, dev_type)

    @journaled
    async def hotplug_supported(self, instance: Instance) -> None:
        await super().hotplug_supported(instance)
