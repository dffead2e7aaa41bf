"""``herd``: a thin command line over the Engine API (a skeleton; a later
issue adds live progress bars and the daemon/HTTP side).

One engine at a time runs a store's jobs (its owner): ``herd serve``, or a
``herd submit --wait`` when none runs; ``herd submit --no-wait`` starts a
background ``herd serve --exit-when-idle 10`` when none runs.
``list``/``show``/``watch`` read the store. ``cancel`` writes a cancel request
to the store: the engine running the job (in any process on this machine)
obeys it within ~0.15 s, and ``cancel`` waits, reading the store, until the
job is final.
"""

from __future__ import annotations

import contextlib
import json
import os
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


def _say(message: str) -> None:
    typer.echo(f"herd: {message}", err=True)


def _pending(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if j.state in (JobState.QUEUED, JobState.WAITING)]


RUNNER_START_TIMEOUT = 10.0


async def _ensure_runner(store: Path, cluster: Path, *, only_if_pending: bool) -> dict[str, Any] | None:
    """Make sure an engine owns the store to run its queued jobs.

    If one does, nothing to do; else start ``herd serve --exit-when-idle 10``
    detached (new session, stdin/stdout /dev/null, stderr appended to
    ``<store dir>/serve.log``, 0600) and wait until it owns the store. With
    ``only_if_pending``, only when queued/waiting jobs remain. Returns the
    owner's identity (None: nothing to run).
    """
    s = SqliteStore(store)
    await s.open()
    try:
        if only_if_pending and not _pending(await s.list_jobs(states=[JobState.QUEUED, JobState.WAITING])):
            return None
        owner = await s.owner()
        if owner is not None:
            return owner
        log_path = store.parent / "serve.log"
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(log_fd, 0o600)
            argv = [
                sys.executable, "-m", "engine.cli", "serve", "--exit-when-idle", "10",
                "--store", str(store.resolve()), "--cluster", str(cluster.resolve()),
            ]
            pid = os.posix_spawn(
                sys.executable, argv, dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log_fd, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(log_fd)
        with anyio.move_on_after(RUNNER_START_TIMEOUT):
            while True:
                owner = await s.owner()
                if owner is not None:
                    return owner
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break  # it exited without owning the store
                await anyio.sleep(0.05)
        raise EngineError(
            f"the background engine (herd serve, pid {pid}) did not start running jobs from {store} "
            f"within {RUNNER_START_TIMEOUT:g}s; see {log_path}"
        )
    finally:
        await s.aclose()


@app.command()
def submit(
    kind: str = typer.Argument(..., help="operation kind: start-instance, stop-instance, reboot-instance, …"),
    args: list[str] = typer.Argument(None, help="operation fields as key=value (JSON values)"),
    priority: int = typer.Option(0, "--priority", "-p", help="-20 (first) … 19 (last)"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="follow the job here until it is final"),
    store: Path = StoreOpt,
    cluster: Path = ClusterOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Submit an operation, e.g. ``herd submit stop-instance instance=web1 timeout=30``.

    The store's engine runs it: ``herd serve`` (or another ``herd submit``) if
    one runs on the store, else this process (``--wait``; it then finishes
    the other jobs it started before exiting, and hands queued ones to a
    background ``herd serve --exit-when-idle``), else, with ``--no-wait``, a
    background ``herd serve --exit-when-idle 10`` started here.
    """
    followed: dict[str, Any] = {}  # job id, and whether this process runs it (for Ctrl-C)

    async def main() -> int:
        op = op_from_dict({"kind": kind, **_parse_args(args or [])})
        if not wait:
            async with Engine.open(store=store, cluster=cluster, role="client", label="herd submit --no-wait") as engine:
                job_id = await engine.submit(op, priority=priority)
            await _ensure_runner(store, cluster, only_if_pending=False)
            _emit({"job_id": job_id}, as_json, f"job {job_id} queued")
            return 0
        owned = False
        async with Engine.open(store=store, cluster=cluster, label="herd submit") as engine:
            job_id = await engine.submit(op, priority=priority)
            followed.update(job_id=job_id, engine=engine)
            if not engine.is_owner:
                who = await engine.store.owner() or {}
                _say(f"engine pid {who.get('pid', '?')} runs this store; following job {job_id} there")
            async for ev in engine.watch(job_id):
                _emit(ev, as_json, _event_line(ev))
            job = await engine.wait(job_id)
            if not as_json:
                _emit(job, as_json, _job_line(job))
            owned = engine.is_owner
            if owned:

                def tell(ids: list[int]) -> None:
                    many = "jobs" if len(ids) > 1 else "job"
                    _say(f"finishing {len(ids)} other {many} this process started (ids {', '.join(map(str, ids))})")

                await engine.drain(on_wait=tell)
        if owned:
            # After the owner lock is released: a job a client queued meanwhile is seen here,
            # or that client saw no owner and started a runner itself.
            who = await _ensure_runner(store, cluster, only_if_pending=True)
            if who is not None:
                _say(f"queued jobs left to the store's engine (pid {who.get('pid', '?')})")
        return 0 if job.state is JobState.SUCCEEDED else 2

    try:
        code = anyio.run(main)
    except EngineError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        if not followed:
            raise
        job_id = followed["job_id"]
        if followed["engine"].is_owner:
            _say(f"interrupted: job {job_id} stays as it is in the store; the next engine to run the store (herd serve) recovers it")
        else:
            _say(f"stopped following job {job_id}; the store's engine still runs it (herd watch {job_id})")
        code = 130
    raise typer.Exit(code)


async def serve_store(store: Path, cluster: Path, *, exit_when_idle: float | None, label: str = "herd serve") -> None:
    """Own the store and run its jobs until SIGTERM/SIGINT, or until idle that long.

    Graceful: on a signal the engine stops and closes; jobs not started stay
    queued, jobs running are recovered by the next engine. While another
    engine owns the store this one waits (a standby) and takes over when it exits.
    """
    import signal

    while True:
        stop = False
        async with Engine.open(store=store, cluster=cluster, label=label) as engine:
            async with anyio.create_task_group() as tg:

                async def signals() -> None:
                    nonlocal stop
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                        async for signum in received:
                            engine.log.info("signal: stopping (jobs running are recovered by the next engine)", signal=signum)
                            stop = True
                            tg.cancel_scope.cancel()
                            return

                async def idle_watch() -> None:
                    assert exit_when_idle is not None
                    idle_since: float | None = None
                    while True:
                        now = anyio.current_time()
                        if not engine.idle:
                            idle_since = None
                        elif idle_since is None:
                            idle_since = now
                        elif now - idle_since >= exit_when_idle:
                            engine.log.info("idle: exiting", idle_seconds=exit_when_idle)
                            tg.cancel_scope.cancel()
                            return
                        await anyio.sleep(min(0.2, exit_when_idle / 4))

                tg.start_soon(signals)
                if exit_when_idle is not None:
                    tg.start_soon(idle_watch)
        if stop or exit_when_idle is None:
            return
        # Idle exit, owner lock released: a job queued in that instant has no engine; take it.
        s = SqliteStore(store)
        await s.open()
        try:
            if not _pending(await s.list_jobs(states=[JobState.QUEUED, JobState.WAITING])) or await s.owner() is not None:
                return
        finally:
            await s.aclose()


@app.command()
def serve(
    store: Path = StoreOpt,
    cluster: Path = ClusterOpt,
    exit_when_idle: Optional[float] = typer.Option(
        None, "--exit-when-idle", help="exit once no job has been active for this many seconds"
    ),
) -> None:
    """Run the store's jobs (its engine) until SIGTERM/SIGINT: what runs ``herd submit --no-wait`` jobs."""
    if exit_when_idle is not None and not exit_when_idle > 0:
        _fail(f"--exit-when-idle must be a positive number of seconds, not {exit_when_idle:g}")
    try:
        anyio.run(lambda: serve_store(store, cluster, exit_when_idle=exit_when_idle))
    except EngineError as err:
        _fail(str(err))


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
