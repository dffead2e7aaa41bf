"""``herd``: a thin command line over the Engine API (a skeleton; a later
issue adds live progress bars and the daemon/HTTP side).

Without a daemon, ``herd submit`` runs the job in this process until it is
final (``--no-wait`` leaves it queued for the next engine to open the store).
``list``/``show``/``watch`` read the store. ``cancel`` writes a cancel request
to the store: the engine running the job (in any process on this machine)
obeys it within ~0.15 s, and ``cancel`` waits, reading the store, until the
job is final.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import anyio
import msgspec
import typer

from ._engine import Engine
from ._jobs import Event, Job, JobState
from ._ops import op_from_dict
from ._store import SqliteStore
from .errors import EngineError

app = typer.Typer(add_completion=False, help="herd: durable, cancellable VM jobs.")

StoreOpt = typer.Option(Path(".herd/herd.db"), "--store", help="the job store (SQLite file)")
ClusterOpt = typer.Option(Path("cluster.toml"), "--cluster", help="the cluster file (nodes + instances)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output (JSON lines)")


def _emit(data: Any, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(msgspec.to_builtins(data)) + "\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _job_line(job: Job) -> str:
    extra = f"  error: {job.error}" if job.error else ""
    return f"{job.id:>6}  {job.state.value:<10}  p{job.priority:<3}  {job.op.summary()}{extra}"


def _event_line(ev: Event) -> str:
    fields = " ".join(f"{k}={v}" for k, v in ev.data.items())
    return f"#{ev.seq} job {ev.job_id} {ev.kind} {fields}"


def _parse_args(args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {arg!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def _fail(message: str) -> None:
    typer.echo(f"herd: {message}", err=True)
    raise typer.Exit(1)


def _existing(store: Path) -> SqliteStore:
    """The store for a read-only command (never created by reading it)."""
    if not store.is_file():
        _fail(f"no store at {store} (give --store)")
    return SqliteStore(store)


@app.command()
def submit(
    kind: str = typer.Argument(..., help="operation kind: start-instance, stop-instance, reboot-instance, …"),
    args: list[str] = typer.Argument(None, help="operation fields as key=value (JSON values)"),
    priority: int = typer.Option(0, "--priority", "-p", help="-20 (first) … 19 (last)"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="run the job here until it is final"),
    store: Path = StoreOpt,
    cluster: Path = ClusterOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Submit an operation, e.g. ``herd submit stop-instance instance=web1 timeout=30``."""

    async def main() -> int:
        op = op_from_dict({"kind": kind, **_parse_args(args or [])})
        async with Engine.open(store=store, cluster=cluster) as engine:
            job_id = await engine.submit(op, priority=priority)
            if not wait:
                _emit({"job_id": job_id}, as_json, f"job {job_id} queued")
                return 0
            async for ev in engine.watch(job_id):
                _emit(ev, as_json, _event_line(ev))
            job = await engine.wait(job_id)
            if not as_json:
                _emit(job, as_json, _job_line(job))
            return 0 if job.state is JobState.SUCCEEDED else 2

    try:
        code = anyio.run(main)
    except EngineError as err:
        _fail(str(err))
    raise typer.Exit(code)


