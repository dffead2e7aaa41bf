"""``herd``: a thin command line over the Engine API (a skeleton; a later
issue adds live progress bars and the daemon/HTTP side).

Without a daemon, ``herd submit`` runs the job in this process until it is
final (``--no-wait`` leaves it queued for the next engine to open the store).
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
from ._ops import fields_from_pairs, op_from_dict
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
        op = op_from_dict({"kind": kind, **_parse_args(args or [], kind)})
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
