"""Process hygiene for drivers that start daemons: subreaper, reaping, /proc state.

QEMU is started with ``-daemonize``: it forks twice and its launcher exits,
so the daemon (and the middle process, which exits at once) are orphans.
Where pid 1 does not reap (containers), an orphan that exits stays a zombie
forever, and a zombie still "exists" for ``kill(pid, 0)``. The process that
runs a driver therefore makes itself a child subreaper
(:func:`become_subreaper`): orphans below it are re-parented to it, and it
reaps them itself, one known pid at a time (:func:`reap`). It never calls
``waitpid(-1)``: asyncio's child watcher owns the children it spawned.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from collections.abc import Container
from typing import NamedTuple

log = logging.getLogger("hv.process")

#: ``prctl`` option number (linux/prctl.h).
PR_SET_CHILD_SUBREAPER = 36

_subreaper: bool | None = None  # None: not tried yet in this process


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux); True when it is one.

    Tried once per process; a failure is logged once and leaves the process
    as it was (orphans then go to pid 1, which may or may not reap them).
    """
    global _subreaper
    if _subreaper is not None:
        return _subreaper
    _subreaper = False
    if not sys.platform.startswith("linux"):
        log.warning("cannot become a child subreaper: not Linux (%s); exited QEMU processes are reaped by pid 1 or not at all", sys.platform)
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    except (OSError, AttributeError) as err:
        log.warning("cannot become a child subreaper (prctl PR_SET_CHILD_SUBREAPER): %s; exited QEMU processes may stay zombies", err)
        return False
    _subreaper = True
    log.info("pid %d is a child subreaper: it reaps the QEMU processes it started", os.getpid())
    return True


class ExitStatus(NamedTuple):
    """How a reaped process ended: ``code`` (exited) or ``signal`` (killed)."""

    pid: int
    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, pid: int, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(pid, signal=os.WTERMSIG(status))
        return cls(pid, code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else status)

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = "unknown"
            return f"killed by signal {self.signal} ({name})"
        return f"exited with status {self.code}"


def reap(pid: int) -> ExitStatus | None:
    """Collect ``pid``'s exit status if it is our child and has ended (a zombie).

    None when it still runs, or is not our child (someone else reaps it).
    """
    if pid <= 0:
        return None
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if got == 0:
        return None
    return ExitStatus.from_wait_status(pid, status)


class ProcState(NamedTuple):
    """The fields of ``/proc/PID/stat`` that say what a process is and who owns it."""

    comm: str
    state: str  # R, S, D, Z (zombie), T, X, …
    ppid: int
    pgrp: int
    session: int


def proc_state(pid: int) -> ProcState | None:
    """``pid``'s state from ``/proc``, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    try:
        head, tail = raw.rsplit(b")", 1)
        comm = head.split(b"(", 1)[1].decode(errors="replace")
        fields = tail.split()
        return ProcState(comm, fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]))
    except (IndexError, ValueError):
        return None


def _child_pids() -> list[int]:
    """This process's children: ``/proc/self/task/*/children``, else a scan of ``/proc``."""
    me = os.getpid()
    pids: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{me}/task")
        found = False
        for tid in tasks:
            try:
                with open(f"/proc/{me}/task/{tid}/children", "rb") as fh:
                    pids.update(int(p) for p in fh.read().split())
                found = True
            except OSError:
                continue
        if found:
            return sorted(pids)
    except OSError:
        pass
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_state(int(entry))
            if st is not None and st.ppid == me:
                pids.add(int(entry))
    return sorted(pids)


def reap_orphaned_daemons(comm: str, exclude: Container[int] = ()) -> list[ExitStatus]:
    """Reap ended children named ``comm`` that live in another session: daemonized orphans.

    ``-daemonize`` QEMU forks, calls ``setsid`` and forks again: as a
    subreaper we inherit the middle process (always, it exits at once) and a
    daemon that failed before writing its pidfile, both as zombies in their
    own session. Children we spawn ourselves (asyncio's) stay in our session,
    so their exit status is left to their watcher; pids in ``exclude`` (the
    daemons whose exit the caller reports itself) are left too.
    """
    ours = os.getsid(0)
    reaped = []
    for pid in _child_pids():
        st = proc_state(pid)
        if pid in exclude or st is None or st.state != "Z" or st.comm != comm[:15] or st.session == ours:
            continue
        status = reap(pid)
        if status is not None:
            reaped.append(status)
    return reaped
