"""An engine in its own process, for the crash tests (SIGKILL at a chosen step).

    python -m tests.engine.engine_proc --store S --cluster C [--submit JSON]... [--exit-when-done]

Opens an engine on the store and cluster file, submits each operation
(JSON with a ``kind``), and prints one JSON line per event of those jobs on
stdout (flushed), so the test can kill it the moment a step starts. It runs
until killed, or until every submitted job is final with ``--exit-when-done``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio
import msgspec

from engine import Engine
from engine._log import configure_logging
from engine._optable import op_from_dict


def _print(data: object) -> None:
    sys.stdout.write(json.dumps(msgspec.to_builtins(data)) + "\n")
    sys.stdout.flush()


async def main(store: Path, cluster: Path, submits: list[str], exit_when_done: bool) -> None:
    async with Engine.open(store=store, cluster=cluster, node_ping_interval=None) as engine:
        ids = []
        for text in submits:
            job_id = await engine.submit(op_from_dict(json.loads(text)))
            ids.append(job_id)
            _print({"submitted": job_id})
        async with anyio.create_task_group() as tg:
            for job_id in ids:

                async def follow(j: int = job_id) -> None:
                    async for ev in engine.watch(j):
                        _print(ev)

                tg.start_soon(follow)
        _print({"all-final": ids})
        if not exit_when_done:
            await anyio.sleep_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--cluster", type=Path, required=True)
    parser.add_argument("--submit", action="append", default=[])
    parser.add_argument("--exit-when-done", action="store_true")
    args = parser.parse_args()
    configure_logging(json=True, level="WARNING")
    anyio.run(main, args.store, args.cluster, args.submit, args.exit_when_done)
