"""The QEMU driver's migration: ``-incoming defer`` targets, ``migrate``, status and convergence controls."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from typing import Any

import anyio
import msgspec

from .._objects import Instance, MigrationStatus
from ..base import check_instance_name, tcp_address
from ..errors import HypervisorError, HypervisorTimeout, MigrationError, ParameterError
from . import _params
from ._core import _MIB, QemuCore
from ._monitor import QmpCommandError
from ._runtime import MigrationInfo, Runtime

#: Migration statuses during which the source may still be cancelled.
_CANCELLABLE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})
#: What "unlimited" migration bandwidth means (bytes/s): QEMU treats 0 as "no limit" only in some versions.
_UNLIMITED_BPS = 1 << 40


class QemuMigration(QemuCore):
    """Migration methods of :class:`~hv.qemu.QemuHypervisor` (source and target side)."""

    @staticmethod
    def versions_safe_for_migration(src: Any, target: Any) -> bool:
        """Same QEMU major.minor (``"7.2.22"`` and ``"7.2.9"`` are compatible)."""

        def major_minor(v: Any) -> tuple[str, ...] | None:
            m = re.match(r"^\s*([0-9]+)\.([0-9]+)", str(v))
            return m.groups() if m else None

        a, b = major_minor(src), major_minor(target)
        return a is not None and a == b

    # --- migration ----------------------------------------------------------

    async def migration_info(self, instance: Instance) -> str:
        """JSON of what the target needs to start an identical QEMU."""
        await self.faults.hit("migration_info", node=self.node)
        _, rt = self._live_runtime(instance.name)
        info = MigrationInfo(**{field: getattr(rt, field) for field in MigrationInfo.__struct_fields__})
        return msgspec.json.encode(info).decode()

    def _decode_info(self, instance: Instance, info: str) -> MigrationInfo:
        try:
            mi = msgspec.json.decode(info, type=MigrationInfo)
        except (msgspec.DecodeError, TypeError) as err:
            raise self._err(MigrationError, f"instance {instance.name}: malformed migration info: {err}") from err
        if mi.name != instance.name:
            raise self._err(MigrationError, f"migration info is for instance {mi.name!r}, not {instance.name!r}")
        try:
            self.check_parameter_syntax(mi.hvparams)
        except ParameterError as err:
            raise self._err(MigrationError, f"instance {instance.name}: migration info hvparams: {err.message}") from err
        return mi

    def _candidate_ports(self) -> list[int]:
        lo, hi = self.port_range
        span = hi - lo + 1
        start = self._next_port - lo
        ports = [lo + (start + i) % span for i in range(span)]
        return [p for p in ports if p not in self._reserved_ports]

    def _port_free(self, port: int) -> bool:
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((self.listen_host, port))
            except OSError:
                return False
        return True

    async def accept_instance(self, instance: Instance, info: str, target: str) -> str:
        """Start the target QEMU with ``-incoming defer`` and listen on a port of the node's range.

        Returns ``"tcp:HOST:PORT"`` for ``migrate_instance`` (HOST is ``target``,
        or the listen host when ``target`` is empty).
        """
        await self.faults.hit("accept_instance", node=self.node)
        mi = self._decode_info(instance, info)
        name = check_instance_name(instance.name)
        hvp = self.fill(mi.hvparams)
        await self.validate_parameters(hvp)
        local = (await self.qemu_version(hvp["qemu_binary"]))[0]
        if mi.qemu_version and not self.versions_safe_for_migration(mi.qemu_version, local):
            raise self._err(MigrationError, f"instance {name}: source QEMU {mi.qemu_version} and target QEMU {local} are not migration-compatible")
        host = self._incoming_host(name, target, self.listen_host)
        async with self._lock(name):
            if self._pid(name) is not None:
                raise self._err(MigrationError, f"instance {name} already exists on this node")
            rt = Runtime(
                name=name, uuid=mi.uuid, hvparams=hvp, beparams=mi.beparams, nics=mi.nics, disks=mi.disks, hotplugged=mi.hotplugged
            )
            await self._launch(rt, incoming=True, paused=False)
            try:
                await self._set_caps(name, hvp, target_side=True)
                port = await self._listen_incoming(name)
                rt.incoming_port = port
                self.run_dir.write_runtime(rt)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._kill_and_clean(name)
                raise
        return tcp_address(host, port)

    async def _listen_incoming(self, name: str) -> int:
        last: Exception | None = None
        for port in self._candidate_ports():
            if not self._port_free(port):
                continue
            self._reserved_ports.add(port)
            try:
                await self._qmp(name, "migrate-incoming", {"uri": tcp_address(self.listen_host, port)})
            except QmpCommandError as err:
                self._reserved_ports.discard(port)
                last = err
                if "in use" in err.message.lower() or "address" in err.message.lower():
                    continue
                raise
            lo, hi = self.port_range
            self._next_port = port + 1 if port < hi else lo
            return port
        raise self._err(MigrationError, f"instance {name}: no free migration port in {self.port_range[0]}-{self.port_range[1]}" + (f" ({last})" if last else ""))

    async def _set_caps(self, name: str, hvp: Mapping[str, Any], *, target_side: bool) -> None:
        wanted = set(_params.parse_caps(hvp["migration_caps"]))
        caps = [{"capability": "events", "state": True}]
        for cap in _params.MIGRATION_CAPS:
            if target_side and cap == "auto-converge":
                continue
            caps.append({"capability": cap, "state": cap in wanted})
        await self._qmp(name, "migrate-set-capabilities", {"capabilities": caps})

    async def migrate_instance(self, instance: Instance, target: str, live: bool) -> None:
        """Set bandwidth, downtime and capabilities; pause first if not live; start ``migrate``."""
        await self.faults.hit("migrate_instance", node=self.node)
        self._migration_target(instance.name, target)
        name = instance.name
        async with self._lock(name):
            _, rt = self._live_runtime(name)
            hvp = rt.hvparams
            state = await self._runstate(name)
            if state not in ("running", "paused"):
                raise self._err(MigrationError, f"instance {name}: cannot migrate from QEMU runstate {state!r}")
            current = (await self._qmp(name, "query-migrate")).get("status")
            if current in _CANCELLABLE or current == "postcopy-active":
                raise self._err(MigrationError, f"instance {name}: a migration is already {current}")
            await self._set_caps(name, hvp, target_side=False)
            bw = hvp["migration_bandwidth"]
            await self._qmp(
                name,
                "migrate-set-parameters",
                {"max-bandwidth": bw * _MIB if bw else _UNLIMITED_BPS, "downtime-limit": hvp["migration_downtime"]},
            )
            rt.paused_for_migration = False
            if not live and state == "running":
                await self._qmp(name, "stop")
                rt.paused_for_migration = True
            self.run_dir.write_runtime(rt)
            try:
                await self._qmp(name, "migrate", {"uri": target})
            except HypervisorError:
                with anyio.CancelScope(shield=True):
                    await self._resume_if_we_paused(name)
                raise

    async def _resume_if_we_paused(self, name: str) -> None:
        rt = self.run_dir.read_runtime(name)
        if rt is None or not rt.paused_for_migration:
            return
        if await self._runstate(name) == "paused":
            await self._qmp(name, "cont")
        rt.paused_for_migration = False
        self.run_dir.write_runtime(rt)

    @staticmethod
    def status_from_qmp(data: Mapping[str, Any]) -> MigrationStatus:
        """Map a ``query-migrate`` answer (unknown statuses carried through)."""
        ram = data.get("ram") or {}
        page = int(ram.get("page-size") or 4096)
        mbps = ram.get("mbps")
        dirty = ram.get("dirty-pages-rate")

        def opt_int(key: str) -> int | None:
            v = data.get(key)
            return int(v) if isinstance(v, (int, float)) else None

        return MigrationStatus(
            status=str(data.get("status", "none")),
            ram_transferred=int(ram.get("transferred") or 0),
            ram_remaining=int(ram.get("remaining") or 0),
            ram_total=int(ram.get("total") or 0),
            rate_bps=float(mbps) * 1e6 / 8 if isinstance(mbps, (int, float)) else None,
            dirty_rate_bps=float(dirty) * page if isinstance(dirty, (int, float)) else None,
            downtime_ms=opt_int("downtime"),
            expected_downtime_ms=opt_int("expected-downtime"),
            setup_time_ms=opt_int("setup-time"),
            total_time_ms=opt_int("total-time"),
            iterations=int(ram["dirty-sync-count"]) if isinstance(ram.get("dirty-sync-count"), int) else None,
            error=data.get("error-desc"),
        )

    async def get_migration_status(self, instance: Instance, wait: float = 0.0) -> MigrationStatus:
        """``query-migrate``; with ``wait``, return on the next MIGRATION event or after ``wait`` s."""
        await self.faults.hit("get_migration_status", node=self.node)
        name = instance.name
        self._live_runtime(name)
        mon = self._monitor(name)
        await mon.connect()
        since = mon.event_count
        status = self.status_from_qmp(await mon.execute("query-migrate"))
        if wait > 0 and not status.is_final:
            await mon.wait_event(since, min(wait, 600.0))
            status = self.status_from_qmp(await mon.execute("query-migrate"))
        # The first "completed" answer can carry total-time 0: ask again briefly.
        for _ in range(10):
            if not (status.succeeded and not status.total_time_ms):
                break
            await anyio.sleep(0.01)
            status = self.status_from_qmp(await mon.execute("query-migrate"))
        return status

    async def _wait_final(self, name: str, seconds: float) -> MigrationStatus:
        mon = self._monitor(name)
        deadline = anyio.current_time() + seconds
        while True:
            since = mon.event_count
            status = self.status_from_qmp(await mon.execute("query-migrate"))
            left = deadline - anyio.current_time()
            if status.is_final or left <= 0:
                return status
            await mon.wait_event(since, min(left, 0.5))

    async def finalize_migration_dst(self, instance: Instance, info: str, success: bool) -> None:
        """Success: wait for the incoming side to finish and make sure it runs. Failure: kill it, clean up."""
        await self.faults.hit("finalize_migration_dst", node=self.node)
        name = check_instance_name(instance.name)
        async with self._lock(name):
            if not success:
                with anyio.CancelScope(shield=True):
                    await self._kill_and_clean(name)
                return
            if self._pid(name) is None:
                await self._clean(name)
                raise self._err(MigrationError, f"instance {name}: the incoming QEMU is gone (migration failed on the target)")
            mon = self._monitor(name)
            await mon.connect()
            deadline = anyio.current_time() + max(30.0, 3 * self.qmp_timeout)
            while True:
                since = mon.event_count
                state = await self._runstate(name)
                if state != "inmigrate":
                    break
                if anyio.current_time() >= deadline:
                    raise self._err(HypervisorTimeout, f"instance {name}: incoming migration did not finish in time (still inmigrate)")
                if self._pid(name) is None:
                    raise self._err(MigrationError, f"instance {name}: the incoming QEMU exited")
                await mon.wait_event(since, 0.2)
            if state in ("paused", "postmigrate"):
                await self._qmp(name, "cont")
            elif state != "running":
                raise self._err(MigrationError, f"instance {name}: received instance is in runstate {state!r}")
            rt = self.run_dir.read_runtime(name)
            if rt is not None:
                if rt.incoming_port is not None:
                    self._reserved_ports.discard(rt.incoming_port)
                rt.incoming_port = None
                rt.argv = [a for a in rt.argv if a not in ("-incoming", "defer")]
                self.run_dir.write_runtime(rt)
                await self._configure_taps(rt)

    async def finalize_migration_source(self, instance: Instance, success: bool, live: bool) -> None:
        """Success: quit the source. Failure: cancel if still active and resume a source we paused.

        A source whose migration completed is never resumed: the target may run.
        """
        await self.faults.hit("finalize_migration_source", node=self.node)
        name = check_instance_name(instance.name)
        async with self._lock(name):
            if self._pid(name) is None:
                if success:
                    await self._clean(name)
                    return
                raise self._err(MigrationError, f"instance {name}: the source QEMU is gone; cannot resume it")
            status = self.status_from_qmp(await self._qmp(name, "query-migrate"))
            if success:
                if status.status != "completed":
                    raise self._err(MigrationError, f"instance {name}: migration is {status.status!r}, not completed; not stopping the source")
                await self._stop(name, force=True, timeout=0)
                return
            if status.status == "postcopy-active":
                raise self._err(MigrationError, f"instance {name}: postcopy is active; the source cannot take the instance back")
            if status.status in _CANCELLABLE:
                await self._qmp(name, "migrate_cancel")
                status = await self._wait_final(name, max(10.0, self.qmp_timeout))
            if status.status == "completed" or await self._runstate(name) == "postmigrate":
                raise self._err(MigrationError, f"instance {name}: the migration completed, the target may be running: refusing to resume the source")
            if not status.is_final and status.status != "none":
                raise self._err(MigrationError, f"instance {name}: migration still {status.status!r} after cancel")
            await self._resume_if_we_paused(name)

    # --- convergence controls -----------------------------------------------

    async def set_migration_downtime(self, instance: Instance, ms: int) -> None:
        """Raise or lower the allowed downtime of a running migration."""
        await self.faults.hit("set_migration_downtime", node=self.node)
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 1:
            raise self._err(ParameterError, f"migration downtime must be a positive integer of ms, not {ms!r}")
        self._live_runtime(instance.name)
        await self._qmp(instance.name, "migrate-set-parameters", {"downtime-limit": ms})

    async def force_complete_migration(self, instance: Instance) -> None:
        """Pause the guest (``stop``) so the migration finishes."""
        await self.faults.hit("force_complete_migration", node=self.node)
        name = instance.name
        _, rt = self._live_runtime(name)
        if await self._runstate(name) == "running":
            rt.paused_for_migration = True
            self.run_dir.write_runtime(rt)
            await self._qmp(name, "stop")

    async def cancel_migration(self, instance: Instance) -> None:
        """``migrate_cancel``; the source keeps (or goes back to) running."""
        await self.faults.hit("cancel_migration", node=self.node)
        name = instance.name
        self._live_runtime(name)
        async with self._lock(name):
            status = self.status_from_qmp(await self._qmp(name, "query-migrate"))
            if status.status in _CANCELLABLE:
                await self._qmp(name, "migrate_cancel")
                status = await self._wait_final(name, max(10.0, self.qmp_timeout))
            if status.status in ("cancelled", "failed"):
                await self._resume_if_we_paused(name)
