"""Live migration between two fake nodes over real TCP: progress, convergence, breakage."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import anyio
import anyio.abc
import pytest

import hv
from hv.fake import FakeHypervisor, TcpStreamFactory

from .conftest import MIB, KillableProxy, NodeFactory, inst, split_address, wait_status

ROOT = Path(__file__).resolve().parents[2]


def states(node: FakeHypervisor) -> dict[str, str]:
    return {n: r.state.value for n in node.state.names() if (r := node.state.read(n)) is not None}


async def prepare(make_node: NodeFactory, tmp_path: Path, spec: hv.Instance, **settings: object) -> tuple[FakeHypervisor, FakeHypervisor, str, str]:
    src, dst = make_node("src", memory_total=1024), make_node("dst", memory_total=1024)
    if settings:
        FakeHypervisor.configure(tmp_path / "src", **settings)
    await src.start_instance(spec)
    info = await src.migration_info(spec)
    address = await dst.accept_instance(spec, info, "127.0.0.1")
    return src, dst, info, address


@pytest.mark.asyncio
async def test_live_migration_over_tcp_moves_the_bytes(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 48)
    src, dst, info, address = await prepare(make_node, tmp_path, spec, bandwidth=64 * MIB, dirty_rate=8 * MIB)
    assert (await dst.get_node_info()).memory_free == 1024 - 48  # the incoming instance holds its memory
    assert (await dst.get_instance_info("web1")).runstate == "inmigrate"  # type: ignore[union-attr]
    async with anyio.create_task_group() as tg:
        proxy = KillableProxy(*split_address(address))
        port = await tg.start(proxy.run)
        await src.migrate_instance(spec, f"tcp:127.0.0.1:{port}", True)
        seen = await wait_status(src, spec, lambda s: s.is_final)
        seen_at = time.time()  # the journal's clock (wall time), only to measure the latency
        proxy.kill()
    final = seen[-1]
    assert final.status == "completed", final
    ended = [e["t"] for e in FakeHypervisor.read_events(tmp_path / "src") if e["event"] == "stream-end"]
    assert len(ended) == 1 and abs(seen_at - ended[0]) < 0.05  # the long-poll saw completion at once
    active = [s for s in seen if s.status == "active"]
    assert len(active) >= 3
    sent = [s.ram_transferred for s in active]
    assert sent == sorted(sent) and sent[0] < sent[-1]  # progress observed rising
    assert all(s.ram_total == 48 * MIB for s in seen)
    assert any(s.rate_bps and 30 * MIB < s.rate_bps < 100 * MIB for s in active)
    assert final.ram_transferred > 48 * MIB  # dirty pages were sent again
    assert proxy.forwarded >= final.ram_transferred  # real bytes crossed the wire
    assert final.iterations is not None and final.iterations >= 2
    assert final.downtime_ms is not None and final.total_time_ms is not None and final.downtime_ms <= final.total_time_ms
    assert 600 <= final.total_time_ms < 3000  # paced to the bandwidth
    # Completed: the source waits paused (QEMU's postmigrate) and the target holds it ready.
    assert (await src.get_instance_info("web1")).runstate == "postmigrate"  # type: ignore[union-attr]
    assert states(dst) == {"web1": "paused"}
    await dst.finalize_migration_dst(spec, info, True)
    await src.finalize_migration_source(spec, True, True)
    assert states(src) == {} and states(dst) == {"web1": "running"}  # exactly one side runs
    assert (await src.get_node_info()).memory_free == 1024
    for node, role in ((tmp_path / "src", "source"), (tmp_path / "dst", "target")):
        ends = [e for e in FakeHypervisor.read_events(node) if e["event"] == "stream-end"]
        assert [(e["role"], e["status"]) for e in ends] == [(role, "completed")]


@pytest.mark.asyncio
async def test_stream_killed_mid_migration(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 64)
    src, dst, info, address = await prepare(make_node, tmp_path, spec, bandwidth=64 * MIB)
    async with anyio.create_task_group() as tg:
        proxy = KillableProxy(*split_address(address))
        port = await tg.start(proxy.run)
        await src.migrate_instance(spec, f"tcp:127.0.0.1:{port}", True)
        await wait_status(src, spec, lambda s: s.progress >= 0.3)
        proxy.kill()
        seen = await wait_status(src, spec, lambda s: s.is_final)
    final = seen[-1]
    assert final.status == "failed" and final.error, final
    assert 0.3 * 64 * MIB <= final.ram_transferred < 64 * MIB
    assert states(src) == {"web1": "running"}  # the source never stopped
    target = await wait_status(dst, spec, lambda s: s.is_final)
    assert target[-1].status == "failed" and "broke" in (target[-1].error or "")
    with pytest.raises(hv.MigrationError, match="failed.*target cleaned up"):
        await dst.finalize_migration_dst(spec, info, True)
    await dst.finalize_migration_dst(spec, info, False)  # idempotent
    assert states(dst) == {} and (await dst.get_node_info()).memory_free == 1024
    with pytest.raises(hv.MigrationError, match="'failed', not completed"):
        await src.finalize_migration_source(spec, True, True)
    await src.finalize_migration_source(spec, False, True)
    assert states(src) == {"web1": "running"}


@pytest.mark.asyncio
async def test_closed_port_fails_the_migration(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 16)
    src, dst, info, address = await prepare(make_node, tmp_path, spec)
    await dst.finalize_migration_dst(spec, info, False)  # the target gave up: its port is closed
    assert states(dst) == {}
    await src.migrate_instance(spec, address, True)
    st = await src.get_migration_status(spec)
    assert st.status == "failed" and "cannot connect" in (st.error or ""), st
    assert states(src) == {"web1": "running"}
    with pytest.raises(hv.MigrationError, match="bad migration target"):
        await src.migrate_instance(spec, "tcp:127.0.0.1:0", True)


@pytest.mark.asyncio
async def test_non_converging_migration_and_the_convergence_controls(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 8, hvparams={"migration_downtime": 1})
    src, dst, info, address = await prepare(make_node, tmp_path, spec, bandwidth=32 * MIB, dirty_rate=64 * MIB)
    await src.migrate_instance(spec, address, True)
    seen = await wait_status(src, spec, lambda s: (s.iterations or 0) >= 4)
    assert seen[-1].status == "active" and seen[-1].ram_remaining > 0  # dirtying outruns the link
    assert seen[-1].dirty_rate_bps == 64 * MIB and (seen[-1].expected_downtime_ms or 0) > 1
    await src.set_migration_downtime(spec, 10_000)  # accept a long pause: it converges
    seen = await wait_status(src, spec, lambda s: s.is_final)
    assert seen[-1].status == "completed"
    await dst.finalize_migration_dst(spec, info, True)
    await src.finalize_migration_source(spec, True, True)
    assert states(src) == {} and states(dst) == {"web1": "running"}
    with pytest.raises(hv.MigrationError, match="no migration in progress"):
        await dst.set_migration_downtime(spec, 10)
    with pytest.raises(hv.ParameterError, match="positive integer"):
        await dst.set_migration_downtime(spec, 0)


@pytest.mark.asyncio
async def test_force_complete_pauses_the_guest(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 8, hvparams={"migration_downtime": 1})
    src, dst, info, address = await prepare(make_node, tmp_path, spec, bandwidth=32 * MIB, dirty_rate=64 * MIB)
    await src.migrate_instance(spec, address, True)
    await wait_status(src, spec, lambda s: (s.iterations or 0) >= 2)
    forced_at = anyio.current_time()
    await src.force_complete_migration(spec)
    assert states(src) == {"web1": "paused"}
    seen = await wait_status(src, spec, lambda s: s.is_final)
    assert seen[-1].status == "completed"
    # The downtime counts from the pause, not from the last few bytes.
    assert seen[-1].downtime_ms is not None
    assert seen[-1].downtime_ms >= 0.9 * (anyio.current_time() - forced_at) * 1000 - 50
    # A completed migration is never undone on the source: the target may run.
    with pytest.raises(hv.MigrationError, match="refusing to resume"):
        await src.finalize_migration_source(spec, False, True)
    assert states(src) == {"web1": "paused"}
    await dst.finalize_migration_dst(spec, info, True)
    await src.finalize_migration_source(spec, True, True)
    assert states(src) == {} and states(dst) == {"web1": "running"}


@pytest.mark.asyncio
async def test_cancel_migration_keeps_the_source(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 8)
    src, dst, info, address = await prepare(make_node, tmp_path, spec, bandwidth=32 * MIB, dirty_rate=64 * MIB)
    await src.migrate_instance(spec, address, False)  # non-live: the guest is paused for it
    assert states(src) == {"web1": "paused"}
    await wait_status(src, spec, lambda s: s.ram_transferred > 0)
    await src.cancel_migration(spec)
    st = await src.get_migration_status(spec)
    assert st.status == "cancelled" and "cancel_migration" in (st.error or "")
    assert states(src) == {"web1": "running"}  # resumed: the migration had paused it
    assert (await wait_status(dst, spec, lambda s: s.is_final))[-1].status == "failed"
    await dst.finalize_migration_dst(spec, info, False)
    await src.finalize_migration_source(spec, False, False)
    assert states(src) == {"web1": "running"} and states(dst) == {}


class GatedFactory(TcpStreamFactory):
    """Real TCP whose connect waits for a gate: a slow network path."""

    def __init__(self) -> None:
        self.gate = anyio.Event()

    async def connect(self, host: str, port: int) -> anyio.abc.ByteStream:
        await self.gate.wait()
        return await super().connect(host, port)


@pytest.mark.asyncio
async def test_cancelled_migrate_call_fails_the_migration(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 8)
    src = make_node("src", stream_factory=GatedFactory())
    dst = make_node("dst")
    await src.start_instance(spec)
    info = await src.migration_info(spec)
    address = await dst.accept_instance(spec, info, "")
    with anyio.move_on_after(0.1) as scope:
        await src.migrate_instance(spec, address, False)
    assert scope.cancelled_caught
    st = await src.get_migration_status(spec)
    assert st.status == "cancelled" and "migrate_instance was cancelled" in (st.error or "")
    await src.finalize_migration_source(spec, False, False)
    assert states(src) == {"web1": "running"}
    events = FakeHypervisor.read_events(tmp_path / "src")
    assert [e["event"] for e in events if e.get("method") == "migrate_instance"] == ["start", "cancelled"]
    assert [e["status"] for e in events if e["event"] == "stream-end"] == ["cancelled"]
    await dst.finalize_migration_dst(spec, info, False)
    assert states(dst) == {}


async def read_line(proc: anyio.abc.Process) -> str:
    assert proc.stdout is not None
    line = b""
    with anyio.fail_after(20):
        while not line.endswith(b"\n"):
            line += await proc.stdout.receive()
    return line.decode().strip()


def node_process(role: str, state_dir: Path, node: str, arg: str) -> list[str]:
    return [sys.executable, "-m", "tests.hv_fake._node_process", role, str(state_dir), node, arg]


@pytest.mark.asyncio
async def test_target_agent_killed_mid_migration(make_node: NodeFactory, tmp_path: Path) -> None:
    """The target node's agent dies (SIGKILL); a restarted driver reports the migration failed."""
    spec = inst("web1", 64)
    src = make_node("src")
    FakeHypervisor.configure(tmp_path / "src", bandwidth=64 * MIB)
    await src.start_instance(spec)
    info = await src.migration_info(spec)
    async with await anyio.open_process(node_process("target", tmp_path / "dst", "dst", info), cwd=ROOT) as proc:
        try:
            await src.migrate_instance(spec, await read_line(proc), True)
            await wait_status(src, spec, lambda s: s.progress >= 0.2)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    final = (await wait_status(src, spec, lambda s: s.is_final))[-1]
    assert final.status == "failed" and states(src) == {"web1": "running"}
    dst = make_node("dst")  # the restarted agent's driver
    st = await dst.get_migration_status(spec)
    assert st.status == "failed" and "previous driver" in (st.error or "")
    assert any(e["event"] == "recovered" for e in FakeHypervisor.read_events(tmp_path / "dst"))
    await dst.finalize_migration_dst(spec, info, False)
    await src.finalize_migration_source(spec, False, True)
    assert states(dst) == {} and states(src) == {"web1": "running"}


