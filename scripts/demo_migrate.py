"""The engine demo: a local cluster of fake nodes over SSH, and a live migration job.

Run by ``scripts/demo``. Three fake nodes each behind their own SSH server on
loopback (asyncssh; ``--local`` runs the agents in-process instead), an
engine with a SQLite store, an instance of ``--memory`` MiB, and a
``Migrate`` job watched live: its journaled steps, a progress line
(percent, sent/remaining, rate, dirty rate, ETA) and every policy decision.
Then ``VerifyCluster`` checks that the instance runs exactly once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

import hv
from engine import AdminState, Cluster, Engine, InstanceRecord, JobState, Migrate, VerifyCluster
from engine._log import configure_logging
from hv.fake import FakeHypervisor

MIB = 1024 * 1024


def progress_line(d: dict[str, Any]) -> str:
    rate = f"{d['rate_bps'] / MIB:6.0f} MiB/s" if d.get("rate_bps") else "     - MiB/s"
    dirty = f"{(d.get('dirty_rate_bps') or 0) / MIB:4.0f} MiB/s"
    eta = f"{d['eta_s']:5.1f}s" if d.get("eta_s") is not None else "    ?"
    return (
        f"  {d['status']:<9} {d['percent']:5.1f}%  sent {d['ram_transferred'] / MIB:6.0f} MiB  "
        f"left {d['ram_remaining'] / MIB:6.0f} MiB  {rate}  dirtying {dirty}  eta {eta}  "
        f"downtime<={d.get('downtime_limit_ms')} ms"
    )


async def run(args: argparse.Namespace, base: Path) -> int:
    tty = sys.stdout.isatty()
    spec = hv.Instance(name="web1", beparams=hv.BeParams(minmem=args.memory // 2, maxmem=args.memory, vcpus=2))
    records = {"web1": InstanceRecord(name="web1", spec=spec, primary="n1", admin_state=AdminState.UP)}
    policy = {"stall_window": 2.0, "downtime_step_ms": 300, "downtime_max_ms": 1500, "on_timeout": args.on_timeout}

    async def with_engine(cluster: Cluster, state_dirs: dict[str, Path], how: str, transport: Any = None) -> int:
        for d in state_dirs.values():
            FakeHypervisor.configure(d, bandwidth=args.bandwidth * MIB, dirty_rate=args.dirty_rate * MIB)
        print(f"cluster: {len(state_dirs)} fake nodes ({how}); store {base / 'herd.db'}")
        async with Engine.open(store=base / "herd.db", cluster=cluster, transport=transport, node_ping_interval=2.0) as engine:
            await engine.transport.node("n1").start_instance(spec)
            print(f"web1 ({args.memory} MiB) runs on n1; migrating it live to n2 ...")
            job_id = await engine.submit(Migrate(instance="web1", target="n2", policy=policy))

            async def cancel_later() -> None:
                await anyio.sleep(args.cancel_after)
                await engine.cancel(job_id, f"demo: cancelled after {args.cancel_after:g}s", wait=False)

            async with anyio.create_task_group() as tg:
                if args.cancel_after is not None:
                    tg.start_soon(cancel_later)
                last = ""
                async for ev in engine.watch(job_id):
                    if ev.kind == "progress" and ev.data.get("step") == "monitor":
                        last = progress_line(ev.data)
                        print(("\r" + last) if tty else last, end="" if tty else "\n", flush=True)
                        continue
                    if tty and last:
                        print()
                        last = ""
                    if ev.kind == "step-start":
                        print(f"  step {ev.data.get('step')} on {ev.data.get('node') or '-'}")
                    elif ev.kind == "step-end" and ev.data.get("state") != "succeeded":
                        print(f"  step {ev.data.get('step')}: {ev.data.get('state')} {ev.data.get('error') or ''}")
                    elif ev.kind in ("policy", "abort", "alarm", "point-of-no-return", "reconcile"):
                        detail = ev.data.get("reason") or ev.data.get("message") or ""
                        print(f"  [{ev.kind}] {ev.data.get('action', '')} {detail}")
                    elif ev.kind == "state":
                        print(f"  job {job_id}: {ev.data.get('state')}")
                tg.cancel_scope.cancel()  # the job is final: a pending cancel_later has nothing left to do
            job = await engine.wait(job_id)
            if job.state is JobState.SUCCEEDED:
                r = job.result
                print(
                    f"done: web1 on {r['node']}; job wall {r['wall_time_s']:.2f}s, driver total {r.get('total_time_ms')} ms, "
                    f"downtime {r.get('downtime_ms')} ms, {r.get('iterations')} passes"
                )
            else:
                print(f"job {job.state.value}: {job.error}")
            verify = await engine.wait(await engine.submit(VerifyCluster()))
            record = await engine.instance("web1")
            print(f"inventory: web1 primary {record.primary}; VerifyCluster: {'ok' if verify.result['ok'] else verify.result['problems']}")
            return 0 if verify.result["ok"] else 1

    if args.local:
        from transport import LocalTransport

        dirs = {n: base / n for n in ("n1", "n2", "n3")}
        drivers = {n: FakeHypervisor(d, node=n) for n, d in dirs.items()}
        async with LocalTransport(drivers, owns_drivers=True) as transport:
            return await with_engine(Cluster(instances=records), dirs, "agents in-process", transport)
    from transport.testing import LocalCluster

    async with LocalCluster(n=3, base_dir=base / "cluster", hypervisor="fake") as lc:
        dirs = {n: lc.state_dir(n) for n in ("n1", "n2", "n3")}
        return await with_engine(Cluster(config=lc.config, instances=records), dirs, "each behind its own SSH server on loopback")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=2048, help="instance RAM, MiB (default 2048)")
    parser.add_argument("--bandwidth", type=int, default=512, help="migration bandwidth, MiB/s (default 512)")
    parser.add_argument("--dirty-rate", type=int, default=64, help="guest dirty rate, MiB/s (default 64; above the bandwidth it never converges)")
    parser.add_argument("--on-timeout", choices=["abort", "force-complete"], default="abort", help="policy action when it does not converge")
    parser.add_argument("--cancel-after", type=float, default=None, help="cancel the job after this many seconds")
    parser.add_argument("--local", action="store_true", help="in-process agents instead of SSH")
    parser.add_argument("--verbose", action="store_true", help="the engine's own log lines on stderr")
    args = parser.parse_args(argv)
    configure_logging(level="INFO" if args.verbose else "WARNING")
    with tempfile.TemporaryDirectory(prefix="herd-demo-") as tmp:
        return anyio.run(run, args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
