"""``herd``: a thin command line over the Engine API (a skeleton; a later
issue adds live progress bars and the daemon/HTTP side).

One engine at a time runs a store's jobs (its owner): ``herd serve``, or a
``herd submit --wait`` when none runs; ``herd submit --no-wait`` starts a
background ``herd serve --exit-when-idle 10`` when none runs.
``list``/``show``/``watch`` read the store. ``cancel`` writes a cancel request
to the store: the engine running the job (in any process on this machine)
obeys it within ~0.15 s, and ``cancel`` waits, reading the store, until the
job is final.

Errors: every refusal is one line on stderr, ``herd: <what>: <where>: <what
to do>``, and nothing stored is changed. ``--debug`` (or ``HERD_DEBUG=1``)
also prints the traceback. Exit codes: 0 done; 1 refused (bad input, cluster
file or store; an unexpected error); 2 the submitted job ended failed or
cancelled; 3 ``cancel`` gave up waiting (the request stays recorded).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import anyio
import msgspec
import typer

from ._engine import Engine
from ._jobs import Event, Job, JobState
from ._ops import fields_from_pairs
from ._optable import op_from_dict
from ._store import SqliteStore
from .errors import EngineError, InvalidOperation, JobNotFound, shorten

app = typer.Typer(add_completion=False, help="herd: durable, cancellable VM jobs.", pretty_exceptions_enable=False)

#: Exit codes (README "CLI"): 0 done, 1 refused or error, 2 the job did not succeed, 3 cancel still waiting.
EXIT_OK, EXIT_REFUSED, EXIT_JOB_FAILED, EXIT_STILL_RUNNING = 0, 1, 2, 3
#: Job ids are SQLite integers: 1 … 2**63 - 1.
MAX_JOB_ID = 2**63 - 1


def _job_id(value: int) -> int:
    """Refuse a job id no job can have (instead of an OverflowError from SQLite)."""
    if not 1 <= value <= MAX_JOB_ID:
        raise typer.BadParameter(f"job ids are 1..{MAX_JOB_ID}, not {shorten(value)}")
    return value


JobIdArg = typer.Argument(..., callback=_job_id, help="the job's id (herd list shows them)")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="on an error, also print the traceback (or set HERD_DEBUG=1)"),
) -> None:
    """herd: durable, cancellable VM jobs."""
    if debug:
        os.environ["HERD_DEBUG"] = "1"

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


def _parse_args(args: list[str], kind: str = "operation") -> dict[str, Any]:
    """Operation fields from ``key=value`` words (values parsed as JSON when they can be).

    ``-`` in a key is ``_``; a field given twice, or ``kind=`` (the operation
    is the first argument), is refused by :func:`engine._ops.fields_from_pairs`.
    """
    pairs: list[tuple[str, Any]] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise InvalidOperation(f"{kind}: expected a field as key=value, got {shorten(arg)}")
        try:
            parsed: Any = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            parsed = value
        pairs.append((key.replace("-", "_"), parsed))
    return fields_from_pairs(kind, pairs)


#: The longest error line printed (a last guard: every echoed value is already cut by ``shorten``).
MAX_LINE = 400


def _one_line(message: str) -> str:
    """``message`` on one line (a line break in an error must not start a second), at most :data:`MAX_LINE` long."""
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "error"
    if len(line) > MAX_LINE:
        line = f"{line[: MAX_LINE - 40]}… ({len(line)} characters)"
    return line


def _debug() -> bool:
    return os.environ.get("HERD_DEBUG", "") not in ("", "0")


def _fail(message: str) -> None:
    """Refuse: one ``herd:`` line on stderr, exit 1 (with ``--debug``, the traceback first)."""
    if _debug() and sys.exc_info()[0] is not None:
        traceback.print_exc()
    typer.echo(f"herd: {_one_line(message)}", err=True)
    raise typer.Exit(EXIT_REFUSED)


def _existing(store: Path, *, readonly: bool = False) -> SqliteStore:
    """The store for a command on existing jobs (never created by reading it).

    ``readonly``: opened ``mode=ro`` — ``list``/``show``/``watch`` work on a
    store whose file and directory are not writable, and write nothing.
    """
    if store.is_dir():
        _fail(f"store {store} is a directory: give --store the SQLite file (e.g. {store / 'herd.db'})")
    if not store.is_file():
        _fail(f"no store at {store}: give --store the SQLite file of an existing store (herd submit creates one)")
    return SqliteStore(store, readonly=readonly)


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
        op = op_from_dict({"kind": kind, **_parse_args(args or [], kind)})
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

    states = []
    for name in state or []:
        try:
            states.append(JobState(name))
        except ValueError:
            _fail(f"--state {shorten(name)} is not a job state: give one of {', '.join(s.value for s in JobState)}")

    async def main() -> list[Job]:
        s = _existing(store, readonly=True)
        await s.open()
        try:
            return await s.list_jobs(states=states or None)
        finally:
            await s.aclose()

    try:
        jobs = anyio.run(main)
    except EngineError as err:
        _fail(str(err))
    for job in jobs:
        _emit(job, as_json, _job_line(job))


@app.command()
def show(job_id: int = JobIdArg, store: Path = StoreOpt, as_json: bool = JsonOpt) -> None:
    """A job with its steps."""

    async def main() -> Job:
        s = _existing(store, readonly=True)
        await s.open()
        try:
            return await s.get_job(job_id)
        finally:
            await s.aclose()

    try:
        job = anyio.run(main)
    except JobNotFound as err:
        _fail(f"{err} in store {store}: herd list shows the jobs")
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
def watch(
    job_id: int = JobIdArg,
    store: Path = StoreOpt,
    as_json: bool = JsonOpt,
    poll: float = typer.Option(0.2, help="seconds between reads (0 < poll <= 60)"),
) -> None:
    """Print a job's events until it is final (reads the store)."""
    if not 0 < poll <= 60:
        _fail(f"--poll must be a number of seconds with 0 < poll <= 60, not {shorten(poll)}")

    async def main() -> None:
        s = _existing(store, readonly=True)
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
    except JobNotFound as err:
        _fail(f"{err} in store {store}: herd list shows the jobs")
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