@pytest.mark.asyncio
async def test_source_agent_killed_mid_migration(make_node: NodeFactory, tmp_path: Path) -> None:
    """The source's agent dies mid-stream: the target fails; the restarted source runs the instance."""
    spec = inst("web1", 64)
    dst = make_node("dst")
    FakeHypervisor.configure(tmp_path / "src", bandwidth=64 * MIB)
    info = '{"spec":{"name":"web1","beparams":{"minmem":64,"maxmem":64,"vcpus":1}},"memory":64,"vcpus":1,"hv_version":"1.0"}'
    address = await dst.accept_instance(spec, info, "")
    async with await anyio.open_process(node_process("source", tmp_path / "src", "src", address), cwd=ROOT) as proc:
        try:
            assert await read_line(proc) == "migrating"
            await wait_status(dst, spec, lambda s: s.ram_transferred >= 0.2 * 64 * MIB)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    target = (await wait_status(dst, spec, lambda s: s.is_final))[-1]
    assert target.status == "failed" and "broke" in (target.error or "")
    src = make_node("src")  # the restarted agent's driver
    st = await src.get_migration_status(spec)
    assert st.status == "failed" and "previous driver" in (st.error or "")
    assert states(src) == {"web1": "running"}
    await dst.finalize_migration_dst(spec, info, False)
    await src.finalize_migration_source(spec, False, True)
    assert states(dst) == {} and states(src) == {"web1": "running"}


