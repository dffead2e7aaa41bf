#!/usr/bin/env python3
"""Benchmark the transport against an in-run baseline.

    .venv/bin/python scripts/bench_transport.py [--n 2000] [--server asyncssh|sshd] [--setups 10]

Starts one local node (a real SSH server on loopback), then measures in the
same run and over the same kind of channel (an SSH exec session to a child
process on the node):

- ``ping`` round-trip through SshTransport (JSON frame → agent → reply);
- a raw asyncssh echo: one line written to ``cat`` on the node and read back;
- ``ping`` through LocalTransport (no SSH), for scale;
- connection set-up: SshTransport connect + agent start + hello, against a
  raw asyncssh connect + ``cat`` session.

Prints a table (median, p99) and the ping/echo ratio.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import anyio
import asyncssh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import transport  # noqa: E402
from transport.ssh import load_known_hosts  # noqa: E402
from transport.testing import LocalCluster  # noqa: E402


#: ``ping`` is answered by the agent, not the driver: any driver will do.
HYPERVISOR = "tests.transport.drivers:RecordingHypervisor"


def _stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return statistics.median(ordered), p99


async def _timed(n: int, once) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(n):
        t0 = anyio.current_time()
        await once()
        samples.append(anyio.current_time() - t0)
    return samples


async def bench(n: int, server: str, setups: int) -> None:
    with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp:
        async with LocalCluster(n=1, base_dir=Path(tmp) / "c", hypervisor=HYPERVISOR, server=server) as lc:
            assert lc.config is not None
            cfg, node = lc.config, lc.config.nodes["n1"]
            rows: list[tuple[str, list[float]]] = []

            # --- ping over SSH -------------------------------------------------
            async with transport.SshTransport(cfg) as t:
                client = t.node("n1")
                await client.ping()
                for _ in range(setups - 1):
                    await t.drop_connection("n1")
                    await client.ping()
                rows.append(("setup: SshTransport connect+agent hello", list(t.setup_times["n1"])))
                for _ in range(50):
                    await client.ping()  # warm-up
                rows.append(("ping via SshTransport", await _timed(n, client.ping)))

            # --- raw asyncssh echo on the same kind of channel ------------------
            setup_samples = []
            for i in range(setups):
                t0 = anyio.current_time()
                ssh = cfg.ssh_settings(node.name)
                conn = await asyncssh.connect(ssh.host, **ssh.asyncssh_options(load_known_hosts(cfg, node)))
                proc = await conn.create_process(shlex.join(["cat"]), encoding=None)
                proc.stdin.write(b"x\n")
                await proc.stdout.readline()
                setup_samples.append(anyio.current_time() - t0)
                if i < setups - 1:
                    proc.close()
                    conn.close()
                    await conn.wait_closed()
            rows.insert(1, ("setup: raw asyncssh connect+cat session", setup_samples))
            line = b'{"v":1,"id":1,"method":"ping","params":{}}\n'

            async def echo() -> None:
                proc.stdin.write(line)
                await proc.stdout.readline()

            for _ in range(50):
                await echo()
            rows.append(("raw asyncssh echo (cat)", await _timed(n, echo)))
            proc.close()
            conn.close()
            await conn.wait_closed()

    # --- in-process, for scale -------------------------------------------------
    from tests.transport.drivers import RecordingHypervisor

    with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp:
        async with transport.LocalTransport({"n1": RecordingHypervisor(tmp, node="n1")}) as lt:
            local = lt.node("n1")
            for _ in range(50):
                await local.ping()
            rows.append(("ping via LocalTransport", await _timed(n, local.ping)))

    print(f"\nserver: {server}; {n} round trips; {setups} connection set-ups; python {sys.version.split()[0]}")
    print(f"{'measure':44} {'median ms':>10} {'p99 ms':>10} {'n':>6}")
    for name, samples in rows:
        med, p99 = _stats(samples)
        print(f"{name:44} {med * 1e3:10.3f} {p99 * 1e3:10.3f} {len(samples):6d}")
    ping_med = _stats(dict(rows)["ping via SshTransport"])[0]
    echo_med = _stats(dict(rows)["raw asyncssh echo (cat)"])[0]
    print(f"\nping/echo median ratio: {ping_med / echo_med:.2f}x (overhead {1e3 * (ping_med - echo_med):.3f} ms per call)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="round trips per measure")
    parser.add_argument("--setups", type=int, default=10, help="connection set-ups to time")
    parser.add_argument("--server", choices=["asyncssh", "sshd"], default="asyncssh")
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    anyio.run(bench, args.n, args.server, args.setups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
