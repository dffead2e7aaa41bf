#!/usr/bin/env python3
"""Engine benchmark: submit→running latency and jobs/s for a trivial job.

The trivial job is ``Noop(steps=1)``: one journaled step, no node call, so
what is measured is the engine itself (store writes, scheduling, events).
The store is SQLite on disk. The baseline, measured in the same run on the
same disk and mode, is raw SQLite: one small INSERT + COMMIT per transaction.
A job costs five write transactions (submit; waiting+running; step start;
step end; final state). The store group-commits concurrent writes, so under
load ``raw commits/s ÷ jobs/s`` can drop below 5 when fsync dominates (FULL);
with NORMAL the engine's own CPU cost (Python, thread hops) dominates.

    .venv/bin/python scripts/bench_engine.py [--jobs 300] [--latency-samples 100] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import Cluster, Engine, JobState, Noop  # noqa: E402
from engine._log import configure_logging  # noqa: E402
from engine._store import SqliteStore  # noqa: E402
from transport import LocalTransport  # noqa: E402


def raw_sqlite(path: Path, n: int, synchronous: str) -> float:
    """Raw commits per second: one INSERT per BEGIN IMMEDIATE … COMMIT."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, ts REAL, data TEXT)")
        start = time.perf_counter()
        for i in range(n):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (ts, data) VALUES (?, ?)", (float(i), '{"state": "queued"}'))
            conn.execute("COMMIT")
        return n / (time.perf_counter() - start)
    finally:
        conn.close()


async def engine_bench(path: Path, jobs: int, samples: int, synchronous: str) -> dict[str, float]:
    store = SqliteStore(path, synchronous=synchronous)
    async with LocalTransport({}) as transport:
        async with Engine.open(store=store, cluster=Cluster(), transport=transport, node_ping_interval=None, max_running_jobs=64) as engine:
            # Latency, unloaded: submit one job, time until its running event arrives.
            latencies = []
            for _ in range(samples):
                t0 = time.perf_counter()
                job_id = await engine.submit(Noop(steps=1))
                async for ev in engine.watch(job_id):
                    if ev.kind == "state" and ev.data["state"] == "running":
                        latencies.append(time.perf_counter() - t0)
                        break
                await engine.wait(job_id)
            # Throughput: submit many at once, wait for all.
            t0 = time.perf_counter()
            ids = []
            async with anyio.create_task_group() as tg:

                async def one() -> None:
                    job_id = await engine.submit(Noop(steps=1))
                    ids.append(job_id)
                    job = await engine.wait(job_id)
                    assert job.state is JobState.SUCCEEDED, job

                for _ in range(jobs):
                    tg.start_soon(one)
            elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "latency_median_ms": statistics.median(latencies) * 1000,
        "latency_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "jobs_per_s": jobs / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--latency-samples", type=int, default=100)
    parser.add_argument("--raw-commits", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the store files go (default: a temp dir on disk)")
    args = parser.parse_args()
    configure_logging(level="WARNING")
    base = args.dir or Path(tempfile.mkdtemp(prefix="herd-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    base.mkdir(parents=True, exist_ok=True)
    print(f"store directory: {base}")
    print(f"rounds: {args.rounds} (each figure is the median over rounds; raw and engine interleaved, same disk)")
    for mode in ("FULL", "NORMAL"):
        raws, results = [], []
        for r in range(args.rounds):
            raws.append(raw_sqlite(base / f"raw-{mode}-{r}.db", args.raw_commits, mode))
            results.append(anyio.run(engine_bench, base / f"engine-{mode}-{r}.db", args.jobs, args.latency_samples, mode))
        raw = statistics.median(raws)
        result = {k: statistics.median(res[k] for res in results) for k in results[0]}
        print(
            f"synchronous={mode:<6}  raw SQLite: {raw:8.0f} commits/s ({1000 / raw:.3f} ms/commit) | "
            f"engine: submit→running median {result['latency_median_ms']:.2f} ms, p99 {result['latency_p99_ms']:.2f} ms "
            f"({result['latency_median_ms'] / (1000 / raw):.1f}× one commit); "
            f"{result['jobs_per_s']:.0f} jobs/s (raw commits/s ÷ jobs/s = {raw / result['jobs_per_s']:.1f}; a job is 5 write transactions)"
        )


if __name__ == "__main__":
    main()
