"""Fixtures for the real-QEMU driver tests.

Guests run on TCG by default; ``HERD_QEMU_ACCEL=kvm`` (or ``auto``) runs the
same tests on KVM. Every QEMU a test started is killed in the fixture's
``finally``, found by its pidfile under the test's directory.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests._real import require_binary
import pytest_asyncio

import hv
from hv import _process
from hv.qemu import QemuHypervisor

ACCEL = os.environ.get("HERD_QEMU_ACCEL", "tcg")

pytestmark = pytest.mark.qemu


def _require_qemu() -> None:
    require_binary("qemu-system-x86_64", "qemu-system-x86")


def qemu_pids_under(root: Path) -> list[int]:
    """Live QEMU processes started with a pidfile below ``root``."""
    prefix = os.fsencode(str(root))
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if any(a == b"-pidfile" and b.startswith(prefix) for a, b in zip(argv, argv[1:])):
            pids.append(int(entry))
    return pids


def kill_qemus_under(root: Path) -> None:
    """SIGKILL them, then reap those that are this process's children (the drivers make it their subreaper)."""
    pids = qemu_pids_under(root)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10.0
    for pid in pids:
        while (st := _process.proc_state(pid)) is not None and st.ppid == os.getpid() and _process.reap(pid) is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)


@pytest.fixture
def qemu_root(tmp_path: Path) -> Iterator[Path]:
    _require_qemu()
    try:
        yield tmp_path
    finally:
        kill_qemus_under(tmp_path)


class Nodes:
    """Driver objects on separate runtime directories, closed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.drivers: list[QemuHypervisor] = []

    def make(self, node: str, **kw: Any) -> QemuHypervisor:
        kw.setdefault("qmp_timeout", 5.0)
        drv = hv.get_hypervisor("kvm", run_dir=self.root / node, node=node, **kw)
        assert isinstance(drv, QemuHypervisor)
        self.drivers.append(drv)
        return drv

    async def aclose(self) -> None:
        for drv in self.drivers:
            await drv.aclose()


@pytest_asyncio.fixture
async def nodes(qemu_root: Path) -> AsyncIterator[Nodes]:
    n = Nodes(qemu_root)
    try:
        yield n
    finally:
        with anyio.CancelScope(shield=True):
            await n.aclose()


@pytest.fixture(scope="session")
def prefilled_256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of seeded random bytes: guest RAM (memory-backend-file, share=off) that must all be sent."""
    path = tmp_path_factory.mktemp("mem") / "ram-256M.bin"
    rng = random.Random(20261123)
    with open(path, "wb") as fh:
        for _ in range(16):
            fh.write(rng.randbytes(16 << 20))
    return path


@pytest.fixture(scope="session")
def dirty_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.guest.build import build_dirty_kernel

    return build_dirty_kernel(tmp_path_factory.mktemp("guest"))


def instance(name: str = "vm1", mem: int = 256, vcpus: int = 1, **hvparams: Any) -> hv.Instance:
    hvparams.setdefault("accel", ACCEL)
    return hv.Instance(
        name=name, hypervisor="kvm", hvparams=hvparams, beparams=hv.BeParams(minmem=mem, maxmem=mem, vcpus=vcpus)
    )


async def wait_status(drv: QemuHypervisor, inst: hv.Instance, pred: Any, timeout: float = 20.0) -> hv.MigrationStatus:
    """Long-poll the migration status until ``pred(status)`` (events, no sleeps)."""
    with anyio.fail_after(timeout):
        while True:
            st = await drv.get_migration_status(inst, wait=1.0)
            if pred(st):
                return st
            assert not (st.is_final and not pred(st)), f"migration ended as {st}"