@app.command("list")
def list_jobs(
    state: Optional[list[str]] = typer.Option(None, "--state", help="only jobs in this state (repeatable)"),
    store: Path = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List jobs."""

    async def main() -> list[Job]:
        s = _existing(store)
        await s.open()
        try:
            return await s.list_jobs(states=[JobState(x) for x in state] if state else None)
        finally:
            await s.aclose()

    try:
        jobs = anyio.run(main)
    except (EngineError, ValueError) as err:
        _fail(str(err))
    for job in jobs:
        _emit(job, as_json, _job_line(job))


@app.command()
def show(job_id: int, store: Path = StoreOpt, as_json: bool = JsonOpt) -> None:
    """A job with its steps."""

    async def main() -> Job:
        s = _existing(store)
        await s.open()
        try:
            return await s.get_job(job_id)
        finally:
            await s.aclose()

    try:
        job = anyio.run(main)
    except EngineError as err:
        _fail(str(err))
    lines = [_job_line(job)]
    if job.result is not None:
        lines.append(f"  result: {json.dumps(job.result)}")
    for st in job.steps:
        err = f"  {st.error}" if st.error else ""
        lines.append(f"  [{st.idx}] {st.name:<20} {st.state.value:<10} node={st.node} {st.args}{err}")
    _emit(job, as_json, "\n".join(lines))


@app.command()
def watch(job_id: int, store: Path = StoreOpt, as_json: bool = JsonOpt, poll: float = typer.Option(0.2, help="seconds between reads")) -> None:
    """Print a job's events until it is final (reads the store)."""

    async def main() -> None:
        s = _existing(store)
        await s.open()
        try:
            last = 0
            while True:
                for ev in await s.events(job_id, after=last):
                    last = ev.seq
                    _emit(ev, as_json, _event_line(ev))
                if (await s.get_job(job_id, steps=False)).final:
                    for ev in await s.events(job_id, after=last):
                        _emit(ev, as_json, _event_line(ev))
                    return
                await anyio.sleep(poll)
        finally:
            await s.aclose()

    try:
        anyio.run(main)
    except EngineError as err:
        _fail(str(err))


@app.command()
def cancel(
    job_id: int,
    reason: str = typer.Option("cancelled by operator", "--reason", help="recorded with the job"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds to wait for the job to become final"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until the job is final"),
    store: Path = StoreOpt,
    as_json: bool = JsonOpt,
    poll: float = typer.Option(0.2, help="seconds between reads of the store"),
    cluster: Optional[Path] = typer.Option(None, "--cluster", hidden=True, help="accepted for compatibility; not needed"),
) -> None:
    """Cancel a job, wherever it runs: e.g. a ``herd submit migrate … --wait`` in another shell.

    The request (reason, time) is written to the store; the engine running the
    job notices it within a fraction of a second, cancels the step in progress
    (on the node too), compensates, and ends the job ``cancelled``. A queued or
    waiting job that no engine is running is cancelled here, in the store. A
    running job whose engine is gone is settled by the next engine to open the
    store. Prints the state reached; exit 0 when final, 3 if still not final
    after ``--timeout`` (the request stays recorded).
    """

    async def main() -> tuple[Job, bool]:
        s = _existing(store)
        await s.open()
        try:
            now = time.time()
            job, _ = await s.request_cancel(job_id, reason, now=now)
            orphan = False
            if not job.final:
                async with s.no_engine_running() as idle:
                    if idle:
                        await s.cancel_pending_job(job_id, now=now)
                        orphan = True
            job = await s.get_job(job_id, steps=False)
            if not wait or job.final or orphan:
                return job, orphan
            with anyio.move_on_after(timeout):
                while not job.final:
                    await anyio.sleep(poll)
                    job = await s.get_job(job_id, steps=False)
            return job, False
        finally:
            await s.aclose()

    if not (timeout > 0 and poll > 0):
        _fail("--timeout and --poll must be positive")
    if not reason.strip():
        _fail("--reason must not be empty")
    try:
        job, orphan = anyio.run(main)
    except EngineError as err:
        _fail(str(err))
    data = {"job_id": job_id, "state": job.state.value, "cancel_reason": job.cancel_reason, "error": job.error}
    if job.final:
        why = f" ({job.error.message})" if job.error is not None else ""
        _emit(data, as_json, f"job {job_id}: {job.state.value}{why}")
        raise typer.Exit(0)
    if orphan:
        note = "no engine is running it; the next engine to open the store settles it (the cancel is recorded)"
    elif not wait:
        note = "cancel requested; the engine running it is cancelling it"
    else:
        note = f"still {job.state.value} after {timeout:g}s; the cancel is recorded and the engine running it will finish it"
    _emit({**data, "note": note}, as_json, f"job {job_id}: {job.state.value}: {note}")
    raise typer.Exit(0 if not wait else 3)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