def _leaves(err: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, in order."""
    if isinstance(err, BaseExceptionGroup):
        return [leaf for sub in err.exceptions for leaf in _leaves(sub)]
    return [err]


def _describe(err: BaseException) -> tuple[str, bool]:
    """One line for an error, and whether it was unexpected (a bug, not bad input)."""
    from hv.errors import HypervisorError
    from transport.errors import TransportError

    leaves = _leaves(err)
    first = leaves[0]
    more = f" (and {len(leaves) - 1} more errors)" if len(leaves) > 1 else ""
    if isinstance(first, (EngineError, TransportError, HypervisorError)):
        return str(first) + more, False
    if isinstance(first, OSError):
        where = f": {first.filename}" if first.filename else ""
        return f"{first.strerror or first}{where}{more}", False
    if isinstance(first, OverflowError):
        return f"a number is out of range ({first}): job ids are 1..{MAX_JOB_ID}{more}", False
    if isinstance(first, sqlite3.Error):
        return f"store: sqlite: {first}{more}", False
    return f"unexpected error: {type(first).__name__}: {first}{more} (run with --debug for the traceback)", True


def _configure_logging() -> None:
    """The engine logs warnings and errors to stderr; ``HERD_LOG_LEVEL=info`` (or debug) shows more.

    (Events go to stdout; info lines on stderr would bury a one-line error.)
    """
    from ._log import configure_logging

    level = os.environ.get("HERD_LOG_LEVEL", "warning").strip() or "warning"
    if level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise InvalidOperation(
            f"environment HERD_LOG_LEVEL={shorten(level)} is not a log level: use debug, info, warning, error or critical"
        )
    configure_logging(level=level)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv``; return the exit code. Never lets a traceback out
    (unless ``--debug`` or ``HERD_DEBUG=1``): every error is one ``herd:`` line."""
    from typer._click.exceptions import ClickException

    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        args = [a for a in args[:end] if a != "--debug"] + args[end:]
        os.environ["HERD_DEBUG"] = "1"
    try:
        _configure_logging()
        result = app(args=args, prog_name="herd", standalone_mode=False)
    except ClickException as err:  # usage: unknown option, bad argument, bad job id
        message = _one_line(err.format_message()).rstrip(".")
        commands = getattr(typer.main.get_command(app), "commands", {})
        command = f"herd {args[0]} --help" if args and args[0] in commands else "herd --help"
        typer.echo(f"herd: {message} (see {command})", err=True)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        typer.echo("herd: interrupted", err=True)
        return 130
    except Exception as err:
        message, _unexpected = _describe(err)
        if _debug():
            traceback.print_exception(err)
        typer.echo(f"herd: {_one_line(message)}", err=True)
        return EXIT_REFUSED
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
