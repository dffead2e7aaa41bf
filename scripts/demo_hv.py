"""A live migration between two fake nodes over real TCP, with live progress.

Run by ``scripts/demo``. Two nodes live in temporary directories; the
instance's 2 GiB of simulated memory really crosses a loopback TCP
connection, paced to the node's bandwidth while its guest re-dirties pages.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import anyio

import hv
from hv.fake import FakeHypervisor

MIB = 1024 * 1024


def progress_line(st: hv.MigrationStatus) -> str:
    rate = f"{st.rate_bps / MIB:7.0f} MiB/s" if st.rate_bps else "      - MiB/s"
    dirty = f"{(st.dirty_rate_bps or 0) / MIB:4.0f} MiB/s"
    passes = (st.iterations or 0) + (0 if st.is_final else 1)
    return (
        f"  {st.status:<9} {st.progress * 100:5.1f}%  sent {st.ram_transferred / MIB:6.0f} MiB"
        f"  remaining {st.ram_remaining / MIB:6.0f} MiB  {rate}  dirtying {dirty}  pass {passes}"
    )


async def show_node(node: FakeHypervisor) -> None:
    ni = await node.get_node_info()
    print(f"  node {node.node}: {ni.memory_free}/{ni.memory_total} MiB free, hv {ni.hv_name} {ni.hv_version}")
    infos = await node.get_all_instances_info()
    for info in infos:
        print(f"    {info.name}: {info.state.value} ({info.runstate}), {info.memory} MiB, {info.vcpus} vCPU")
    if not infos:
        print("    (no instances)")


async def demo(base: Path, memory_mib: int, bandwidth_mib: int, dirty_mib: int, force_after: int) -> int:
    FakeHypervisor.configure(base / "node1", bandwidth=bandwidth_mib * MIB, dirty_rate=dirty_mib * MIB)
    tty = sys.stdout.isatty()
    async with FakeHypervisor(base / "node1", node="node1") as src, FakeHypervisor(base / "node2", node="node2") as dst:
        spec = hv.Instance(name="web1", beparams=hv.BeParams(minmem=memory_mib, maxmem=memory_mib, vcpus=2))
        await src.start_instance(spec)
        print("before:")
        await show_node(src)
        await show_node(dst)
        info = await src.migration_info(spec)
        address = await dst.accept_instance(spec, info, "127.0.0.1")
        print(f"migrating web1 ({memory_mib} MiB) node1 -> node2 via {address}, "
              f"bandwidth {bandwidth_mib} MiB/s, guest dirtying {dirty_mib} MiB/s")
        await src.migrate_instance(spec, address, True)
        last_print = -1.0
        forced = False
        with anyio.fail_after(120):
            while True:
                st = await src.get_migration_status(spec, wait=1.0)
                now = anyio.current_time()
                if st.is_final or now - last_print >= (0.1 if tty else 0.25):
                    last_print = now
                    print(("\r" if tty else "") + progress_line(st), end="" if tty and not st.is_final else "\n", flush=True)
                if st.is_final:
                    break
                if not forced and (st.iterations or 0) >= force_after:
                    # The engine's convergence policy, in miniature: stop the guest so dirtying stops.
                    forced = True
                    print(("\n" if tty else "") + f"  not converged after {force_after} passes: pausing the guest to finish")
                    await src.force_complete_migration(spec)
        ok = st.succeeded
        if ok:
            print(f"completed in {st.total_time_ms} ms, downtime {st.downtime_ms} ms, "
                  f"{st.ram_transferred / MIB:.0f} MiB sent in {st.iterations} passes")
        else:
            print(f"migration {st.status}: {st.error}")
        await dst.finalize_migration_dst(spec, info, ok)
        await src.finalize_migration_source(spec, ok, True)
        print("after:")
        await show_node(src)
        await show_node(dst)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=2048, help="instance memory, MiB (default 2048)")
    parser.add_argument("--bandwidth", type=int, default=1024, help="migration bandwidth, MiB/s (default 1024)")
    parser.add_argument("--dirty-rate", type=int, default=256, help="guest dirty rate, MiB/s (default 256)")
    parser.add_argument("--force-after", type=int, default=3, help="pause the guest after this many passes (default 3)")
    args = parser.parse_args()
    for name in ("memory", "bandwidth", "force_after"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.dirty_rate < 0:
        parser.error("--dirty-rate must be >= 0")
    with tempfile.TemporaryDirectory(prefix="herd-demo-") as tmp:
        return anyio.run(demo, Path(tmp), args.memory, args.bandwidth, args.dirty_rate, args.force_after)


if __name__ == "__main__":
    sys.exit(main())
