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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import anyio
import msgspec
from anyio.abc import ByteStream, TaskGroup

from .. import params as _p
from .._faults import Fault, Faults
from .._objects import (
    ConsoleInfo,
    Disk,
    HvInstanceState,
    Instance,
    InstanceInfo,
    MigrationState,
    MigrationStatus,
    NodeInfo,
    StageTiming,
    StopResult,
    StopStage,
)
from .._progress import progress_sink, report_progress
from ..base import BaseHypervisor
from ..errors import (
    HypervisorError,
    InstanceNotFound,
    MigrationError,
    ParameterError,
)
from ._config import ConfigFile, Settings
from ._state import InstanceRecord, MigrationRecord, StateDir, check_instance_name, read_events
from ._stream import ACK, DATA, END, HEADER, FrameReader, ProtocolError, StreamFactory, TcpStreamFactory, send_frame, send_json

MIB = 1024 * 1024
#: A waiting ``get_migration_status`` is woken at least this often while bytes flow.
PROGRESS_INTERVAL = 0.05
#: How often a running stream re-reads config.json (bandwidth, dirty rate).
CONFIG_INTERVAL = 0.1
#: Most a stream may fall behind its pace before it stops trying to catch up (s).
MAX_BURST = 0.1
_TARGET = re.compile(r"^(?:tcp:)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_ACTIVE = frozenset({MigrationState.SETUP.value, MigrationState.ACTIVE.value, MigrationState.DEVICE.value})

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _describe(err: BaseException) -> str:
    """A broken stream's cause in words (anyio's stream errors carry no message)."""
    if isinstance(err, HypervisorError):
        return err.message
    if isinstance(err, (anyio.EndOfStream, anyio.IncompleteRead)):
        return "the peer closed the connection"
    if isinstance(err, (anyio.BrokenResourceError, anyio.ClosedResourceError)):
        cause = err.__cause__ or err.__context__
        return "the connection broke" + (f" ({cause})" if cause else "")
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class StreamStalled(MigrationError):
    """A migration stream made no progress for ``stall_timeout`` seconds."""


@contextlib.contextmanager
def _stall_guard(seconds: float | None, what: str) -> Any:
    """Fail a blocked send/receive after ``seconds`` (None: wait forever, like QEMU)."""
    if seconds is None:
        yield
        return
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError:
        raise StreamStalled(f"migration stream stalled: {what} made no progress for {seconds:g}s") from None


def _instance_of(sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The instance a call is about, for the journal."""
    try:
        bound = sig.bind_partial(None, *args, **kwargs).arguments
    except TypeError:
        return None
    for key in ("name", "instance", "instance_name"):
        value = bound.get(key)
        if value is not None:
            return value.name if isinstance(value, Instance) else str(value)
    return None


def _journaled(fn: F) -> F:
    """Journal the call (start/end/error/cancelled) and apply faults first."""
    method = fn.__name__
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    async def wrapper(self: FakeHypervisor, *args: Any, **kwargs: Any) -> Any:
        instance = _instance_of(sig, args, kwargs)
        self._event("start", method=method, instance=instance)
        try:
            try:
                self._settings = self._config.read()
            except HypervisorError:
                if method != "verify":  # verify reports a broken config instead of failing
                    raise
            await self.faults.hit(method, node=self.node)
            await self._file_fault(method)
            result = await fn(self, *args, **kwargs)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                self._event("cancelled", method=method, instance=instance)
            raise
        except BaseException as err:
            self._event("error", method=method, instance=instance, error=type(err).__name__, message=str(err))
            raise
        self._event("end", method=method, instance=instance)
        return result

    return wrapper  # type: ignore[return-value]


@dataclass
class _Migration:
    """The live, in-process side of one migration (source or target)."""

    name: str
    role: str
    status: str = MigrationState.SETUP.value
    ram_total: int = 0
    transferred: int = 0
    to_send: int = 0  # bytes left in the current pass (source)
    dirty: int = 0  # bytes re-dirtied since the pass began (source)
    iterations: int = 0
    rate_bps: float | None = None
    dirty_rate_bps: float | None = None
    downtime_limit_ms: int = 300
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    started: float = 0.0
    error: str | None = None
    force: bool = False
    paused_at: float | None = None  # when the migration paused the guest (downtime starts)
    cancel_reason: str | None = None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    bandwidth: int = 0

    @property
    def final(self) -> bool:
        return self.status not in _ACTIVE

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def snapshot(self) -> MigrationStatus:
        remaining = self.to_send + self.dirty if self.role == "source" else max(0, self.ram_total - self.transferred)
        if self.status == MigrationState.COMPLETED.value:
            remaining = 0
        expected = None
        if self.bandwidth and self.status in _ACTIVE:
            expected = int(remaining * 1000 / self.bandwidth)
        return MigrationStatus(
            status=self.status,
            ram_transferred=self.transferred,
            ram_remaining=remaining,
            ram_total=self.ram_total,
            rate_bps=self.rate_bps,
            dirty_rate_bps=self.dirty_rate_bps,
            downtime_ms=self.downtime_ms,
            expected_downtime_ms=expected,
            total_time_ms=self.total_time_ms,
            iterations=self.iterations,
            error=self.error,
        )


class FakeHypervisor(BaseHypervisor):
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

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        node: str | None = None,
        *,
        memory_total: int = 8192,
        cpu_total: int = 4,
        faults: Faults | None = None,
        stream_factory: StreamFactory | None = None,
        listen_host: str = "127.0.0.1",
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(node=node)
        for label, value in (("memory_total", memory_total), ("cpu_total", cpu_total)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ParameterError(f"fake hypervisor: {label} must be a positive integer, not {value!r}", node=node)
        if not isinstance(listen_host, str) or not listen_host:
            raise ParameterError(f"fake hypervisor: listen_host must be a host name or address, not {listen_host!r}", node=node)
        self.state = StateDir(state_dir, node=node)
        self.state_dir = self.state.root
        self.memory_total = memory_total
        self.cpu_total = cpu_total
        self.faults = faults or Faults()
        self.stream_factory: StreamFactory = stream_factory or TcpStreamFactory()
        self.listen_host = listen_host
        self.clock = clock
        self.rng = rng or random.Random()
        self._config = ConfigFile(self.state.root)
        self._settings: Settings = self._config.read()
        self._locks: dict[str, anyio.Lock] = {}
        self._migrations: dict[str, _Migration] = {}
        self._tg: TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recover()

    # --- context ------------------------------------------------------------

    async def __aenter__(self) -> FakeHypervisor:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(self, *exc: object) -> bool | None:
        try:
            await self.aclose()
        finally:
            tg, self._tg = self._tg, None
            if tg is not None:
                await tg.__aexit__(None, None, None)
        return None

    async def aclose(self) -> None:
        """Stop every migration stream and listener (records say they failed)."""
        with anyio.CancelScope(shield=True):
            for mig in list(self._migrations.values()):
                if not mig.final:
                    mig.cancel_reason = "the node's driver was closed"
                mig.scope.cancel()
            for mig in list(self._migrations.values()):
                with anyio.move_on_after(10):
                    await mig.done.wait()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=10)

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str) -> None:
        """Run ``fn`` in the background, owned by this driver object."""
        async def detached() -> None:
            with progress_sink(None):  # the call that started it has returned: report nowhere
                await fn(*args)

        if self._tg is not None:
            self._tg.start_soon(detached, name=name)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise HypervisorError("enter the fake driver (`async with`) to run migrations on this event loop", node=self.node) from None
        task = loop.create_task(detached(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- settings, journal, faults --------------------------------------------

    @classmethod
    def configure(cls, state_dir: str | os.PathLike[str], **settings: Any) -> Settings:
        """Merge ``settings`` into ``<state_dir>/config.json`` (validated; unknown names refused).

        Settings: ``bandwidth`` (bytes/s), ``dirty_rate`` (bytes/s),
        ``soft_stop_delay`` (s; None: the guest ignores ACPI),
        ``hard_stop_delay``, ``reboot_delay`` (s), ``memory_total`` (MiB;
        None: the constructor's), ``cpu_total``, ``hv_version``,
        ``chunk_size`` (bytes), ``connect_timeout`` (s), ``stall_timeout``
        (s a stream may stand still before it fails; None: forever), ``faults``
        (method → ``{"error", "delay", "hang", "times"}``, replaced whole).
        """
        state = StateDir(state_dir)
        return ConfigFile(state.root).merge(settings)

    @staticmethod
    def read_settings(state_dir: str | os.PathLike[str]) -> Settings:
        return ConfigFile(Path(state_dir).absolute()).read()

    @staticmethod
    def read_events(state_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
        """The node's journal (``events.jsonl``) as a list of dicts."""
        return read_events(state_dir)

    def _event(self, event: str, **fields: Any) -> None:
        self.state.append_event({"t": round(self.clock(), 6), "node": self.node, "event": event, **fields})

    async def _file_fault(self, method: str) -> None:
        try:
            fault = self._config.consume_fault(method)
        except HypervisorError:
            return  # a broken config.json: the call itself reports it
        if fault is None:
            return
        delay = math.inf if fault.hang else fault.delay
        await Fault(error=fault.error, delay=delay).apply(method, node=self.node)

    def _err(self, cls: type[HypervisorError], msg: str) -> HypervisorError:
        return cls(msg, node=self.node)

    def _lock(self, name: str) -> anyio.Lock:
        return self._locks.setdefault(name, anyio.Lock())

    # --- records ----------------------------------------------------------------

    def _record(self, name: str) -> InstanceRecord:
        rec = self.state.read(name)
        if rec is None:
            raise self._err(InstanceNotFound, f"instance {name} is not running on this node")
        return rec

    def _update(self, name: str, **changes: Any) -> InstanceRecord | None:
        """Read-modify-write a record (no await inside: atomic within this process)."""
        rec = self.state.read(name)
        if rec is None:
            return None
        rec = msgspec.structs.replace(rec, **changes)
        self.state.write(rec)
        return rec

    def _update_migration(self, name: str, role: str, **changes: Any) -> None:
        rec = self.state.read(name)
        if rec is None or rec.migration is None or rec.migration.role != role:
            return
        self.state.write(msgspec.structs.replace(rec, migration=msgspec.structs.replace(rec.migration, **changes)))

    def _recover(self) -> None:
        """Migrations this process does not run died with an earlier driver: mark them failed."""
        for name in self.state.names():
            try:
                rec = self.state.read(name)
            except HypervisorError:
                continue
            if rec is None or rec.migration is None or rec.migration.status not in _ACTIVE:
                continue
            error = "the migration stream died with the previous driver process (agent restart)"
            mig = msgspec.structs.replace(rec.migration, status=MigrationState.FAILED.value, error=error)
            state = rec.state
            if rec.migration.role == "source" and state is HvInstanceState.PAUSED and rec.migration.paused_by_migration and rec.migration.live:
                # Like QEMU: a failed live migration resumes a guest it paused.
                state, mig = HvInstanceState.RUNNING, msgspec.structs.replace(mig, paused_by_migration=False)
            self.state.write(msgspec.structs.replace(rec, state=state, migration=mig))
            self._event("recovered", instance=name, role=rec.migration.role, error=error)

    def _settings_memory(self) -> int:
        return self._settings.memory_total or self.memory_total

    def _used_memory(self) -> int:
        used = 0
        for name in self.state.names():
            rec = self.state.read(name)
            if rec is not None:
                used += rec.memory
        return used

    def _free_memory(self) -> int:
        return max(0, self._settings_memory() - self._used_memory())

    def _hvparams(self, hvparams: Mapping[str, Any] | None) -> dict[str, Any]:
        filled = self.fill_hvparams(hvparams)
        try:
            self.check_parameter_syntax(filled)
        except ParameterError as err:
            err.node = self.node
            raise
        return filled

    # --- lifecycle ----------------------------------------------------------------

    @_journaled
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

    @_journaled
    async def instance_startup_memory(self, instance: Instance) -> int:
        """max(minmem, min(maxmem, free memory)), in MiB."""
        return max(instance.beparams.minmem, min(instance.beparams.maxmem, self._free_memory()))

    @_journaled
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
        if name is None:
            if instance is None:
                raise self._err(HypervisorError, "stop_instance needs an instance or a name")
            name = instance.name
        check_instance_name(name, node=self.node)
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

    @_journaled
    async def cleanup_instance(self, instance_name: str) -> None:
        """Remove what a crash left behind for a stopped instance (temp files)."""
        name = check_instance_name(instance_name, node=self.node)
        self.state.remove_leftovers(name)
        rec = self.state.read(name)
        if rec is not None and rec.state is HvInstanceState.SHUTDOWN:
            self.state.remove(name)

    @_journaled
    async def reboot_instance(self, instance: Instance) -> None:
        """Reset the guest: uptime restarts, ``boots`` counts up."""
        name = check_instance_name(instance.name, node=self.node)
        async with self._lock(name):
            rec = self._record(name)
            if rec.state not in (HvInstanceState.RUNNING, HvInstanceState.PAUSED):
                raise self._err(HypervisorError, f"instance {name} cannot be rebooted while {rec.state.value}")
            if rec.migration is not None and rec.migration.status in _ACTIVE:
                raise self._err(HypervisorError, f"instance {name} cannot be rebooted during a migration")
            await anyio.sleep(self._settings.reboot_delay)
            self._update(name, started_at=self.clock(), boots=rec.boots + 1)

    # --- inventory ----------------------------------------------------------------

    @_journaled
    async def list_instances(self, hvparams: Mapping[str, Any] | None = None) -> list[str]:
        """Every instance present: running, paused or incoming."""
        return self.state.names()

    @_journaled
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
            elif mig.status in _ACTIVE:
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

    @_journaled
    async def get_all_instances_info(self, hvparams: Mapping[str, Any] | None = None) -> list[InstanceInfo]:
        return [info for name in self.state.names() if (info := self._info(name)) is not None]

    @_journaled
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

    @_journaled
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

    @_journaled
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

    @_journaled
    async def validate_parameters(self, hvparams: Mapping[str, Any]) -> None:
        await super().validate_parameters(hvparams)

    @_journaled
    async def balloon_instance_memory(self, instance: Instance, mem: int) -> None:
        """Set the instance's memory (MiB) within [minmem, maxmem] and the node's free memory."""
        name = check_instance_name(instance.name, node=self.node)
        async with self._lock(name):
            rec = self._record(name)
            be = rec.spec.beparams
            if isinstance(mem, bool) or not isinstance(mem, int) or not be.minmem <= mem <= be.maxmem:
                raise self._err(ParameterError, f"instance {name}: balloon target {mem!r} MiB is outside [{be.minmem}, {be.maxmem}]")
            if rec.migration is not None and rec.migration.status in _ACTIVE:
                raise self._err(HypervisorError, f"instance {name}: cannot balloon during a migration")
            grow = mem - rec.memory
            if grow > self._free_memory():
                raise self._err(HypervisorError, f"instance {name}: cannot grow by {grow} MiB, node has {self._free_memory()} MiB free")
            self._update(name, memory=mem)

    @_journaled
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

    @_journaled
    async def hot_add_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        await super().hot_add_device(instance, dev_type, device, extra, seq)

    @_journaled
    async def hot_del_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        await super().hot_del_device(instance, dev_type, device, extra, seq)

    @_journaled
    async def hot_mod_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        await super().hot_mod_device(instance, dev_type, device, extra, seq)

    @_journaled
    async def verify_hotplug_support(self, instance: Instance, action: str, dev_type: str) -> None:
        await super().verify_hotplug_support(instance, action, dev_type)

    @_journaled
    async def hotplug_supported(self, instance: Instance) -> None:
        await super().hotplug_supported(instance)

    # --- migration: target side -------------------------------------------------

    @_journaled
    async def migration_info(self, instance: Instance) -> str:
        """JSON for the target: the spec as running here, memory, vCPUs, hv version."""
        rec = self._record(check_instance_name(instance.name, node=self.node))
        return msgspec.json.encode(
            {"spec": rec.spec, "memory": rec.memory, "vcpus": rec.vcpus, "hv_version": self._settings.hv_version}
        ).decode()

    def _decode_info(self, instance: Instance, info: str) -> tuple[Instance, int, int, str]:
        class _Info(msgspec.Struct, forbid_unknown_fields=True):
            spec: Instance
            memory: int
            vcpus: int
            hv_version: str

        try:
            mi = msgspec.json.decode(info, type=_Info)
        except (msgspec.DecodeError, TypeError) as err:
            raise self._err(MigrationError, f"instance {instance.name}: malformed migration info: {err}") from err
        if mi.spec.name != instance.name:
            raise self._err(MigrationError, f"migration info is for instance {mi.spec.name!r}, not {instance.name!r}")
        if mi.memory <= 0 or mi.vcpus <= 0:
            raise self._err(MigrationError, f"instance {instance.name}: migration info has memory {mi.memory}, vcpus {mi.vcpus}")
        return mi.spec, mi.memory, mi.vcpus, mi.hv_version

    @_journaled
    async def accept_instance(self, instance: Instance, info: str, target: str) -> str:
        """Create an INCOMING record and listen on an OS-allocated port.

        Returns ``"tcp:HOST:PORT"`` (HOST is ``target``, or the listen host
        when ``target`` is empty) for :meth:`migrate_instance`.
        """
        name = check_instance_name(instance.name, node=self.node)
        spec, memory, vcpus, version = self._decode_info(instance, info)
        if not self.versions_safe_for_migration(version, self._settings.hv_version):
            raise self._err(MigrationError, f"instance {name}: source hypervisor version {version} and target {self._settings.hv_version} are not migration-compatible")
        host = target or self.listen_host
        if host in ("0.0.0.0", "::"):
            raise self._err(MigrationError, f"instance {name}: accept_instance needs this node's address, not {host}")
        async with self._lock(name):
            if self.state.read(name) is not None:
                raise self._err(MigrationError, f"instance {name} already exists on this node")
            free = self._free_memory()
            if free < memory:
                raise self._err(MigrationError, f"not enough memory to accept instance {name}: needs {memory} MiB, node has {free} MiB free")
            listener, port = await self.stream_factory.listen(self.listen_host)
            try:
                address = f"tcp:{'[' + host + ']' if ':' in host else host}:{port}"
                self.state.write(
                    InstanceRecord(
                        spec=spec,
                        state=HvInstanceState.INCOMING,
                        id=self.rng.randrange(1, 1 << 31),
                        memory=memory,
                        vcpus=vcpus,
                        started_at=self.clock(),
                        migration=MigrationRecord(role="target", status=MigrationState.SETUP.value, peer=address, ram_total=memory * MIB),
                    )
                )
                mig = _Migration(name=name, role="target", ram_total=memory * MIB, started=anyio.current_time())
                self._migrations[name] = mig
                self._spawn(self._run_target, mig, listener, name=f"fake-incoming-{name}")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()
                    self._migrations.pop(name, None)
                    self.state.remove(name)
                raise
        return address

    async def _run_target(self, mig: _Migration, listener: Any) -> None:
        """Receive one migration: header, data frames, end; then ack."""
        name = mig.name
        stream: ByteStream | None = None
        try:
            with mig.scope:
                try:
                    stream = await listener.accept()
                finally:
                    with anyio.CancelScope(shield=True):
                        await listener.aclose()
                stall = self._config.read().stall_timeout
                reader = FrameReader(stream)
                with _stall_guard(stall, "receiving the header"):
                    header = await reader.expect_json(HEADER)
                if header.get("instance") != name:
                    raise ProtocolError(f"stream is for instance {header.get('instance')!r}, not {name!r}")
                if header.get("ram_total") != mig.ram_total:
                    raise ProtocolError(f"stream carries {header.get('ram_total')!r} bytes, expected {mig.ram_total}")
                mig.status = MigrationState.ACTIVE.value
                self._update_migration(name, "target", status=mig.status)
                self._event("stream-start", instance=name, role="target", source=header.get("source_node"))
                mig.notify()
                last = anyio.current_time()
                while True:
                    with _stall_guard(stall, "receiving"):
                        kind, length = await reader.next_header()
                        if kind == DATA:
                            mig.transferred += await reader.skip(length)
                    if kind == DATA:
                        now = anyio.current_time()
                        if now - last >= PROGRESS_INTERVAL:
                            last = now
                            mig.notify()
                        continue
                    if kind != END:
                        raise ProtocolError(f"unexpected {kind.decode()} frame")
                    end = await reader.read_json(length)
                    if end.get("ram_transferred") != mig.transferred:
                        raise ProtocolError(f"source says it sent {end.get('ram_transferred')!r} bytes, {mig.transferred} arrived")
                    break
                mig.status = MigrationState.COMPLETED.value
                mig.total_time_ms = int((anyio.current_time() - mig.started) * 1000)
                self._update(
                    name,
                    state=HvInstanceState.PAUSED,
                    migration=MigrationRecord(
                        role="target", status=mig.status, ram_total=mig.ram_total, ram_transferred=mig.transferred, total_time_ms=mig.total_time_ms
                    ),
                )
                await send_json(stream, ACK, {"ram_received": mig.transferred})
        except Exception as err:  # noqa: BLE001 - any broken stream fails the incoming side
            self._target_failed(mig, f"incoming migration stream broke: {_describe(err)}")
        finally:
            with anyio.CancelScope(shield=True):
                if stream is not None:
                    await stream.aclose()
                if not mig.final:
                    self._target_failed(mig, mig.cancel_reason or "incoming migration cancelled", cancelled=True)
                self._event("stream-end", instance=name, role="target", status=mig.status, error=mig.error, ram_received=mig.transferred)
                mig.done.set()
                mig.notify()

    def _target_failed(self, mig: _Migration, error: str, *, cancelled: bool = False) -> None:
        if mig.status == MigrationState.COMPLETED.value or mig.status in (MigrationState.FAILED.value, MigrationState.CANCELLED.value):
            return
        mig.status = (MigrationState.CANCELLED if cancelled else MigrationState.FAILED).value
        mig.error = error
        self._update_migration(mig.name, "target", status=mig.status, error=error, ram_transferred=mig.transferred)

    @_journaled
    async def finalize_migration_dst(self, instance: Instance, info: str, success: bool) -> None:
        """Success: the received instance runs. Failure: drop the incoming record, close the listener."""
        name = check_instance_name(instance.name, node=self.node)
        async with self._lock(name):
            mig = self._migrations.get(name)
            if not success:
                if mig is not None and mig.role == "target":
                    mig.cancel_reason = "the migration was abandoned (finalize with success=False)"
                    mig.scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await mig.done.wait()
                    self._migrations.pop(name, None)
                rec = self.state.read(name)
                if rec is not None and rec.migration is not None and rec.migration.role == "target":
                    self.state.remove(name)
                return
            rec = self.state.read(name)
            if rec is None or rec.migration is None or rec.migration.role != "target":
                raise self._err(MigrationError, f"instance {name}: no incoming migration on this node")
            if mig is not None and mig.role == "target" and not mig.final:
                with anyio.move_on_after(max(10.0, self._settings.connect_timeout)):
                    await mig.done.wait()
                rec = self._record(name)
            assert rec.migration is not None
            if rec.migration.status != MigrationState.COMPLETED.value:
                if mig is not None and not mig.final:
                    mig.cancel_reason = "finalize found the incoming migration unfinished"
                    mig.scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await mig.done.wait()
                status = rec.migration.status if rec.migration.status not in _ACTIVE else "unfinished"
                error = rec.migration.error
                self._migrations.pop(name, None)
                self.state.remove(name)
                raise self._err(MigrationError, f"instance {name}: incoming migration {status}" + (f": {error}" if error else "") + "; target cleaned up")
            self._migrations.pop(name, None)
            self._update(name, state=HvInstanceState.RUNNING, migration=None, started_at=self.clock())

    # --- migration: source side ---------------------------------------------------

    @_journaled
    async def migrate_instance(self, instance: Instance, target: str, live: bool) -> None:
        """Start streaming to ``target`` in the background (pause first unless ``live``).

        Returns once the stream is connected (or has failed: the status says
        why, the source keeps running). Cancelling this call cancels the migration.
        """
        name = check_instance_name(instance.name, node=self.node)
        m = _TARGET.match(target or "")
        if m is None or not 0 < int(m.group(2)) <= 65535:
            raise self._err(MigrationError, f"instance {name}: bad migration target {target!r} (want tcp:HOST:PORT)")
        host, port = m.group(1).strip("[]"), int(m.group(2))
        async with self._lock(name):
            rec = self._record(name)
            if rec.state not in (HvInstanceState.RUNNING, HvInstanceState.PAUSED):
                raise self._err(MigrationError, f"instance {name}: cannot migrate while {rec.state.value}")
            current = self._migrations.get(name)
            if current is not None and not current.final:
                raise self._err(MigrationError, f"instance {name}: a migration is already {current.status}")
            if rec.migration is not None and rec.migration.status == MigrationState.COMPLETED.value:
                raise self._err(MigrationError, f"instance {name}: already migrated away (finalize the source first)")
            hvp = self._hvparams(rec.spec.hvparams)
            paused = False
            if not live and rec.state is HvInstanceState.RUNNING:
                paused = True
            self._update(
                name,
                state=HvInstanceState.PAUSED if paused else rec.state,
                migration=MigrationRecord(
                    role="source", status=MigrationState.SETUP.value, peer=target, live=live, paused_by_migration=paused, ram_total=rec.memory * MIB
                ),
            )
            mig = _Migration(
                name=name,
                role="source",
                ram_total=rec.memory * MIB,
                to_send=rec.memory * MIB,
                downtime_limit_ms=int(hvp["migration_downtime"]),
                started=anyio.current_time(),
                bandwidth=self._settings.bandwidth,
            )
            if paused:
                mig.paused_at = mig.started
            self._migrations[name] = mig
            self._spawn(self._run_source, mig, host, port, live, name=f"fake-migrate-{name}")
            try:
                while mig.status == MigrationState.SETUP.value:
                    await mig.changed.wait()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    mig.cancel_reason = "migrate_instance was cancelled"
                    mig.scope.cancel()
                    await mig.done.wait()
                raise

    def _guest_running(self, name: str) -> bool:
        rec = self.state.read(name)
        return rec is not None and rec.state is HvInstanceState.RUNNING

    def _pause_for_migration(self, name: str) -> None:
        rec = self.state.read(name)
        if rec is None or rec.state is not HvInstanceState.RUNNING or rec.migration is None:
            return
        self.state.write(
            msgspec.structs.replace(
                rec, state=HvInstanceState.PAUSED, migration=msgspec.structs.replace(rec.migration, paused_by_migration=True)
            )
        )

    def _resume_after_migration(self, name: str) -> bool:
        """Resume a source guest the migration paused (never a completed one)."""
        rec = self.state.read(name)
        if rec is None or rec.migration is None or rec.migration.role != "source":
            return False
        if rec.migration.status == MigrationState.COMPLETED.value or not rec.migration.paused_by_migration:
            return False
        self.state.write(
            msgspec.structs.replace(
                rec, state=HvInstanceState.RUNNING, migration=msgspec.structs.replace(rec.migration, paused_by_migration=False)
            )
        )
        return True

    async def _run_source(self, mig: _Migration, host: str, port: int, live: bool) -> None:
        """Stream the memory: passes paced to ``bandwidth`` while ``dirty_rate`` re-dirties pages."""
        name = mig.name
        stream: ByteStream | None = None
        completion_pause = False
        try:
            with mig.scope:
                settings = self._config.read()
                try:
                    with anyio.fail_after(settings.connect_timeout):
                        stream = await self.stream_factory.connect(host, port)
                except TimeoutError:
                    raise MigrationError(f"connecting to {host}:{port} timed out after {settings.connect_timeout}s") from None
                except OSError as err:
                    raise MigrationError(f"cannot connect to {host}:{port}: {err}") from err
                await send_json(stream, HEADER, {"instance": name, "ram_total": mig.ram_total, "source_node": self.node, "live": live})
                mig.status = MigrationState.ACTIVE.value
                self._update_migration(name, "source", status=mig.status)
                self._event("stream-start", instance=name, role="source", target=f"{host}:{port}")
                mig.notify()
                buf = memoryview(b"\xa5" * (8 * MIB))
                now = anyio.current_time()
                pace = last_dirty = last_config = last_note = now
                note_bytes = 0
                while True:
                    now = anyio.current_time()
                    if now - last_config >= CONFIG_INTERVAL:
                        last_config = now
                        try:
                            settings = self._config.read()
                        except HypervisorError:
                            pass  # a half-edited config: keep the last good one
                    mig.bandwidth = settings.bandwidth
                    running = live and not completion_pause and self._guest_running(name)
                    if running and settings.dirty_rate:
                        mig.dirty = min(mig.ram_total - mig.to_send, mig.dirty + int(settings.dirty_rate * (now - last_dirty)))
                    mig.dirty_rate_bps = float(settings.dirty_rate) if running else 0.0
                    last_dirty = now
                    if mig.to_send == 0:
                        mig.iterations += 1
                        threshold = settings.bandwidth * mig.downtime_limit_ms / 1000
                        if completion_pause:
                            break
                        if mig.dirty <= threshold or mig.force or not self._guest_running(name):
                            # Converged (or nothing can dirty pages): stop the guest, send the rest.
                            completion_pause = True
                            if self._guest_running(name):
                                self._pause_for_migration(name)
                                mig.paused_at = now
                        mig.to_send, mig.dirty = mig.dirty, 0
                        if completion_pause and mig.to_send == 0:
                            break
                        continue
                    chunk = min(mig.to_send, max(settings.chunk_size, settings.bandwidth // 100), len(buf))
                    with _stall_guard(settings.stall_timeout, "sending"):
                        await send_frame(stream, DATA, buf[:chunk])
                    mig.to_send -= chunk
                    mig.transferred += chunk
                    note_bytes += chunk
                    pace = max(pace + chunk / settings.bandwidth, anyio.current_time() - MAX_BURST)
                    delay = pace - anyio.current_time()
                    if delay > 0:
                        await anyio.sleep(delay)
                    now = anyio.current_time()
                    if now - last_note >= PROGRESS_INTERVAL:
                        mig.rate_bps = note_bytes / (now - last_note)
                        last_note, note_bytes = now, 0
                        mig.notify()
                await send_json(stream, END, {"ram_transferred": mig.transferred})
                reader = FrameReader(stream)
                with anyio.fail_after(settings.connect_timeout):
                    ack = await reader.expect_json(ACK)
                if ack.get("ram_received") != mig.transferred:
                    raise ProtocolError(f"target acknowledged {ack.get('ram_received')!r} bytes, {mig.transferred} were sent")
                end = anyio.current_time()
                mig.downtime_ms = int((end - (mig.paused_at if mig.paused_at is not None else mig.started)) * 1000)
                mig.total_time_ms = int((end - mig.started) * 1000)
                mig.status = MigrationState.COMPLETED.value
                self._update_migration(
                    name,
                    "source",
                    status=mig.status,
                    ram_transferred=mig.transferred,
                    downtime_ms=mig.downtime_ms,
                    total_time_ms=mig.total_time_ms,
                    iterations=mig.iterations,
                )
                # The guest stays paused (QEMU's postmigrate) until finalize.
                self._update(name, state=HvInstanceState.PAUSED)
                mig.notify()  # a long-polling caller sees "completed" now, not after the close
        except Exception as err:  # noqa: BLE001 - any failure fails the migration, never the source
            self._source_failed(mig, f"migration stream failed: {_describe(err)}", resume=completion_pause)
        finally:
            with anyio.CancelScope(shield=True):
                if stream is not None:
                    await stream.aclose()
                if not mig.final:
                    self._source_failed(mig, mig.cancel_reason or "migration cancelled", resume=completion_pause, cancelled=True)
                self._event(
                    "stream-end", instance=name, role="source", status=mig.status, error=mig.error, ram_transferred=mig.transferred
                )
                mig.done.set()
                mig.notify()

    def _source_failed(self, mig: _Migration, error: str, *, resume: bool, cancelled: bool = False) -> None:
        if mig.final:
            return
        mig.status = (MigrationState.CANCELLED if cancelled else MigrationState.FAILED).value
        mig.error = error
        mig.total_time_ms = int((anyio.current_time() - mig.started) * 1000)
        self._update_migration(
            mig.name, "source", status=mig.status, error=error, ram_transferred=mig.transferred, total_time_ms=mig.total_time_ms
        )
        if resume:
            # Like QEMU: a migration that paused the guest to finish resumes it when it fails.
            self._resume_after_migration(mig.name)

    async def _abort_migration(self, name: str, reason: str) -> None:
        """Cancel this node's stream for ``name`` (either role) and wait until it has settled."""
        mig = self._migrations.get(name)
        if mig is None:
            return
        if not mig.final:
            mig.cancel_reason = reason
            mig.scope.cancel()
        with anyio.CancelScope(shield=True):
            await mig.done.wait()

    @_journaled
    async def get_migration_status(self, instance: Instance, wait: float = 0.0) -> MigrationStatus:
        """Live progress; with ``wait`` > 0, return early when the status or progress moves."""
        name = check_instance_name(instance.name, node=self.node)
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) or wait < 0 or math.isnan(wait):
            raise self._err(ParameterError, f"wait must be a number of seconds >= 0, not {wait!r}")
        mig = self._migrations.get(name)
        if mig is not None:
            changed = mig.changed
            if wait > 0 and not mig.final:
                with anyio.move_on_after(min(wait, 600.0)):
                    await changed.wait()
            return mig.snapshot()
        rec = self._record(name)
        m = rec.migration
        if m is None:
            return MigrationStatus(status=MigrationState.NONE.value)
        return MigrationStatus(
            status=m.status,
            ram_transferred=m.ram_transferred,
            ram_remaining=0 if m.status == MigrationState.COMPLETED.value else max(0, m.ram_total - m.ram_transferred),
            ram_total=m.ram_total,
            downtime_ms=m.downtime_ms,
            total_time_ms=m.total_time_ms,
            iterations=m.iterations,
            error=m.error,
        )

    @_journaled
    async def finalize_migration_source(self, instance: Instance, success: bool, live: bool) -> None:
        """Success: remove the migrated source. Failure: abort the stream and resume the source.

        A source whose migration completed is never resumed (the target may run).
        """
        name = check_instance_name(instance.name, node=self.node)
        async with self._lock(name):
            rec = self.state.read(name)
            if rec is None:
                if success:
                    return
                raise self._err(MigrationError, f"instance {name}: the source instance is gone; cannot resume it")
            if success:
                mig = self._migrations.get(name)
                if mig is not None and mig.role == "source" and not mig.final:
                    raise self._err(MigrationError, f"instance {name}: migration is {mig.status}, not completed; not stopping the source")
                if rec.migration is None or rec.migration.status != MigrationState.COMPLETED.value:
                    status = rec.migration.status if rec.migration else "none"
                    raise self._err(MigrationError, f"instance {name}: migration is {status!r}, not completed; not stopping the source")
                self._migrations.pop(name, None)
                self.state.remove(name)
                return
            await self._abort_migration(name, "the migration was abandoned (finalize with success=False)")
            rec = self._record(name)
            if rec.migration is not None and rec.migration.status == MigrationState.COMPLETED.value:
                raise self._err(MigrationError, f"instance {name}: the migration completed, the target may be running: refusing to resume the source")
            self._resume_after_migration(name)
            self._migrations.pop(name, None)

    # --- convergence controls -------------------------------------------------------

    def _active_source(self, name: str) -> _Migration:
        mig = self._migrations.get(name)
        if mig is None or mig.role != "source" or mig.final:
            self._record(name)
            raise self._err(MigrationError, f"instance {name}: no migration in progress on this node")
        return mig

    @_journaled
    async def set_migration_downtime(self, instance: Instance, ms: int) -> None:
        """Raise or lower the allowed downtime (ms) of the running migration."""
        name = check_instance_name(instance.name, node=self.node)
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 1:
            raise self._err(ParameterError, f"migration downtime must be a positive integer of ms, not {ms!r}")
        self._active_source(name).downtime_limit_ms = ms

    @_journaled
    async def force_complete_migration(self, instance: Instance) -> None:
        """Pause the guest so dirtying stops and the migration finishes."""
        name = check_instance_name(instance.name, node=self.node)
        mig = self._active_source(name)
        mig.force = True
        if self._guest_running(name):
            self._pause_for_migration(name)
            mig.paused_at = anyio.current_time()
        mig.notify()

    @_journaled
    async def cancel_migration(self, instance: Instance) -> None:
        """Abort the migration; the source keeps (or goes back to) running."""
        name = check_instance_name(instance.name, node=self.node)
        async with self._lock(name):
            mig = self._migrations.get(name)
            if mig is not None and mig.role == "source":
                await self._abort_migration(name, "migration cancelled (cancel_migration)")
            rec = self._record(name)
            if rec.migration is not None and rec.migration.status == MigrationState.COMPLETED.value:
                raise self._err(MigrationError, f"instance {name}: the migration already completed; nothing to cancel")
            self._resume_after_migration(name)
