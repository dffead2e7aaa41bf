"""The dirty-memory test guest (tests/guest): boots, and its migration does not converge.

Also exercises the convergence controls the engine's policy uses:
``set_migration_downtime``, ``cancel_migration``, ``force_complete_migration``.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.abc
import pytest

import hv
from hv.qemu import QemuHypervisor

from .conftest import Nodes, instance, wait_status

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

BANNER = b"herd-dirty-kernel: dirtying memory"
MARK = b"."  # the guest writes one after each sweep over its RAM
SWEPT = (256 - 4) << 20  # bytes that sweep rewrites: all its RAM above 4 MiB


async def _boot(nodes: Nodes, kernel: Path, bandwidth: int, *, measure: bool = False) -> tuple[hv.Instance, QemuHypervisor, float]:
    """Boot the dirty guest on a fresh ``src`` node; with ``measure``, also its sweeps over RAM per second."""
    src = nodes.make("src")
    inst = instance(mem=256, kernel_path=str(kernel), migration_bandwidth=bandwidth)
    # Start paused so that the console is attached before the kernel prints.
    await src.start_instance(inst, startup_paused=True)
    console = await src.get_instance_console(inst)
    assert console.path is not None
    async with await anyio.connect_unix(console.path) as stream:
        await src.qmp_command("vm1", "cont")
        seen = b""
        with anyio.fail_after(20):
            while BANNER not in seen:
                seen += await stream.receive()
        rate = await _sweep_rate(stream) if measure else 0.0
    return inst, src, rate


async def _sweep_rate(stream: anyio.abc.ByteReceiveStream) -> float:
    """The guest's sweeps per second on this machine now, from its marks (one per sweep) on the console.

    Counted from the first mark seen, over at least a second and three sweeps,
    so that the scheduling of this process does not dominate the measurement.
    """
    with anyio.fail_after(30):
        while MARK not in await stream.receive():
            pass
        began = anyio.current_time()
        sweeps = 0
        while True:
            sweeps += (await stream.receive()).count(MARK)
            elapsed = anyio.current_time() - began
            if sweeps >= 3 and elapsed >= 1.0:
                return sweeps / elapsed


async def test_dirty_guest_does_not_converge_then_cancel(nodes: Nodes, dirty_kernel: Path) -> None:
    inst, src, sweeps_per_s = await _boot(nodes, dirty_kernel, bandwidth=256, measure=True)
    # The guest must re-dirty all its RAM during each pass: a pass at this bandwidth
    # takes at least four of its sweeps, as measured now (the machine may be busy),
    # and never more than the 256 MiB/s the test was written for.
    bandwidth = max(1 << 20, min(256 << 20, int(SWEPT * sweeps_per_s / 4)))  # 0 would mean unlimited
    dst = nodes.make("dst")
    info = await src.migration_info(inst)
    target = await dst.accept_instance(inst, info, "")
    await src.migrate_instance(inst, target, live=True)
    await src.qmp_command("vm1", "migrate-set-parameters", {"max-bandwidth": bandwidth})
    await src.set_migration_downtime(inst, 50)

    # A reading just after the 2nd and 3rd syncs (the driver's long poll wakes on
    # each MIGRATION_PASS event), each taken some time after its sync on a busy machine.
    pass_s = (256 << 20) / bandwidth
    readings = [
        await wait_status(src, inst, lambda s, n=n: (s.iterations or 0) >= n, timeout=20 + 2 * pass_s) for n in (2, 3)
    ]
    st = readings[-1]
    # By the third pass over RAM, the guest has re-dirtied most of it again.
    assert st.status == "active"
    assert st.ram_remaining > 128 << 20, st
    assert st.ram_transferred > st.ram_total  # it has been sending the same pages again

    # The link's average rate over each pass, by QEMU's clock, from the migration's
    # start (where QEMU's rate window starts too). What was sent after a reading's
    # sync (at most what is no longer dirty) is taken off, and the time is the
    # reading's (not earlier than the sync): so each is a lower bound, whatever
    # the delay between a sync and its reading.
    syncs = [(0, 0)] + [(r.ram_transferred - (r.ram_total - r.ram_remaining), r.total_time_ms or 0) for r in readings]
    pass_rates = [(b[0] - a[0]) / (b[1] - a[1]) * 1000 for a, b in zip(syncs, syncs[1:])]
    # QEMU counts distinct pages dirtied between syncs over a window of whole passes,
    # so the dirty rate saturates at RAM / pass time: the link's average over those
    # passes. Compared with the slowest pass, not with the instantaneous rate
    # (``rate_bps``), which on a busy machine swings away from the average.
    assert st.dirty_rate_bps and st.dirty_rate_bps > 0.8 * min(pass_rates), (pass_rates, st)
    # What may remain for a 50 ms downtime at this rate is far below what remains.
    assert st.ram_remaining > 10 * bandwidth * 0.050, st

    await src.cancel_migration(inst)
    assert (await src.get_migration_status(inst)).status == "cancelled"
    assert (await src.get_instance_info("vm1")).runstate == "running"
    await dst.finalize_migration_dst(inst, info, success=False)
    assert await dst.list_instances() == []


async def test_force_complete_finishes_a_non_converging_migration(nodes: Nodes, dirty_kernel: Path) -> None:
    inst, src, _ = await _boot(nodes, dirty_kernel, bandwidth=0)
    dst = nodes.make("dst")
    info = await src.migration_info(inst)
    target = await dst.accept_instance(inst, info, "")
    await src.migrate_instance(inst, target, live=True)
    await wait_status(src, inst, lambda s: (s.iterations or 0) >= 2, timeout=30)

    await src.force_complete_migration(inst)
    st = await wait_status(src, inst, lambda s: s.is_final, timeout=30)
    assert st.status == "completed"
    await dst.finalize_migration_dst(inst, info, success=True)  # resumes the paused arrival
    await src.finalize_migration_source(inst, success=True, live=True)
    moved = await dst.get_instance_info("vm1")
    assert moved is not None and moved.runstate == "running"
