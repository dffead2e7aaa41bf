"""The per-node runtime directory: what each QEMU was started with, and its process.

Layout (dirs 0700, files 0600)::

    RUN_DIR/instances/NAME/runtime.json   the instance's runtime description
    RUN_DIR/instances/NAME/pid            QEMU's pidfile
    RUN_DIR/instances/NAME/qmp.sock       the QMP socket (one client at a time)
    RUN_DIR/instances/NAME/console.sock   the serial console socket

A restarted agent re-finds its instances from these files; a process is ours
only if ``/proc/PID/cmdline`` names our pidfile (guard against pid reuse).

The agent is a child subreaper (:mod:`hv._process`), so a QEMU it started
that exits becomes its zombie; liveness checks reap it (``waitpid`` on that
one pid) and remember how it ended (:meth:`RunDir.last_exit`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import msgspec

from .._objects import BeParams, Disk, Nic
from .._process import ExitStatus, proc_state, reap
from ..base import check_instance_name, is_instance_name
from ..errors import HypervisorError

log = logging.getLogger("hv.qemu")

# Per process, not per driver object: the process is the QEMUs' parent.
#: pidfile -> pid of a QEMU this process started or saw running (ours to reap).
_STARTED: dict[str, int] = {}
#: pidfile -> how that QEMU ended, once reaped here.
_EXITS: dict[str, ExitStatus] = {}

RUNTIME_FILE = "runtime.json"
PID_FILE = "pid"
QMP_SOCKET = "qmp.sock"
CONSOLE_SOCKET = "console.sock"


class HotDevice(msgspec.Struct, kw_only=True):
    """A hotplugged device, kept so a migration target is started with it."""

    kind: str  # "nic" | "disk"
    device_id: str
    backend_id: str
    backend_option: str  # "-netdev" | "-blockdev"
    backend: dict[str, Any]
    device: dict[str, Any]


class InstanceSpec(msgspec.Struct, kw_only=True):
    """What an instance is made of: what a migration hands to the target, and part of its runtime."""

    name: str
    uuid: str = ""
    hvparams: dict[str, Any]
    beparams: BeParams
    nics: list[Nic] = msgspec.field(default_factory=list)
    disks: list[Disk] = msgspec.field(default_factory=list)
    hotplugged: list[HotDevice] = msgspec.field(default_factory=list)
    qemu_version: str = ""


class Runtime(InstanceSpec, kw_only=True):
    """What an instance was started with (the target of a migration gets the same spec)."""

    taps: list[str | None] = msgspec.field(default_factory=list)
    accel: str = "tcg"
    argv: list[str] = msgspec.field(default_factory=list)
    incoming_port: int | None = None
    startup_paused: bool = False
    paused_for_migration: bool = False


class MigrationInfo(InstanceSpec, kw_only=True):
    """What ``migration_info`` hands to the target node (JSON)."""


class RunDir:
    """The node's runtime directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.instances = self.root / "instances"
        for d in (self.root, self.instances):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    def dir(self, name: str) -> Path:
        return self.instances / check_instance_name(name)

    def pidfile(self, name: str) -> Path:
        return self.dir(name) / PID_FILE

    def qmp_socket(self, name: str) -> Path:
        return self.dir(name) / QMP_SOCKET

    def console_socket(self, name: str) -> Path:
        return self.dir(name) / CONSOLE_SOCKET

    def names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.instances))
        except FileNotFoundError:
            return []
        return [n for n in entries if is_instance_name(n) and (self.instances / n).is_dir()]

    def prepare(self, name: str) -> Path:
        """An empty instance directory (leftovers removed)."""
        d = self.dir(name)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(mode=0o700)
        return d

    def remove(self, name: str) -> None:
        shutil.rmtree(self.dir(name), ignore_errors=True)

    def write_runtime(self, rt: Runtime) -> None:
        """Atomic, 0600."""
        path = self.dir(rt.name) / RUNTIME_FILE
        tmp = path.with_name(RUNTIME_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(msgspec.json.encode(rt))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def read_runtime(self, name: str) -> Runtime | None:
        path = self.dir(name) / RUNTIME_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(data, type=Runtime)
        except msgspec.DecodeError as err:
            raise HypervisorError(f"corrupt runtime description {path}: {err}") from err

    def _pidfile_pid(self, name: str) -> int | None:
        try:
            text = self.pidfile(name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not (text.isascii() and text.isdigit()) or len(text) > 10:
            return None
        return int(text)

    def pid(self, name: str) -> int | None:
        """The live QEMU process of ``name``, or None (a dead one we started is reaped)."""
        pid = self._pidfile_pid(name)
        if pid is None:
            # QEMU removes its pidfile when it exits cleanly: still reap it.
            pid = _STARTED.get(str(self.pidfile(name)))
            if pid is None:
                return None
        return pid if self.alive(name, pid) else None

    def adopt(self, name: str) -> int | None:
        """Note the pid a QEMU we just started wrote, so that it is reaped even if it dies at once."""
        pid = self._pidfile_pid(name)
        if pid is not None:
            _STARTED[str(self.pidfile(name))] = pid
            _EXITS.pop(str(self.pidfile(name)), None)
        return pid

    def alive(self, name: str, pid: int) -> bool:
        """True while ``pid`` is ``name``'s QEMU and has not been reaped.

        A QEMU this process started (or saw running) is our child (we are its
        subreaper): once it has ended it is reaped here and its exit status
        kept. One that is still exiting (cmdline already empty, or a zombie
        whose other threads are not done) cannot be reaped yet and counts as
        alive for those few moments, so "gone" always means "reaped, status
        known" for our own QEMUs.
        """
        key = str(self.pidfile(name))
        if process_alive(pid) and process_is_ours(pid, key):
            _STARTED[key] = pid
            return True
        if _STARTED.get(key) != pid:
            return False  # never ours to reap (pid reused, or started by another process)
        st = proc_state(pid)
        if st is None or st.ppid != os.getpid():
            del _STARTED[key]  # gone, or not our child: its parent reaps it
            return False
        status = reap(pid)
        if status is None:
            # Still exiting: its memory (so its cmdline) may already be gone, or it
            # is a zombie whose other threads are not done. Gone means reaped.
            return True
        del _STARTED[key]
        _EXITS[key] = status
        log.info("instance %s: QEMU (pid %d) %s", name, pid, status)
        return False

    @staticmethod
    def watched_pids() -> set[int]:
        """Pids of the QEMUs this process reaps through :meth:`alive` (whatever the run dir)."""
        return set(_STARTED.values())

    def last_exit(self, name: str) -> ExitStatus | None:
        """How ``name``'s QEMU ended, if this process reaped it (until it is started again)."""
        return _EXITS.get(str(self.pidfile(name)))


def process_is_ours(pid: int, pidfile: str) -> bool:
    """True if ``pid`` is alive (not a zombie) and was started with ``-pidfile PIDFILE``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    target = os.fsencode(pidfile)
    return any(a == b"-pidfile" and b == target for a, b in zip(argv, argv[1:]))


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie has ended: it is only unreaped)."""
    st = proc_state(pid)
    return st is not None and st.state not in ("Z", "X")


def process_uptime(pid: int) -> float:
    """Seconds since ``pid`` started (0.0 when unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[-1].split()
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        start_ticks = int(fields[19])  # field 22 of stat, counted after "(comm)"
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def process_rss_mib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024)


def process_threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []
