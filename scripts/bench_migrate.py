"""Migration-job numbers: completion-notice latency, job wall vs driver time, cancel latency.

    .venv/bin/python scripts/bench_migrate.py [--runs 10] [--ssh] [--qemu]

* fake nodes (LocalTransport; ``--ssh``: each behind an SSH server): ``--runs``
  live migrations of a 256 MiB instance back and forth. *Completion notice*:
  from the fake source journaling the end of its stream (``stream-end`` in
  its events.jsonl, right before it wakes waiters) to the engine's progress
  event that says ``completed`` — how long the long-poll takes to notice.
  Then a cancel mid-copy: from ``cancel()`` to the job ``cancelled`` with the
  instance proven running on the source.
* ``--qemu``: real QEMU (TCG): one live migration (job wall time beside
  QEMU's own ``total-time``) and one cancel of a dirty-memory guest mid-copy.

Timestamps are the wall clock of one machine (the fake journal and the
engine's events both use it); durations measured here use anyio's clock.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path


import anyio
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hv  # noqa: E402
from engine import AdminState, Cluster, Engine, InstanceRecord, JobState, Migrate  # noqa: E402
from engine._log import configure_logging  # noqa: E402
from hv.fake import FakeHypervisor  # noqa: E402

MIB = 1024 * 1024


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]
    return f"median {statistics.median(xs):.1f} ms, p95 {p95:.1f} ms, max {xs[-1]:.1f} ms (n={len(xs)})"


async def fake_bench(base: Path, runs: int, ssh: bool) -> None:
    spec = hv.Instance(name="web1", beparams=hv.BeParams(minmem=256, maxmem=256, vcpus=1))
    records = {"web1": InstanceRecord(name="web1", spec=spec, primary="n1", admin_state=AdminState.UP)}

    async def body(engine: Engine, dirs: dict[str, Path]) -> None:
        for d in dirs.values():
            FakeHypervisor.configure(d, bandwidth=1024 * MIB)
        await engine.transport.node("n1").start_instance(spec)
        notice, walls, overhead, ratios = [], [], [], []
        for i in range(runs):
            src = (await engine.instance("web1")).primary
            dst = "n2" if src == "n1" else "n1"
            job_id = await engine.submit(Migrate(instance="web1", target=dst))
            job = await engine.wait(job_id)
            assert job.state is JobState.SUCCEEDED, job.error
            done = next(e for e in await engine.store.events(job_id) if e.kind == "progress" and e.data.get("status") == "completed")
            ends = [e for e in FakeHypervisor.read_events(dirs[src]) if e["event"] == "stream-end" and e.get("role") == "source"]
            notice.append((done.ts - ends[-1]["t"]) * 1000)
            walls.append(job.result["wall_time_s"] * 1000)
            overhead.append(job.result["wall_time_s"] * 1000 - job.result["total_time_ms"])
            ratios.append(job.result["wall_time_s"] * 1000 / max(1, job.result["total_time_ms"]))
        print(f"  completion notice (driver done -> job sees it): {stats(notice)}")
        print(f"  job wall time (256 MiB at 1 GiB/s):            {stats(walls)}")
        print(f"  job wall minus driver total-time:               {stats(overhead)}")
        print(f"  job wall / driver total-time (the baseline):    median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x")
        # cancel mid-copy
        for d in dirs.values():
            FakeHypervisor.configure(d, bandwidth=64 * MIB)
        latencies = []
        for _ in range(max(3, runs // 3)):
            src = (await engine.instance("web1")).primary
            dst = "n2" if src == "n1" else "n1"
            job_id = await engine.submit(Migrate(instance="web1", target=dst))
            async for ev in engine.watch(job_id):
                if ev.kind == "progress" and ev.data.get("percent", 0) > 10:
                    break
            began = anyio.current_time()
            state = await engine.cancel(job_id, "bench")
            latencies.append((anyio.current_time() - began) * 1000)
            assert state is JobState.CANCELLED
            assert (await engine.instance("web1")).primary == src
        print(f"  cancel -> rolled back (proven on the source):   {stats(latencies)}")

    if ssh:
        from transport.testing import LocalCluster

        async with LocalCluster(n=2, base_dir=base / "cluster") as lc:
            dirs = {n: lc.state_dir(n) for n in ("n1", "n2")}
            async with Engine.open(store=base / "ssh.db", cluster=Cluster(config=lc.config, instances=records), node_ping_interval=None) as engine:
                print("fake nodes over SSH (asyncssh servers, agent subprocesses):")
                await body(engine, dirs)
    else:
        from transport import LocalTransport

        dirs = {n: base / n for n in ("n1", "n2")}
        drivers = {n: FakeHypervisor(d, node=n) for n, d in dirs.items()}
        async with LocalTransport(drivers, owns_drivers=True) as transport:
            async with Engine.open(store=base / "local.db", cluster=Cluster(instances=records), transport=transport, node_ping_interval=None) as engine:
                print("fake nodes, LocalTransport (agents in-process):")
                await body(engine, dirs)


async def qemu_bench(base: Path) -> None:
    from tests.guest.build import build_dirty_kernel
    from transport import LocalTransport

    kernel = build_dirty_kernel(base / "guest")
    drivers = {n: hv.get_hypervisor("kvm", run_dir=base / n, node=n, qmp_timeout=5.0) for n in ("n1", "n2")}
    idle = hv.Instance(name="idle", hypervisor="kvm", hvparams={"accel": "tcg"}, beparams=hv.BeParams(minmem=256, maxmem=256, vcpus=1))
    dirty = hv.Instance(
        name="dirty", hypervisor="kvm", hvparams={"accel": "tcg", "kernel_path": str(kernel), "migration_bandwidth": 64},
        beparams=hv.BeParams(minmem=256, maxmem=256, vcpus=1),
    )
    dirty2 = msgspec.structs.replace(dirty, name="dirty2")
    records = {s.name: InstanceRecord(name=s.name, spec=s, primary="n1", admin_state=AdminState.UP) for s in (idle, dirty, dirty2)}
    async with LocalTransport(drivers, owns_drivers=True) as transport:
        async with Engine.open(store=base / "qemu.db", cluster=Cluster(instances=records), transport=transport, node_ping_interval=None) as engine:
            print("real QEMU (TCG), LocalTransport:")
            try:
                await drivers["n1"].start_instance(idle)
                began = anyio.current_time()
                job = await engine.wait(await engine.submit(Migrate(instance="idle", target="n2")))
                wall = (anyio.current_time() - began) * 1000
                assert job.state is JobState.SUCCEEDED, job.error
                r = job.result
                print(
                    f"  live migration, idle 256 MiB guest: job wall {wall:.0f} ms (submit -> final; run() alone {r['wall_time_s'] * 1000:.0f} ms), "
                    f"QEMU total-time {r['total_time_ms']} ms, downtime {r['downtime_ms']} ms"
                )
                await drivers["n1"].start_instance(dirty)
                await anyio.sleep(2.0)  # let the guest boot and start dirtying
                policy = {"stall_window": 1.0, "downtime_start_ms": 30, "downtime_step_ms": 30, "downtime_max_ms": 90, "on_timeout": "force-complete"}
                began = anyio.current_time()
                job = await engine.wait(await engine.submit(Migrate(instance="dirty", target="n2", policy=policy)))
                wall = (anyio.current_time() - began) * 1000
                assert job.state is JobState.SUCCEEDED, job.error
                r = job.result
                print(
                    f"  live migration, dirty 256 MiB guest at 64 MiB/s, policy force-complete: job wall {wall:.0f} ms, "
                    f"QEMU total-time {r['total_time_ms']} ms, downtime {r['downtime_ms']} ms, decisions {[d['action'] for d in r['decisions']]}"
                )
                await drivers["n1"].start_instance(dirty2)
                await anyio.sleep(2.0)
                job_id = await engine.submit(Migrate(instance="dirty2", target="n2", policy={"stall_window": 600.0}))
                async for ev in engine.watch(job_id):
                    if ev.kind == "progress" and ev.data.get("ram_transferred", 0) > 16 * MIB:
                        break
                began = anyio.current_time()
                state = await engine.cancel(job_id, "bench")
                print(f"  cancel mid-copy (dirty guest, 64 MiB/s) -> {state.value}, instance proven on n1: {(anyio.current_time() - began) * 1000:.0f} ms")
            finally:
                for d in drivers.values():
                    for name in ("idle", "dirty", "dirty2"):
                        with anyio.CancelScope(shield=True):
                            try:
                                await d.stop_instance(None, force=True, retry=True, name=name)
                            except hv.HypervisorError:
                                pass


async def main(args: argparse.Namespace) -> None:
    configure_logging(level="WARNING")
    with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp:
        base = Path(tmp)
        await fake_bench(base / "fake", args.runs, ssh=False)
        if args.ssh:
            await fake_bench(base / "fake-ssh", args.runs, ssh=True)
        if args.qemu:
            await qemu_bench(base / "qemu")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ssh", action="store_true", help="also over SSH")
    parser.add_argument("--qemu", action="store_true", help="also real QEMU (TCG)")
    anyio.run(main, parser.parse_args())