@pytest.mark.asyncio
async def test_accept_checks(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 512)
    src, dst = make_node("src"), make_node("dst", memory_total=256)
    await src.start_instance(spec)
    info = await src.migration_info(spec)
    with pytest.raises(hv.MigrationError, match="not enough memory.*512 MiB"):
        await dst.accept_instance(spec, info, "")
    with pytest.raises(hv.MigrationError, match="malformed migration info"):
        await dst.accept_instance(spec, "{", "")
    with pytest.raises(hv.MigrationError, match="for instance 'web1', not 'db1'"):
        await dst.accept_instance(inst("db1"), info, "")
    FakeHypervisor.configure(tmp_path / "dst", memory_total=4096, hv_version="2.0")
    with pytest.raises(hv.MigrationError, match="not migration-compatible"):
        await dst.accept_instance(spec, info, "")
    assert states(dst) == {}
    FakeHypervisor.configure(tmp_path / "dst", hv_version="1.0")
    address = await dst.accept_instance(spec, info, "")
    assert address.startswith("tcp:127.0.0.1:")
    with pytest.raises(hv.MigrationError, match="already exists"):
        await dst.accept_instance(spec, info, "")


@pytest.mark.asyncio
async def test_non_live_migration_downtime_is_the_whole_migration(make_node: NodeFactory, tmp_path: Path) -> None:
    spec = inst("web1", 8)
    src, dst, info, address = await prepare(make_node, tmp_path, spec, bandwidth=32 * MIB, dirty_rate=64 * MIB)
    await src.migrate_instance(spec, address, False)
    assert (await src.get_instance_info("web1")).state is hv.HvInstanceState.PAUSED  # type: ignore[union-attr]
    final = (await wait_status(src, spec, lambda s: s.is_final))[-1]
    assert final.status == "completed" and final.iterations == 1  # a paused guest dirties nothing
    assert final.ram_transferred == 8 * MIB
    assert final.downtime_ms is not None and final.total_time_ms is not None
    assert final.downtime_ms >= 0.9 * final.total_time_ms >= 200
    await dst.finalize_migration_dst(spec, info, True)
    await src.finalize_migration_source(spec, True, False)
    assert states(src) == {} and states(dst) == {"web1": "running"}


