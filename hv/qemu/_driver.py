"""``QemuHypervisor``: real ``qemu-system-x86_64`` processes driven over QMP.

Each instance is a daemonized QEMU (it outlives the agent that started it)
with a pidfile, a QMP socket and a serial console socket in the node's
runtime directory. The driver holds one QMP connection per instance and puts
a timeout on every command.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import msgspec

from .. import params as _p
from .._faults import Faults
from .._process import ExitStatus, become_subreaper, reap_orphaned_daemons
from .._objects import (
    ConsoleInfo,
    Disk,
    HvInstanceState,
    Instance,
    InstanceInfo,
    MigrationStatus,
    Nic,
    NicMode,
    NodeInfo,
    StageTiming,
    StopResult,
    StopStage,
)
from ..base import TAP_PREFIX, BaseHypervisor, configure_nic, generate_tap_name, get_linux_node_info
from ..errors import (
    HotplugError,
    HypervisorError,
    HypervisorTimeout,
    InstanceNotFound,
    MigrationError,
    ParameterError,
)
from . import _params
from ._cmdline import build_argv, opt, root_port_ids
from ._monitor import Monitor, QmpCommandError
from ._runtime import (
    HotDevice,
    MigrationInfo,
    RunDir,
    Runtime,
    check_instance_name,
    process_is_ours,
    process_rss_mib,
    process_threads,
    process_uptime,
)

log = logging.getLogger("hv.qemu")

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

#: Migration statuses during which the source may still be cancelled.
_CANCELLABLE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug"})
_MIB = 1024 * 1024
#: What "unlimited" migration bandwidth means (bytes/s): QEMU treats 0 as "no limit" only in some versions.
_UNLIMITED_BPS = 1 << 40
_TARGET = re.compile(r"^tcp:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_VERSION = re.compile(r"QEMU emulator version ([0-9]+)\.([0-9]+)(?:\.([0-9]+))?")

#: Grace after each hard stop stage (seconds).
HARD_GRACE = 3.0
#: How often to look at an external process while waiting for it to exit.
_POLL = 0.02


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class QemuHypervisor(BaseHypervisor):
    """The ``kvm`` hypervisor: QEMU with KVM when usable, TCG otherwise."""

    NAME: ClassVar[str] = "kvm"
    CAN_MIGRATE: ClassVar[bool] = True
    PARAMETERS: ClassVar[dict[str, _p.Check]] = _params.PARAMETERS
    DEFAULTS: ClassVar[dict[str, Any]] = _params.DEFAULTS

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        node: str | None = None,
        *,
        port_range: tuple[int, int] = (49152, 49407),
        listen_host: str = "127.0.0.1",
        faults: Faults | None = None,
        qmp_timeout: float = 10.0,
        start_timeout: float = 30.0,
        stop_grace: float = HARD_GRACE,
    ) -> None:
        super().__init__(node=node)
        lo, hi = port_range
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 < lo <= hi <= 65535):
            raise ParameterError(f"port_range must be two ports lo <= hi in 1-65535, not {port_range!r}", node=node)
        if qmp_timeout <= 0 or start_timeout <= 0 or stop_grace <= 0:
            raise ParameterError("qmp_timeout, start_timeout and stop_grace must be positive", node=node)
        self.run_dir = RunDir(run_dir)
        # The driver runs inside the node agent: QEMU daemonizes, so make the
        # agent inherit (and reap) it instead of leaving zombies to pid 1.
        become_subreaper()
        self.port_range = (lo, hi)
        self.listen_host = listen_host
        self.faults = faults or Faults()
        self.qmp_timeout = qmp_timeout
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._monitors: dict[str, Monitor] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._reserved_ports: set[int] = set()
        self._next_port = lo
        self._next_tap = 0
        self._version_cache: dict[str, tuple[str, tuple[int, int, int]]] = {}
        self._binaries: set[str] = {os.path.basename(_params.DEFAULTS["qemu_binary"])}

    # --- small helpers ------------------------------------------------------

    def _err(self, cls: type[HypervisorError], msg: str) -> HypervisorError:
        return cls(msg, node=self.node)

    def _lock(self, name: str) -> anyio.Lock:
        return self._locks.setdefault(name, anyio.Lock())

    def _monitor(self, name: str) -> Monitor:
        mon = self._monitors.get(name)
        if mon is None:
            mon = Monitor(name, str(self.run_dir.qmp_socket(name)), timeout=self.qmp_timeout, node=self.node)
            self._monitors[name] = mon
        return mon

    async def _forget_monitor(self, name: str) -> None:
        mon = self._monitors.pop(name, None)
        if mon is not None:
            await mon.aclose()

    def _pid(self, name: str) -> int | None:
        check_instance_name(name)
        return self.run_dir.pid(name)

    def last_exit(self, name: str) -> ExitStatus | None:
        """How ``name``'s QEMU ended, when this driver's process reaped it."""
        check_instance_name(name)
        return self.run_dir.last_exit(name)

    def _ended(self, name: str) -> str:
        """`` (QEMU pid N killed by signal 9 (SIGKILL))`` when we know how it ended, else ``""``."""
        status = self.run_dir.last_exit(name)
        return f" (QEMU pid {status.pid} {status})" if status is not None else ""

    def _reap_daemon_leftovers(self, binary: str | None = None) -> None:
        """Reap -daemonize's exited middle processes (and daemons that failed to start)."""
        names = {os.path.basename(binary)} if binary else set(self._binaries)
        if binary:
            self._binaries.add(os.path.basename(binary))
        for comm in names:
            for status in reap_orphaned_daemons(comm, exclude=self.run_dir.watched_pids()):
                if status.code not in (0, None) or status.signal is not None:
                    log.info("reaped a daemonizing %s (pid %d) that %s", comm, status.pid, status)

    def _live_runtime(self, name: str) -> tuple[int, Runtime]:
        pid = self._pid(name)
        rt = self.run_dir.read_runtime(name) if pid else None
        if pid is None or rt is None:
            raise self._err(InstanceNotFound, f"instance {name} is not running on this node{self._ended(name)}")
        return pid, rt

    async def _qmp(self, name: str, cmd: str, args: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        return await self._monitor(name).execute(cmd, args, **kw)

    async def qmp_command(self, instance_name: str, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one raw QMP command on a running instance (diagnostics and tests)."""
        self._live_runtime(instance_name)
        return await self._qmp(instance_name, command, arguments)

    async def _runstate(self, name: str) -> str:
        return str((await self._qmp(name, "query-status"))["status"])

    def fill(self, hvparams: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults, then ``hvparams``; syntax-checked."""
        filled = self.fill_hvparams(hvparams)
        self.check_parameter_syntax(filled)
        return filled

    async def qemu_version(self, binary: str = "qemu-system-x86_64") -> tuple[str, tuple[int, int, int]]:
        """(``"7.2.22"``, (7, 2, 22)) for ``binary``."""
        if binary in self._version_cache:
            return self._version_cache[binary]
        try:
            with anyio.fail_after(self.qmp_timeout):
                res = await anyio.run_process([binary, "--version"], check=False)
        except TimeoutError as err:
            raise self._err(HypervisorTimeout, f"{binary} --version did not answer in {self.qmp_timeout}s") from err
        except OSError as err:
            raise self._err(HypervisorError, f"cannot run {binary}: {err}") from err
        out = res.stdout.decode(errors="replace")
        m = _VERSION.search(out)
        if res.returncode != 0 or m is None:
            raise self._err(HypervisorError, f"cannot read the version of {binary}: {out.strip() or res.returncode}")
        parts = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
        result = (".".join(map(str, parts)), parts)
        self._version_cache[binary] = result
        return result

    @staticmethod
    def kvm_status(path: str = "/dev/kvm") -> tuple[bool, str]:
        """Whether KVM is usable here, and why (not)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False, f"{path} does not exist (no KVM module, or not exposed to this machine)"
        except PermissionError:
            return False, f"{path} is not accessible to uid {os.getuid()} (needs root or the kvm group)"
        except OSError as err:
            return False, f"{path} cannot be opened: {err}"
        os.close(fd)
        return True, f"{path} is usable"

    def _resolve_accel(self, accel: str) -> str:
        if accel == "tcg":
            return "tcg"
        ok, why = self.kvm_status()
        if accel == "kvm" and not ok:
            raise self._err(HypervisorError, f"accel=kvm but KVM is not usable: {why}")
        return "kvm" if ok else "tcg"

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

    async def _launch(self, rt: Runtime, *, incoming: bool, paused: bool) -> None:
        """Start QEMU for ``rt``; on any failure nothing is left running."""
        name = rt.name
        hvp = rt.hvparams
        self._check_runtime(rt)
        rt.accel = self._resolve_accel(hvp["accel"])
        rt.qemu_version = (await self.qemu_version(hvp["qemu_binary"]))[0]
        inst_dir = self.run_dir.prepare(name)
        await self._forget_monitor(name)
        try:
            rt.taps = await self._tap_names(rt.nics)
            rt.argv = build_argv(rt, inst_dir, incoming=incoming, paused=paused)
            self.run_dir.write_runtime(rt)
            try:
                with anyio.fail_after(self.start_timeout):
                    res = await anyio.run_process(rt.argv, cwd=inst_dir, check=False, stdin=subprocess.DEVNULL)
            except TimeoutError as err:
                raise self._err(HypervisorTimeout, f"instance {name}: QEMU did not start within {self.start_timeout}s") from err
            except OSError as err:
                raise self._err(HypervisorError, f"instance {name}: cannot run {rt.argv[0]}: {err}") from err
            self.run_dir.adopt(name)
            self._reap_daemon_leftovers(rt.argv[0])
            if res.returncode != 0:
                text = (res.stderr or res.stdout).decode(errors="replace").strip()
                raise self._err(HypervisorError, f"instance {name}: QEMU failed to start (exit {res.returncode}): {text}")
            if self._pid(name) is None:
                raise self._err(HypervisorError, f"instance {name}: QEMU exited right after starting{self._ended(name)}")
            await self._monitor(name).connect()
            await self._apply_cpu_mask(rt)
            if not incoming:
                await self._configure_taps(rt)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._kill_and_clean(name)
            raise

    def _check_runtime(self, rt: Runtime) -> None:
        hvp = rt.hvparams
        be = rt.beparams
        if be.maxmem < 16 or be.vcpus < 1:
            raise self._err(ParameterError, f"instance {rt.name}: maxmem {be.maxmem} MiB / vcpus {be.vcpus} too small")
        masks = _p.parse_multi_cpu_mask(hvp["cpu_mask"] or "all")
        if len(masks) > 1 and len(masks) != be.vcpus:
            raise self._err(
                ParameterError,
                f"instance {rt.name}: cpu_mask {_p.shorten(hvp['cpu_mask'])} has {len(masks)} entries for {be.vcpus} vCPUs",
            )
        if hvp["mem_path"] and os.path.getsize(hvp["mem_path"]) < be.maxmem * _MIB:
            raise self._err(ParameterError, f"instance {rt.name}: mem_path {_p.shorten(hvp['mem_path'])} is smaller than {be.maxmem} MiB")
        for d in rt.disks:
            if not _p.is_norm_abs_path(d.path) or not os.path.exists(d.path):
                raise self._err(ParameterError, f"instance {rt.name}: disk {_p.shorten(d.path)} is not an existing absolute path")

    @staticmethod
    def _tap_possible() -> bool:
        return os.geteuid() == 0 and os.path.exists("/dev/net/tun")

    async def _tap_names(self, nics: Sequence[Nic]) -> list[str | None]:
        """TAP names for non-user NICs when this node allows it, else None (user networking).

        ``generate_tap_name`` gives the first index above every existing
        ``gnt.com.N``; later NICs (and starts racing in this driver) take the
        next ones, since QEMU creates the devices only when it starts.
        """
        names: list[str | None] = []
        for nic in nics:
            if NicMode(nic.mode) is NicMode.USER or not self._tap_possible():
                names.append(None)
                continue
            index = max(int((await generate_tap_name()).rsplit(".", 1)[1]), self._next_tap)
            self._next_tap = index + 1
            names.append(f"{TAP_PREFIX}{index}")
        return names

    async def _configure_taps(self, rt: Runtime) -> None:
        inst = Instance(name=rt.name, uuid=rt.uuid, nics=tuple(rt.nics))
        for seq, (nic, tap) in enumerate(zip(rt.nics, rt.taps)):
            if tap is None:
                continue
            if rt.hvparams["nic_script"]:
                await configure_nic(rt.hvparams["nic_script"], inst, seq, nic, tap)
            else:
                argv = ["ip", "link", "set", "dev", tap]
                if NicMode(nic.mode) is NicMode.BRIDGED and nic.link:
                    argv += ["master", nic.link]
                res = await anyio.run_process([*argv, "up"], check=False)
                if res.returncode != 0:
                    raise self._err(HypervisorError, f"instance {rt.name}: cannot bring up {tap}: {res.stderr.decode(errors='replace').strip()}")

    async def _apply_cpu_mask(self, rt: Runtime) -> None:
        """Pin QEMU's threads (one mask) or each vCPU thread (one mask per vCPU).

        Masks stay ranges until here; each distinct one is expanded once, at
        most :data:`hv.params.MAX_CPU_NUMBER` + 1 CPUs.
        """
        masks = _p.parse_multi_cpu_mask(rt.hvparams["cpu_mask"] or "all")
        pid = self._pid(rt.name)
        if pid is None or all(_p.is_all_cpus(m) for m in masks):
            return
        all_cpus = os.sched_getaffinity(0)
        expanded: dict[tuple[tuple[int, int], ...], set[int]] = {}

        def cpus(mask: list[tuple[int, int]]) -> set[int]:
            key = tuple(mask)
            if key not in expanded:
                expanded[key] = set(all_cpus) if _p.is_all_cpus(mask) else _p.expand_cpu_ranges(mask)
            return expanded[key]

        try:
            if len(masks) == 1:
                for tid in process_threads(pid):
                    os.sched_setaffinity(tid, cpus(masks[0]))
            else:
                vcpus = await self._qmp(rt.name, "query-cpus-fast")
                for vcpu, mask in zip(sorted(vcpus, key=lambda c: c["cpu-index"]), masks):
                    os.sched_setaffinity(int(vcpu["thread-id"]), cpus(mask))
        except OSError as err:
            raise self._err(HypervisorError, f"instance {rt.name}: cannot apply cpu_mask {_p.shorten(rt.hvparams['cpu_mask'])}: {err}") from err

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
        if name is None:
            if instance is None:
                raise self._err(HypervisorError, "stop_instance needs an instance or a name")
            name = instance.name
        check_instance_name(name)
        if timeout is not None and timeout < 0:
            raise self._err(ParameterError, f"stop timeout must be >= 0, not {timeout!r}")
        async with self._lock(name):
            return await self._stop(name, force=force, timeout=120.0 if timeout is None else timeout)

    async def _stop(self, name: str, *, force: bool, timeout: float) -> StopResult:
        stages: list[StageTiming] = []
        pid = self._pid(name)
        pidfile = str(self.run_dir.pidfile(name))
        if pid is None:
            await self._clean(name)
            return StopResult(name=name, stage=StopStage.ALREADY_STOPPED, stages=())

        async def attempt(stage: StopStage, action: Any, grace: float) -> bool:
            began = anyio.current_time()
            try:
                await action()
            except HypervisorError:
                pass  # a monitor that does not answer: the next stage will do
            except ProcessLookupError:
                pass
            gone = await self._wait_gone(name, pid, grace - (anyio.current_time() - began))
            stages.append(StageTiming(stage=stage, seconds=round(anyio.current_time() - began, 4), ended_it=gone))
            return gone

        async def powerdown() -> None:
            await self._qmp(name, "system_powerdown", timeout=min(self.qmp_timeout, max(timeout, 0.5)))

        async def quit_() -> None:
            await self._qmp(name, "quit", timeout=self.stop_grace)

        async def term() -> None:
            if process_is_ours(pid, pidfile):  # never signal a reused pid
                os.kill(pid, signal.SIGTERM)

        async def kill() -> None:
            if process_is_ours(pid, pidfile):
                os.kill(pid, signal.SIGKILL)

        plan: list[tuple[StopStage, Any, float]] = []
        if not force:
            plan.append((StopStage.SOFT, powerdown, timeout))
        g = self.stop_grace
        plan += [(StopStage.MONITOR, quit_, g), (StopStage.SIGTERM, term, g), (StopStage.SIGKILL, kill, g)]
        for stage, action, grace in plan:
            if await attempt(stage, action, grace):
                await self._clean(name)
                return StopResult(name=name, stage=stage, stages=tuple(stages))
        raise self._err(HypervisorError, f"instance {name} (pid {pid}) survived SIGKILL: {stages}")

    async def _wait_gone(self, name: str, pid: int, seconds: float) -> bool:
        """Watch ``name``'s QEMU until it exits (reaped, if ours) or ``seconds`` pass."""

        def alive() -> bool:
            return self.run_dir.alive(name, pid)

        with anyio.move_on_after(max(0.0, seconds)):
            while alive():
                await anyio.sleep(_POLL)
        return not alive()

    async def _clean(self, name: str) -> None:
        rt = None
        try:
            rt = self.run_dir.read_runtime(name)
        except HypervisorError:
            pass
        if rt is not None and rt.incoming_port is not None:
            self._reserved_ports.discard(rt.incoming_port)
        await self._forget_monitor(name)
        self.run_dir.remove(name)

    async def _kill_and_clean(self, name: str) -> None:
        """Hard end for a process we are abandoning (failed start, failed incoming)."""
        pid = self._pid(name)
        pidfile = str(self.run_dir.pidfile(name))
        if pid is not None:
            with anyio.move_on_after(1.0):
                try:
                    await self._qmp(name, "quit", timeout=1.0)
                except HypervisorError:
                    pass
            if not await self._wait_gone(name, pid, 1.0):
                try:
                    if process_is_ours(pid, pidfile):
                        os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await self._wait_gone(name, pid, self.stop_grace)
        await self._clean(name)

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
        info = MigrationInfo(
            name=rt.name,
            uuid=rt.uuid,
            hvparams=rt.hvparams,
            beparams=rt.beparams,
            nics=rt.nics,
            disks=rt.disks,
            hotplugged=rt.hotplugged,
            qemu_version=rt.qemu_version,
        )
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
        host = target or self.listen_host
        if host in ("0.0.0.0", "::"):
            raise self._err(MigrationError, f"instance {name}: accept_instance needs this node's address, listen host is {host}")
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
        return f"tcp:{_bracket(host)}:{port}"

    async def _listen_incoming(self, name: str) -> int:
        last: Exception | None = None
        for port in self._candidate_ports():
            if not self._port_free(port):
                continue
            self._reserved_ports.add(port)
            try:
                await self._qmp(name, "migrate-incoming", {"uri": f"tcp:{_bracket(self.listen_host)}:{port}"})
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
        m = _TARGET.match(target or "")
        if m is None or not 0 < int(m.group(2)) <= 65535:
            raise self._err(MigrationError, f"instance {instance.name}: bad migration target {_p.shorten(target)} (want tcp:HOST:PORT)")
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

    # --- memory -------------------------------------------------------------

    async def balloon_instance_memory(self, instance: Instance, mem: int) -> None:
        """Ask the guest's virtio-balloon for ``mem`` MiB."""
        await self.faults.hit("balloon_instance_memory", node=self.node)
        _, rt = self._live_runtime(instance.name)
        if not isinstance(mem, int) or isinstance(mem, bool) or not 1 <= mem <= rt.beparams.maxmem:
            raise self._err(ParameterError, f"instance {instance.name}: balloon target {mem!r} MiB outside 1-{rt.beparams.maxmem}")
        await self._qmp(instance.name, "balloon", {"value": mem * _MIB})

    # --- hotplug ------------------------------------------------------------

    @staticmethod
    def _dev_type(dev_type: str) -> str:
        kind = str(dev_type).lower()
        if kind not in ("nic", "disk"):
            raise HotplugError(f"hotplug of device type {dev_type!r} is not supported (nic, disk)")
        return kind

    async def verify_hotplug_support(self, instance: Instance, action: str, dev_type: str) -> None:
        await self.faults.hit("verify_hotplug_support", node=self.node)
        self._dev_type(dev_type)
        if str(action).lower() not in ("add", "remove", "hot-add", "hot-remove"):
            raise self._err(HotplugError, f"hotplug action {action!r} is not supported by {self.NAME} (add, remove)")

    async def hotplug_supported(self, instance: Instance) -> None:
        await self.faults.hit("hotplug_supported", node=self.node)
        _, rt = self._live_runtime(instance.name)
        if await self._runstate(instance.name) == "inmigrate":
            raise self._err(HotplugError, f"instance {instance.name} is being received; no hotplug now")

    async def hot_add_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        """NIC: netdev + NIC on a free PCIe root port. Disk: blockdev + scsi-hd on scsi0."""
        await self.faults.hit("hot_add_device", node=self.node)
        kind = self._dev_type(dev_type)
        name = instance.name
        async with self._lock(name):
            _, rt = self._live_runtime(name)
            dev_id = f"hot{kind}{int(seq)}"
            if any(d.device_id == dev_id for d in rt.hotplugged):
                raise self._err(HotplugError, f"instance {name}: device {dev_id} is already plugged")
            if kind == "nic":
                nic = device if isinstance(device, Nic) else msgspec.convert(device, Nic)
                used = {d.device.get("bus") for d in rt.hotplugged}
                ports = [p for p in root_port_ids(rt) if p not in used]
                dev: dict[str, Any] = {"driver": rt.hvparams["nic_type"], "id": dev_id, "netdev": f"{dev_id}-net", "mac": nic.mac}
                if root_port_ids(rt):
                    if not ports:
                        raise self._err(HotplugError, f"instance {name}: no free hotplug slot (hotplug_slots={rt.hvparams['hotplug_slots']})")
                    dev["bus"] = ports[0]
                hot = HotDevice(kind=kind, device_id=dev_id, backend_id=f"{dev_id}-net", backend_option="-netdev",
                                backend={"type": "user", "id": f"{dev_id}-net"}, device=dev)
                await self._qmp(name, "netdev_add", hot.backend)
            else:
                disk = device if isinstance(device, Disk) else msgspec.convert(device, Disk)
                if not _p.is_norm_abs_path(disk.path) or not os.path.exists(disk.path):
                    raise self._err(HotplugError, f"instance {name}: disk {_p.shorten(disk.path)} is not an existing absolute path")
                backend = {"driver": rt.hvparams["disk_format"], "node-name": f"{dev_id}-blk", "read-only": disk.readonly,
                           "file": {"driver": "file", "filename": disk.path}}
                hot = HotDevice(kind=kind, device_id=dev_id, backend_id=f"{dev_id}-blk", backend_option="-blockdev",
                                backend=backend, device={"driver": "scsi-hd", "id": dev_id, "drive": f"{dev_id}-blk", "bus": "scsi0.0"})
                await self._qmp(name, "blockdev-add", backend)
            try:
                await self._qmp(name, "device_add", hot.device)
            except HypervisorError as err:
                with anyio.CancelScope(shield=True):
                    await self._del_backend(name, hot)
                raise self._err(HotplugError, f"instance {name}: hot-add of {kind} failed: {err.message}") from err
            rt.hotplugged.append(hot)
            self.run_dir.write_runtime(rt)

    async def _del_backend(self, name: str, hot: HotDevice) -> None:
        cmd, args = ("netdev_del", {"id": hot.backend_id}) if hot.backend_option == "-netdev" else ("blockdev-del", {"node-name": hot.backend_id})
        try:
            await self._qmp(name, cmd, args)
        except QmpCommandError:
            pass

    async def hot_del_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        """``device_del`` and wait for DEVICE_DELETED (PCI unplug needs the guest's cooperation)."""
        await self.faults.hit("hot_del_device", node=self.node)
        kind = self._dev_type(dev_type)
        name = instance.name
        async with self._lock(name):
            _, rt = self._live_runtime(name)
            dev_id = f"hot{kind}{int(seq)}"
            hot = next((d for d in rt.hotplugged if d.device_id == dev_id), None)
            if hot is None:
                raise self._err(HotplugError, f"instance {name}: no hotplugged {kind} with seq {seq}")
            mon = self._monitor(name)
            await mon.connect()
            since = mon.event_count
            mon.deleted_devices.discard(dev_id)
            try:
                await mon.execute("device_del", {"id": dev_id})
            except QmpCommandError as err:
                if err.error_class != "DeviceNotFound":
                    raise self._err(HotplugError, f"instance {name}: device_del {dev_id} failed: {err.message}") from err
            deadline = anyio.current_time() + self.qmp_timeout
            while not self._deleted(mon, dev_id):
                left = deadline - anyio.current_time()
                if left <= 0:
                    raise self._err(HotplugError, f"instance {name}: the guest did not release {dev_id} within {self.qmp_timeout}s")
                await mon.wait_event(since, left)
                since = mon.event_count
            await self._del_backend(name, hot)
            rt.hotplugged = [d for d in rt.hotplugged if d.device_id != dev_id]
            self.run_dir.write_runtime(rt)

    @staticmethod
    def _deleted(mon: Monitor, dev_id: str) -> bool:
        return dev_id in mon.deleted_devices

    # --- node ---------------------------------------------------------------

    async def powercycle_node(self, hvparams: Mapping[str, Any] | None = None) -> None:
        await self.faults.hit("powercycle_node", node=self.node)
        self.linux_powercycle()

    async def aclose(self) -> None:
        """Close every QMP connection (the QEMU processes keep running)."""
        with anyio.CancelScope(shield=True):
            for name in list(self._monitors):
                await self._forget_monitor(name)
