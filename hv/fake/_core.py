"""The fake driver's core: its state directory, config, journal, background tasks and records.

:class:`FakeCore` is the base of :class:`~hv.fake.FakeHypervisor` and of its migration part.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Self

import anyio
import msgspec
from anyio.abc import TaskGroup

from .._faults import Fault, Faults
from .._objects import HvInstanceState, MigrationState
from .._progress import progress_sink
from ..base import BaseHypervisor
from ..errors import HypervisorError, InstanceNotFound, ParameterError
from ._config import ConfigFile, Settings
from ._live import ACTIVE, LiveMigration
from ._state import InstanceRecord, StateDir, read_events
from ._stream import StreamFactory, TcpStreamFactory


class FakeCore(BaseHypervisor):
    """What every part of the fake driver stands on: one node's directory and the tasks it runs."""

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
        self._migrations: dict[str, LiveMigration] = {}
        self._tg: TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recover()

    # --- context ------------------------------------------------------------

    async def __aenter__(self) -> Self:
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

    def _update_migration(self, name: str, role: str, **changes: Any) -> None:
        """Change the stored migration of ``name`` when it is still the ``role`` side's."""
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
            if rec is None or rec.migration is None or rec.migration.status not in ACTIVE:
                continue
            error = "the migration stream died with the previous driver process (agent restart)"
            mig = msgspec.structs.replace(rec.migration, status=MigrationState.FAILED.value, error=error)
            state = rec.state
            if rec.migration.role == "source" and state is HvInstanceState.PAUSED and rec.migration.paused_by_migration and rec.migration.live:
                # Like QEMU: a failed live migration resumes a guest it paused.
                state, mig = HvInstanceState.RUNNING, msgspec.structs.replace(mig, paused_by_migration=False)
            self.state.write(msgspec.structs.replace(rec, state=state, migration=mig))
            self._event("recovered", instance=name, role=rec.migration.role, error=error)

    # --- migration: target side -------------------------------------------------