@pytest.mark.asyncio
async def test_black_holed_stream_fails_after_the_stall_timeout(make_node: NodeFactory, tmp_path: Path) -> None:
    # Frozen after 16 MiB by bytes, not at a moment. Where the kernel's socket
    # buffers are small the source then stalls while sending; where they are huge
    # (gVisor's netstack here swallows the rest of the stream) it has "sent" it all
    # and stalls waiting for the acknowledgement. Either way the source must end
    # failed with a stall, never hang or claim success.
    spec = inst("web1", 64)
    src, dst, info, address = await prepare(make_node, tmp_path, spec, bandwidth=256 * MIB, stall_timeout=0.3, connect_timeout=1.0)
    FakeHypervisor.configure(tmp_path / "dst", stall_timeout=0.3)
    async with anyio.create_task_group() as tg:
        proxy = KillableProxy(*split_address(address), freeze_after=16 * MIB)
        port = await tg.start(proxy.run)
        await src.migrate_instance(spec, f"tcp:127.0.0.1:{port}", True)
        final = (await wait_status(src, spec, lambda s: s.is_final))[-1]
        target = (await wait_status(dst, spec, lambda s: s.is_final))[-1]
        assert proxy.frozen and proxy.forwarded < spec.beparams.maxmem * MIB
        proxy.kill()
    assert final.status == "failed", final
    assert (
        "stalled: sending made no progress for 0.3s" in (final.error or "")
        or "stalled: the target did not acknowledge the end of the stream within 1s" in (final.error or "")
    ), final
    assert target.status == "failed" and "stalled: receiving" in (target.error or ""), target
    assert states(src) == {"web1": "running"}
    await dst.finalize_migration_dst(spec, info, False)
    await src.finalize_migration_source(spec, False, True)
    assert states(src) == {"web1": "running"} and states(dst) == {}
