"""Process hygiene helpers: subreaper, reaping one pid, /proc state (issue 9, item 12)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import pytest

from hv import _process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc and prctl")


def _spawn(code: str) -> int:
    """A direct child running ``code`` (posix_spawn: no fork of a threaded pytest)."""
    return os.posix_spawn(sys.executable, [sys.executable, "-c", code], dict(os.environ))


def _until(cond, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    """Poll ``cond`` until it returns something truthy (a condition with a deadline, no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _zombie(pid: int) -> bool:
    st = _process.proc_state(pid)
    return st is not None and st.state == "Z"


@pytest.mark.parametrize(
    ("code", "expected", "text"),
    [
        ("import os; os._exit(0)", (0, None), "exited with status 0"),
        ("import os; os._exit(7)", (7, None), "exited with status 7"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", (None, 9), "killed by signal 9 (SIGKILL)"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", (None, 15), "killed by signal 15 (SIGTERM)"),
    ],
)
def test_a_zombie_child_is_reaped_with_its_status(code: str, expected: tuple[int | None, int | None], text: str) -> None:
    pid = _spawn(code)
    _until(lambda: _zombie(pid), "the child to become a zombie")
    status = _until(lambda: _process.reap(pid), "the zombie to be reapable")
    assert (status.pid, status.code, status.signal) == (pid, *expected)
    assert str(status) == text
    assert _process.proc_state(pid) is None  # no zombie left
    assert _process.reap(pid) is None  # reaped once; a second look is not an error


def test_reap_leaves_running_and_foreign_processes_alone() -> None:
    pid = _spawn("import time; time.sleep(60)")
    try:
        assert _process.reap(pid) is None  # still running
        assert _process.proc_state(pid).state in {"R", "S", "D"}  # type: ignore[union-attr]
    finally:
        os.kill(pid, signal.SIGKILL)
        _until(lambda: _process.reap(pid), "the killed child to be reaped")
    assert _process.reap(1) is None  # pid 1 is nobody's child
    assert _process.reap(0) is None and _process.reap(-1) is None  # never "any child"


@pytest.mark.parametrize(("session_leader", "reaped"), [(True, True), (False, False)])
def test_reap_orphaned_daemons_takes_only_session_leaders_of_that_name(session_leader: bool, reaped: bool) -> None:
    """A -daemonize middle process leads its session; a child we spawned ourselves does not."""
    code = "import os; os.setsid(); os._exit(3)" if session_leader else "import os; os._exit(3)"
    pid = _spawn(code)
    comm = _until(lambda: _zombie(pid) and _process.proc_state(pid), "the child to become a zombie").comm  # type: ignore[union-attr]
    try:
        got = _until(lambda: _process.reap_orphaned_daemons(comm) or not reaped, "the orphan to be reaped")
        if reaped:
            assert got == [_process.ExitStatus(pid, code=3)]
            assert _process.proc_state(pid) is None
        else:
            assert _zombie(pid)  # left for its own watcher
    finally:
        _until(lambda: _process.proc_state(pid) is None or _process.reap(pid), "clean-up reap")


def test_become_subreaper_sets_the_flag_once(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _process.become_subreaper() is True
    flag = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    assert flag.value == 1
    monkeypatch.setattr(_process, "_subreaper", None)
    monkeypatch.setattr(_process.sys, "platform", "freebsd14")
    assert _process.become_subreaper() is False  # not Linux: a log line, no crash
