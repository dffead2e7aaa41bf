"""The dirty-memory test guest (tests/guest): boots, and its migration does not converge.

Also exercises the convergence controls the engine's policy uses:
``set_migration_downtime``, ``cancel_migration``, ``force_complete_migration``.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import hv
from hv.qemu import QemuHypervisor

from .conftest import Nodes, instance, wait_status

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]

BANNER = b"herd-dirty-kernel: dirtying memory"


async def _boot(nodes: Nodes, kernel: Path, bandwidth: int) -> tuple[hv.Instance, QemuHypervisor]:
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
    return inst, src


async def test_dirty_guest_does_not_converge_then_cancel(nodes: Nodes, dirty_kernel: Path) -> None:
    inst, src = await _boot(nodes, dirty_kernel, bandwidth=256)
    dst = nodes.make("dst")
    info = await src.migration_info(inst)
    target = await dst.accept_instance(inst, info, "")
    await src.migrate_instance("cluster", inst, target, live=True)
    await src.set_migration_downtime(inst, 50)

    # By the third pass over RAM, the guest has re-dirtied most of it again.
    st = await wait_status(src, inst, lambda s: (s.iterations or 0) >= 3, timeout=30)
    assert st.status == "active"
    assert st.ram_remaining > 128 << 20, st
    # QEMU counts distinct pages dirtied between two syncs, so the measured dirty
    # rate saturates at RAM / pass time: i.e. about the transfer rate itself.
    assert st.dirty_rate_bps and st.rate_bps and st.dirty_rate_bps > 0.8 * st.rate_bps, st
    # What may remain for a 50 ms downtime at this rate is far below what remains.
    assert st.ram_remaining > 10 * st.rate_bps * 0.050
    assert st.ram_transferred > st.ram_total  # it has been sending the same pages again

    await src.cancel_migration(inst)
    assert (await src.get_migration_status(inst)).status == "cancelled"
    assert (await src.get_instance_info("vm1")).runstate == "running"
    await dst.finalize_migration_dst(inst, info, success=False)
    assert await dst.list_instances() == []


async def test_force_complete_finishes_a_non_converging_migration(nodes: Nodes, dirty_kernel: Path) -> None:
    inst, src = await _boot(nodes, dirty_kernel, bandwidth=0)
    dst = nodes.make("dst")
    info = await src.migration_info(inst)
    target = await dst.accept_instance(inst, info, "")
    await src.migrate_instance("cluster", inst, target, live=True)
    await wait_status(src, inst, lambda s: (s.iterations or 0) >= 2, timeout=30)

    await src.force_complete_migration(inst)
    st = await wait_status(src, inst, lambda s: s.is_final, timeout=30)
    assert st.status == "completed"
    await dst.finalize_migration_dst(inst, info, success=True)  # resumes the paused arrival
    await src.finalize_migration_source(inst, success=True, live=True)
    moved = await dst.get_instance_info("vm1")
    assert moved is not None and moved.runstate == "running"
