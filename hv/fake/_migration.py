"""The fake driver's migration: both ends of a real byte stream, paced and re-dirtied.

:class:`FakeMigration` is a part of :class:`~hv.fake.FakeHypervisor` (which
inherits it), built on :class:`FakeCore`'s state directory, config, journal
and task spawner.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import msgspec
from anyio.abc import ByteStream

from .._objects import HvInstanceState, Instance, MigrationState, MigrationStatus
from ..base import tcp_address
from ..errors import HypervisorError, MigrationError, ParameterError
from ._core import FakeCore
from ._journal import journaled
from ._live import ACTIVE, StreamStalled, CONFIG_INTERVAL, MAX_BURST, MIB, PROGRESS_INTERVAL, LiveMigration, describe, stall_guard
from ._state import InstanceRecord, MigrationRecord, check_instance_name
from ._stream import ACK, DATA, END, HEADER, FrameReader, ProtocolError, send_frame, send_json


class FakeMigration(FakeCore):
    """Migration methods of the fake driver (source and target side, convergence controls)."""

    @journaled
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

    @journaled
    async def accept_instance(self, instance: Instance, info: str, target: str) -> str:
        """Create an INCOMING record and listen on an OS-allocated port.

        Returns ``"tcp:HOST:PORT"`` (HOST is ``target``, or the listen host
        when ``target`` is empty) for :meth:`migrate_instance`.
        """
        name = check_instance_name(instance.name, node=self.node)
        spec, memory, vcpus, version = self._decode_info(instance, info)
        if not self.versions_safe_for_migration(version, self._settings.hv_version):
            raise self._err(MigrationError, f"instance {name}: source hypervisor version {version} and target {self._settings.hv_version} are not migration-compatible")
        host = self._incoming_host(name, target, self.listen_host)
        async with self._lock(name):
            if self.state.read(name) is not None:
                raise self._err(MigrationError, f"instance {name} already exists on this node")
            free = self._free_memory()
            if free < memory:
                raise self._err(MigrationError, f"not enough memory to accept instance {name}: needs {memory} MiB, node has {free} MiB free")
            listener, port = await self.stream_factory.listen(self.listen_host)
            try:
                address = tcp_address(host, port)
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
                mig = LiveMigration(name=name, role="target", ram_total=memory * MIB, started=anyio.current_time())
                self._migrations[name] = mig
                self._spawn(self._run_target, mig, listener, name=f"fake-incoming-{name}")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await listener.aclose()
                    self._migrations.pop(name, None)
                    self.state.remove(name)
                raise
        return address

    async def _run_target(self, mig: LiveMigration, listener: Any) -> None:
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
                with stall_guard(stall, "receiving the header"):
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
                    with stall_guard(stall, "receiving"):
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
            self._target_failed(mig, f"incoming migration stream broke: {describe(err)}")
        finally:
            with anyio.CancelScope(shield=True):
                if stream is not None:
                    await stream.aclose()
                if not mig.final:
                    self._target_failed(mig, mig.cancel_reason or "incoming migration cancelled", cancelled=True)
                self._event("stream-end", instance=name, role="target", status=mig.status, error=mig.error, ram_received=mig.transferred)
                mig.done.set()
                mig.notify()

    def _target_failed(self, mig: LiveMigration, error: str, *, cancelled: bool = False) -> None:
        if mig.status == MigrationState.COMPLETED.value or mig.status in (MigrationState.FAILED.value, MigrationState.CANCELLED.value):
            return
        mig.status = (MigrationState.CANCELLED if cancelled else MigrationState.FAILED).value
        mig.error = error
        self._update_migration(mig.name, "target", status=mig.status, error=error, ram_transferred=mig.transferred)

    @journaled
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
                status = rec.migration.status if rec.migration.status not in ACTIVE else "unfinished"
                error = rec.migration.error
                self._migrations.pop(name, None)
                self.state.remove(name)
                raise self._err(MigrationError, f"instance {name}: incoming migration {status}" + (f": {error}" if error else "") + "; target cleaned up")
            self._migrations.pop(name, None)
            self._update(name, state=HvInstanceState.RUNNING, migration=None, started_at=self.clock())

    # --- migration: source side ---------------------------------------------------

    @journaled
    async def migrate_instance(self, instance: Instance, target: str, live: bool) -> None:
        """Start streaming to ``target`` in the background (pause first unless ``live``).

        Returns once the stream is connected (or has failed: the status says
        why, the source keeps running). Cancelling this call cancels the migration.
        """
        name = check_instance_name(instance.name, node=self.node)
        host, port = self._migration_target(name, target, scheme_optional=True)
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
            mig = LiveMigration(
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

    async def _run_source(self, mig: LiveMigration, host: str, port: int, live: bool) -> None:
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
                    with stall_guard(settings.stall_timeout, "sending"):
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
                try:
                    with anyio.fail_after(settings.connect_timeout):
                        ack = await reader.expect_json(ACK)
                except TimeoutError:
                    raise StreamStalled(
                        f"migration stream stalled: the target did not acknowledge the end of the stream "
                        f"within {settings.connect_timeout:g}s"
                    ) from None
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
            self._source_failed(mig, f"migration stream failed: {describe(err)}", resume=completion_pause)
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

    def _source_failed(self, mig: LiveMigration, error: str, *, resume: bool, cancelled: bool = False) -> None:
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

    @journaled
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

    @journaled
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

    def _active_source(self, name: str) -> LiveMigration:
        mig = self._migrations.get(name)
        if mig is None or mig.role != "source" or mig.final:
            self._record(name)
            raise self._err(MigrationError, f"instance {name}: no migration in progress on this node")
        return mig

    @journaled
    async def set_migration_downtime(self, instance: Instance, ms: int) -> None:
        """Raise or lower the allowed downtime (ms) of the running migration."""
        name = check_instance_name(instance.name, node=self.node)
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 1:
            raise self._err(ParameterError, f"migration downtime must be a positive integer of ms, not {ms!r}")
        self._active_source(name).downtime_limit_ms = ms

    @journaled
    async def force_complete_migration(self, instance: Instance) -> None:
        """Pause the guest so dirtying stops and the migration finishes."""
        name = check_instance_name(instance.name, node=self.node)
        mig = self._active_source(name)
        mig.force = True
        if self._guest_running(name):
            self._pause_for_migration(name)
            mig.paused_at = anyio.current_time()
        mig.notify()

    @journaled
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
