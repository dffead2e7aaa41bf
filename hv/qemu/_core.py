"""The QEMU driver's core: the run directory, QMP monitors, and starting and ending QEMU processes.

:class:`QemuCore` is the base of :class:`~hv.qemu.QemuHypervisor` and of its
migration and hotplug parts.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from .. import params as _p
from .._faults import Faults
from .._process import ExitStatus, become_subreaper, reap_orphaned_daemons
from .._objects import Instance, Nic, NicMode, StageTiming, StopResult, StopStage
from ..base import TAP_PREFIX, BaseHypervisor, check_instance_name, configure_nic, generate_tap_name
from ..errors import HypervisorError, HypervisorTimeout, InstanceNotFound, ParameterError
from . import _params
from ._cmdline import build_argv
from ._monitor import Monitor
from ._runtime import RunDir, Runtime, process_is_ours, process_threads

log = logging.getLogger("hv.qemu")

_MIB = 1024 * 1024
_VERSION = re.compile(r"QEMU emulator version ([0-9]+)\.([0-9]+)(?:\.([0-9]+))?")

#: Grace after each hard stop stage (seconds).
HARD_GRACE = 3.0
#: How often to look at an external process while waiting for it to exit.
_POLL = 0.02


class QemuCore(BaseHypervisor):
    """What every part of the QEMU driver stands on: the run directory, QMP monitors, processes."""

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
        self._reserved_ports: set[int] = set()
        self._next_port = lo
        self._next_tap = 0
        self._version_cache: dict[str, tuple[str, tuple[int, int, int]]] = {}
        self._binaries: set[str] = {os.path.basename(_params.DEFAULTS["qemu_binary"])}

    # --- small helpers ------------------------------------------------------

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

    # --- starting and ending QEMU ------------------------------------------

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
