"""The job store: jobs, their journaled steps, events, and the inventory.

:class:`Store` is the interface (a server database can implement it later);
:class:`SqliteStore` is the embedded default.

SQLite choices, and why:
- WAL journal: readers never block the writer, and a commit is one append.
- ``synchronous=FULL`` by default: every commit is fsynced before the call
  returns, so a step journaled as *started* is on disk before the engine
  acts on a node — even across a power cut, not only a process kill (WAL +
  NORMAL survives a process kill too, but may lose the last commits on power
  loss; pass ``synchronous="NORMAL"`` to trade that for speed, see
  ``scripts/bench_engine.py`` for the cost).
- One connection, used by one thread at a time (a capacity limiter of one
  around ``anyio.to_thread.run_sync``): SQLite serialises writers anyway,
  and a single connection keeps transactions simple. Every write is one
  ``BEGIN IMMEDIATE … COMMIT``; a failure rolls the whole of it back, so a
  crash at any instant leaves each job either before or after a change,
  never half-written.
- The file is created 0600 (job data is not world-readable); schema changes
  are numbered migrations recorded in ``schema_migrations``.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
import stat
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import msgspec

from ._inventory import InstanceRecord, InventoryChange, apply_change
from ._jobs import TRANSITIONS, ErrorInfo, Event, Job, JobState, Step, StepState
from ._ops import Operation, decode_op, encode_op
from ._optable import BUILTIN_OPERATIONS
from .errors import InstanceNotKnown, JobNotFound, StoreError

T = TypeVar("T")

_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder()


def _dumps(value: Any) -> str | None:
    if value is None:
        return None
    return _json_enc.encode(msgspec.to_builtins(value)).decode()


def _loads(text: str | bytes | None) -> Any:
    return None if text is None else _json_dec.decode(text)


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A cancel persisted in the store (by any process), for the engine running the job."""

    seq: int
    job_id: int
    reason: str
    requested_at: float


class Store(abc.ABC):
    """What the engine needs from durable storage. Every method is one transaction."""

    # lifecycle
    @abc.abstractmethod
    async def open(self) -> None: ...
    @abc.abstractmethod
    async def aclose(self) -> None: ...
    @abc.abstractmethod
    async def schema_version(self) -> int: ...

    # jobs
    @abc.abstractmethod
    async def create_job(
        self, op: Operation, *, priority: int, depends_on: Sequence[int], parent_id: int | None, now: float
    ) -> tuple[Job, Event]: ...
    @abc.abstractmethod
    async def transition(
        self,
        job_id: int,
        states: Sequence[JobState],
        *,
        now: float,
        result: Any = None,
        error: ErrorInfo | None = None,
        data: dict[str, Any] | None = None,
    ) -> list[Event]:
        """Move the job through ``states`` in order (each must be allowed)."""
    @abc.abstractmethod
    async def request_cancel(self, job_id: int, reason: str, *, now: float) -> tuple[Job, Event | None]:
        """Persist the cancel reason (first one wins) and a cancel request; returns the job as stored."""
    @abc.abstractmethod
    async def cancel_requests(self, *, after: int = 0) -> list[CancelRequest]:
        """Cancel requests with ``seq > after``, oldest first (cheap: polled by running engines)."""
    @abc.abstractmethod
    async def last_cancel_request(self) -> int:
        """The newest cancel request's ``seq`` (0 if none)."""
    @abc.abstractmethod
    async def cancel_pending_job(self, job_id: int, *, now: float) -> list[Event]:
        """A queued/waiting job with a cancel reason → ``cancelled``, in one transaction (no-op otherwise)."""

    # engines on this store: exactly one *owner* runs its jobs at a time
    @abc.abstractmethod
    async def try_own(self, identity: dict[str, Any]) -> bool:
        """Try (without waiting) to become this store's owner: the one engine that runs its
        jobs, until :meth:`release_ownership` or the process dies. ``identity`` (pid, since,
        host, role) is recorded so others can name the owner. False if another owns it."""
    @abc.abstractmethod
    async def release_ownership(self) -> None: ...
    @abc.abstractmethod
    async def owner(self) -> dict[str, Any] | None:
        """The running owner's identity (None when no engine owns the store)."""
    @abc.abstractmethod
    def no_engine_running(self) -> contextlib.AbstractAsyncContextManager[bool]:
        """``async with store.no_engine_running() as idle``: for a client (``herd cancel``);
        while the block runs with ``idle`` True, no engine owns this store. Brief: an engine
        that tries to own the store meanwhile retries."""
    async def jobs_after(self, job_id: int) -> list[Job]:
        """Non-final jobs with ``id > job_id``, oldest first (polled by the owner for jobs
        other processes submit)."""
        return [j for j in await self.list_jobs(states=[s for s in JobState if not s.final]) if j.id > job_id]

    @abc.abstractmethod
    async def set_point_of_no_return(self, job_id: int, reason: str, *, now: float) -> Event: ...
    @abc.abstractmethod
    async def set_recovery(self, job_id: int, note: str | None, *, now: float) -> Event: ...
    @abc.abstractmethod
    async def get_job(self, job_id: int, *, steps: bool = True) -> Job: ...
    @abc.abstractmethod
    async def list_jobs(self, *, states: Iterable[JobState] | None = None, limit: int | None = None) -> list[Job]: ...

    # steps and events
    @abc.abstractmethod
    async def step_start(
        self, job_id: int, *, name: str, node: str | None, method: str | None, args: str, deadline: float | None, now: float
    ) -> tuple[Step, Event]: ...
    @abc.abstractmethod
    async def step_end(
        self,
        job_id: int,
        idx: int,
        *,
        state: StepState,
        now: float,
        result: Any = None,
        error: ErrorInfo | None = None,
        attempts: int = 1,
        inventory: Sequence[InventoryChange] = (),
    ) -> Event:
        """Record a step's end and apply ``inventory`` in the same transaction."""
    @abc.abstractmethod
    async def add_event(self, job_id: int | None, kind: str, data: dict[str, Any], *, now: float) -> Event: ...
    @abc.abstractmethod
    async def events(self, job_id: int | None, *, after: int = 0) -> list[Event]: ...

    # inventory
    @abc.abstractmethod
    async def instances(self) -> dict[str, InstanceRecord]: ...
    @abc.abstractmethod
    async def add_instance(self, record: InstanceRecord, *, now: float, replace: bool = False) -> None: ...
    @abc.abstractmethod
    async def remove_instance(self, name: str, *, now: float) -> None: ...
    @abc.abstractmethod
    async def apply_inventory(self, changes: Sequence[InventoryChange], *, job_id: int | None, now: float) -> None: ...


# --- SQLite ------------------------------------------------------------------


def _ensure_store_dir(directory: Path) -> None:
    """Create ``directory`` and missing parents 0700 whatever the umask; warn (once per
    process and path) about an existing one that others can read or enter."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # created meanwhile by another process
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask
    if missing:
        return
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077 and directory not in _warned_dirs:
        _warned_dirs.add(directory)
        from ._log import configure_logging, get_logger

        configure_logging()  # to stderr (unless the program configured logging): never into --json output
        get_logger().warning(
            f"store directory {directory} has mode {mode:04o}: others can reach the job store; chmod 700 it",
            path=str(directory), mode=f"{mode:04o}",
        )


_warned_dirs: set[Path] = set()


def _read_identity(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes() or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

#: (version, description, statements). Append only; never edit a shipped one.
MIGRATIONS: list[tuple[int, str, tuple[str, ...]]] = [
    (
        1,
        "jobs, steps, events, instances",
        (
            """CREATE TABLE jobs (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL,
                op TEXT NOT NULL,
                state TEXT NOT NULL,
                priority INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                started_at REAL,
                finished_at REAL,
                result TEXT,
                error TEXT,
                cancel_reason TEXT,
                point_of_no_return TEXT,
                parent_id INTEGER REFERENCES jobs(id),
                depends_on TEXT NOT NULL DEFAULT '[]',
                recovery TEXT
            )""",
            "CREATE INDEX jobs_state ON jobs(state, priority, id)",
            """CREATE TABLE steps (
                job_id INTEGER NOT NULL REFERENCES jobs(id),
                idx INTEGER NOT NULL,
                name TEXT NOT NULL,
                node TEXT,
                method TEXT,
                args TEXT NOT NULL DEFAULT '',
                state TEXT NOT NULL,
                started_at REAL NOT NULL,
                ended_at REAL,
                deadline REAL,
                attempts INTEGER NOT NULL DEFAULT 1,
                result TEXT,
                error TEXT,
                PRIMARY KEY (job_id, idx)
            )""",
            """CREATE TABLE events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                job_id INTEGER,
                ts REAL NOT NULL,
                kind TEXT NOT NULL,
                data TEXT NOT NULL
            )""",
            "CREATE INDEX events_job ON events(job_id, seq)",
            """CREATE TABLE instances (
                name TEXT PRIMARY KEY,
                spec TEXT NOT NULL,
                primary_node TEXT NOT NULL,
                admin_state TEXT NOT NULL,
                pending_cleanup TEXT NOT NULL DEFAULT '[]',
                version INTEGER NOT NULL DEFAULT 0,
                updated_at REAL NOT NULL
            )""",
        ),
    ),
]
MIGRATIONS.append(
    (
        2,
        "cancel requests (cross-process cancel)",
        (
            """CREATE TABLE cancel_requests (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                job_id INTEGER NOT NULL REFERENCES jobs(id),
                reason TEXT NOT NULL,
                requested_at REAL NOT NULL
            )""",
        ),
    )
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _is_corrupt(err: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file itself is damaged (not busy, not a bad query)."""
    return getattr(err, "sqlite_errorname", None) in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


_JOB_COLUMNS = (
    "id, kind, op, state, priority, created_at, updated_at, started_at, finished_at, result, error, "
    "cancel_reason, point_of_no_return, parent_id, depends_on, recovery"
)


class _WriteRequest:
    __slots__ = ("fn", "result", "error", "done")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: Exception | None = None
        self.done = False


class SqliteStore(Store):
    """The embedded store: one SQLite file in WAL mode."""

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "FULL", readonly: bool = False,
        operations: Mapping[str, type[Operation]] | None = None,
    ) -> None:
        """``readonly``: open the file read-only (SQLite ``mode=ro``): nothing is
        created, migrated or written, so a store whose file and directory
        are not writable can still be read (``herd list``/``show``/``watch``).
        ``operations``: the operation kinds its jobs are decoded as (default:
        the built-ins; an engine adds those of its workflows)."""
        #: Operation class per kind, to decode stored jobs.
        self.operations: Mapping[str, type[Operation]] = BUILTIN_OPERATIONS if operations is None else operations
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise StoreError(f"synchronous must be FULL, NORMAL, EXTRA or OFF, not {synchronous!r}")
        self.path = Path(path)
        self.readonly = readonly
        self.synchronous = synchronous.upper()
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._thread_lock = threading.Lock()
        self._read_conn: sqlite3.Connection | None = None
        self._read_limiter = anyio.CapacityLimiter(1)
        self._read_thread_lock = threading.Lock()
        self._write_lock = anyio.Lock()
        self._queue: list[_WriteRequest] = []
        self._lease_fd: int | None = None

    @property
    def lease_path(self) -> Path:
        """The owner lock: the owning engine holds an exclusive flock on it for its whole
        life, and its identity (JSON) is the file's content."""
        return Path(f"{self.path}.engine-lock")

    @property
    def client_lock_path(self) -> Path:
        """Serialises clients' "is an engine running?" checks (never taken by an engine)."""
        return Path(f"{self.path}.client-lock")

    def _open_lock_file(self, path: Path) -> int:
        _ensure_store_dir(self.path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        except OSError:
            pass  # not ours to change (another user's file): the open worked, use it
        return fd

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    # --- plumbing -----------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer connection, in its worker thread."""
        if self.readonly and self._read_conn is not None:
            raise StoreError(f"store {self.path} was opened read-only: it cannot be changed here")
        return await self._in_thread(self._conn, self._thread_lock, self._limiter, fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on the reader connection (WAL: it never waits for the writer)."""
        return await self._in_thread(self._read_conn, self._read_thread_lock, self._read_limiter, fn)

    async def _in_thread(
        self,
        conn: sqlite3.Connection | None,
        lock: threading.Lock,
        limiter: anyio.CapacityLimiter,
        fn: Callable[[sqlite3.Connection], T],
    ) -> T:
        if conn is None:
            raise StoreError(f"store {self.path} is not open")

        def work() -> T:
            with lock:
                try:
                    return fn(conn)
                except sqlite3.DatabaseError as err:
                    if _is_corrupt(err):
                        raise self._corrupt(err) from err
                    raise

        return await anyio.to_thread.run_sync(work, limiter=limiter)

    async def _txn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a write transaction; return once it is committed.

        Group commit: writes that arrive while another commit is in progress
        are queued, and the next one to get the write lock runs the whole
        queue in one transaction, each write inside its own SAVEPOINT (a
        failing write is rolled back alone and raises to its caller only).
        Each caller still returns only after the COMMIT holding its write.
        Shielded: a write that was queued is finished, never half-known.
        """
        request = _WriteRequest(fn)
        self._queue.append(request)
        with anyio.CancelScope(shield=True):
            async with self._write_lock:
                if not request.done:
                    batch, self._queue = self._queue, []
                    await self._run(lambda conn: self._commit_batch(conn, batch))
        if request.error is not None:
            raise request.error
        return request.result  # type: ignore[no-any-return]

    @staticmethod
    def _commit_batch(conn: sqlite3.Connection, batch: list[_WriteRequest]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for request in batch:
                conn.execute("SAVEPOINT w")
                try:
                    request.result = request.fn(conn)
                except Exception as err:
                    conn.execute("ROLLBACK TO w")
                    request.error = err
                conn.execute("RELEASE w")
            conn.execute("COMMIT")
        except BaseException as err:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for request in batch:
                request.result, request.error = None, err if isinstance(err, Exception) else StoreError(f"write aborted: {err!r}")
            raise
        finally:
            for request in batch:
                request.done = True

    # --- lifecycle ----------------------------------------------------------

    def _corrupt(self, err: BaseException | str) -> StoreError:
        return StoreError(
            f"store {self.path} is corrupt (sqlite: {err}); it was not changed: restore it from a backup or move it away"
        )

    def _connect_ro(self) -> sqlite3.Connection:
        """A read-only connection (``mode=ro``: never creates or writes the file).

        A WAL store whose ``-shm`` file is gone and whose directory is not
        writable cannot be opened ``mode=ro``; then nothing can be writing
        to it either, and it is opened ``immutable``.
        """
        uri = self.path.absolute().as_uri()
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as err:
            conn.close()
            if not (self.readonly and str(err.sqlite_errorname).startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY"))):
                raise
            conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA query_only=ON")
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> int:
        """The store's schema version, read without writing (0: a new, empty file).

        A read that fails, or a version that makes no sense, is checked with
        ``PRAGMA quick_check``: a damaged file is reported corrupt (never
        written), a sound one from a newer herd is refused by version.
        """
        try:
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
            version = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] if has_table else 0
            problem = None
        except sqlite3.DatabaseError as err:
            version, problem = None, err
        if problem is None and isinstance(version, int) and not isinstance(version, bool) and 0 <= version <= SCHEMA_VERSION:
            return version
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as err:
            raise self._corrupt(err) from err
        verdict = "; ".join(str(r[0]) for r in rows[:3])
        if verdict != "ok":
            raise self._corrupt(verdict)
        if problem is not None:
            raise StoreError(f"cannot read store {self.path} (sqlite: {problem}); it was not changed") from problem
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {version}, newer than this herd supports ({SCHEMA_VERSION}): "
                f"use a newer herd; the store was not changed"
            )
        raise self._corrupt(f"schema version {version!r} is not a version")

    async def open(self) -> None:
        if self._conn is not None or self._read_conn is not None:
            return

        def inspect() -> None:
            """Refuse a damaged or newer store before anything writes to it."""
            if self.path.is_dir():
                raise StoreError(f"store {self.path} is a directory: give --store the SQLite file (e.g. {self.path / 'herd.db'})")
            if not self.path.exists() or self.path.stat().st_size == 0:
                return
            conn = self._connect_ro()
            try:
                self._check_schema(conn)
            finally:
                conn.close()

        def connect() -> sqlite3.Connection:
            inspect()
            _ensure_store_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            try:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.execute("PRAGMA foreign_keys=ON")
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        def connect_reader() -> sqlite3.Connection:
            if self.readonly:
                if self.path.is_dir():
                    raise StoreError(f"store {self.path} is a directory: give --store the SQLite file (e.g. {self.path / 'herd.db'})")
                if not self.path.is_file():
                    raise StoreError(f"no store at {self.path}: give --store the SQLite file of an existing store")
                conn = self._connect_ro()
                try:
                    version = self._check_schema(conn)
                    if version != SCHEMA_VERSION:
                        raise StoreError(
                            f"store {self.path} has schema version {version}, older than this herd's ({SCHEMA_VERSION}): "
                            f"open it once with a command that writes (herd submit) to upgrade it"
                        )
                except BaseException:
                    conn.close()
                    raise
                return conn
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
            conn.execute("PRAGMA query_only=ON")
            return conn

        try:
            if not self.readonly:
                self._conn = await anyio.to_thread.run_sync(connect)
            self._read_conn = await anyio.to_thread.run_sync(connect_reader)
        except sqlite3.DatabaseError as err:
            await self.aclose()
            if _is_corrupt(err):
                raise self._corrupt(err) from err
            raise StoreError(f"cannot open store {self.path} (sqlite: {err}); check the path and its permissions") from err
        except OSError as err:
            await self.aclose()
            what = err.strerror or str(err)
            raise StoreError(
                f"cannot open store {self.path}: {what}{f' ({err.filename})' if err.filename and str(err.filename) != str(self.path) else ''}: "
                f"give --store a writable SQLite file path"
            ) from err
        except BaseException:
            await self.aclose()
            raise
        if self.readonly:
            return
        for suffix in ("", "-wal", "-shm"):
            p = Path(f"{self.path}{suffix}")
            if p.exists():
                os.chmod(p, 0o600)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
            )
            current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {current}, newer than this herd supports ({SCHEMA_VERSION})"
                )
            for version, description, statements in MIGRATIONS:
                if version <= current:
                    continue
                for sql in statements:
                    conn.execute(sql)
                # Schema bookkeeping is not job data: a real clock is fine here.
                conn.execute(
                    "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, julianday('now'))",
                    (version, description),
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def aclose(self) -> None:
        await self.release_ownership()
        conn, self._conn = self._conn, None
        reader, self._read_conn = self._read_conn, None
        with anyio.CancelScope(shield=True):
            if reader is not None:
                await anyio.to_thread.run_sync(reader.close, limiter=self._read_limiter)
            if conn is not None:
                await anyio.to_thread.run_sync(conn.close, limiter=self._limiter)

    async def schema_version(self) -> int:
        return await self._read(lambda c: c.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0])

    # --- helpers inside a transaction ---------------------------------------

    @staticmethod
    def _event(conn: sqlite3.Connection, job_id: int | None, kind: str, data: dict[str, Any], now: float) -> Event:
        text = _dumps(data) or "{}"
        cur = conn.execute("INSERT INTO events (job_id, ts, kind, data) VALUES (?, ?, ?, ?)", (job_id, now, kind, text))
        return Event(seq=int(cur.lastrowid or 0), job_id=job_id, ts=now, kind=kind, data=_loads(text))

    def _job_from_row(self, row: Sequence[Any]) -> Job:
        try:
            (id_, kind, op, state, priority, created, updated, started, finished, result, error, reason, ponr, parent, deps, recovery) = row
            return Job(
                id=id_,
                kind=kind,
                op=decode_op(kind, op, self.operations),
                state=JobState(state),
                priority=priority,
                created_at=created,
                updated_at=updated,
                started_at=started,
                finished_at=finished,
                result=_loads(result),
                error=msgspec.convert(_loads(error), ErrorInfo) if error else None,
                cancel_reason=reason,
                point_of_no_return=ponr,
                parent_id=parent,
                depends_on=tuple(_loads(deps) or ()),
                recovery=recovery,
            )
        except (ValueError, msgspec.ValidationError, TypeError) as err:
            raise StoreError(f"corrupt job row {row[0]!r}: {err}") from err

    @staticmethod
    def _step_from_row(row: Sequence[Any]) -> Step:
        job_id, idx, name, node, method, args, state, started, ended, deadline, attempts, result, error = row
        return Step(
            job_id=job_id,
            idx=idx,
            name=name,
            node=node,
            method=method,
            args=args,
            state=StepState(state),
            started_at=started,
            ended_at=ended,
            deadline=deadline,
            attempts=attempts,
            result=_loads(result),
            error=msgspec.convert(_loads(error), ErrorInfo) if error else None,
        )

    def _job_state(self, conn: sqlite3.Connection, job_id: int) -> JobState:
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        return JobState(row[0])

    # --- jobs ---------------------------------------------------------------

    async def create_job(
        self, op: Operation, *, priority: int, depends_on: Sequence[int], parent_id: int | None, now: float
    ) -> tuple[Job, Event]:
        op_text = encode_op(op).decode()
        deps = [int(d) for d in depends_on]

        def work(conn: sqlite3.Connection) -> tuple[Job, Event]:
            for dep in deps:
                self._job_state(conn, dep)  # JobNotFound rolls it all back
            cur = conn.execute(
                "INSERT INTO jobs (kind, op, state, priority, created_at, updated_at, parent_id, depends_on) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (op.kind, op_text, JobState.QUEUED.value, priority, now, now, parent_id, _dumps(deps)),
            )
            job_id = int(cur.lastrowid or 0)
            event = self._event(
                conn, job_id, "state", {"state": JobState.QUEUED.value, "op": op.kind, "summary": op.summary(), "priority": priority}, now
            )
            job = Job(
                id=job_id, kind=op.kind, op=op, state=JobState.QUEUED, priority=priority, created_at=now,
                updated_at=now, parent_id=parent_id, depends_on=tuple(deps),
            )
            return job, event

        return await self._txn(work)

    async def transition(
        self,
        job_id: int,
        states: Sequence[JobState],
        *,
        now: float,
        result: Any = None,
        error: ErrorInfo | None = None,
        data: dict[str, Any] | None = None,
    ) -> list[Event]:
        result_text = _dumps(result)
        error_text = _dumps(error)

        def work(conn: sqlite3.Connection) -> list[Event]:
            current = self._job_state(conn, job_id)
            events = []
            for state in states:
                if state not in TRANSITIONS[current]:
                    raise StoreError(f"job {job_id}: transition {current.value} → {state.value} is not allowed")
                sets = ["state = ?", "updated_at = ?"]
                args: list[Any] = [state.value, now]
                if state is JobState.RUNNING:
                    sets.append("started_at = ?")
                    args.append(now)
                if state.final:
                    sets += ["finished_at = ?", "result = ?", "error = ?", "recovery = NULL"]
                    args += [now, result_text, error_text]
                conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
                payload: dict[str, Any] = {"state": state.value, "previous": current.value, **(data or {})}
                if state.final:
                    if result is not None:
                        payload["result"] = _loads(result_text)
                    if error is not None:
                        payload["error"] = _loads(error_text)
                events.append(self._event(conn, job_id, "state", payload, now))
                current = state
            return events

        return await self._txn(work)

    async def request_cancel(self, job_id: int, reason: str, *, now: float) -> tuple[Job, Event | None]:
        def work(conn: sqlite3.Connection) -> tuple[Job, Event | None]:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id}")
            job = self._job_from_row(row)
            if job.final or job.cancel_reason is not None:
                return job, None
            conn.execute("UPDATE jobs SET cancel_reason = ?, updated_at = ? WHERE id = ?", (reason, now, job_id))
            conn.execute("INSERT INTO cancel_requests (job_id, reason, requested_at) VALUES (?, ?, ?)", (job_id, reason, now))
            job.cancel_reason = reason
            event = self._event(conn, job_id, "cancel-requested", {"reason": reason, "state": job.state.value}, now)
            return job, event

        return await self._txn(work)

    async def cancel_requests(self, *, after: int = 0) -> list[CancelRequest]:
        def work(conn: sqlite3.Connection) -> list[CancelRequest]:
            rows = conn.execute(
                "SELECT seq, job_id, reason, requested_at FROM cancel_requests WHERE seq > ? ORDER BY seq", (after,)
            ).fetchall()
            return [CancelRequest(seq=q, job_id=j, reason=r, requested_at=t) for q, j, r, t in rows]

        return await self._read(work)

    async def last_cancel_request(self) -> int:
        return int(await self._read(lambda c: c.execute("SELECT COALESCE(MAX(seq), 0) FROM cancel_requests").fetchone()[0]))

    async def cancel_pending_job(self, job_id: int, *, now: float) -> list[Event]:
        def work(conn: sqlite3.Connection) -> list[Event]:
            row = conn.execute("SELECT state, cancel_reason FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id}")
            state, reason = JobState(row[0]), row[1]
            if state not in (JobState.QUEUED, JobState.WAITING) or reason is None:
                return []
            error = _dumps(ErrorInfo(type="JobCancelled", message=f"cancelled while {state.value}: {reason}"))
            conn.execute(
                "UPDATE jobs SET state = ?, updated_at = ?, finished_at = ?, error = ?, recovery = NULL WHERE id = ?",
                (JobState.CANCELLED.value, now, now, error, job_id),
            )
            payload = {"state": JobState.CANCELLED.value, "previous": state.value, "error": _loads(error)}
            return [self._event(conn, job_id, "state", payload, now)]

        return await self._txn(work)

    # --- engines on this store ----------------------------------------------

    async def try_own(self, identity: dict[str, Any]) -> bool:
        """An exclusive, non-blocking flock on :attr:`lease_path`; on success the identity is
        written into the file (read by :meth:`owner` only while the lock is held)."""
        if self._lease_fd is not None:
            return True
        fd = self._open_lock_file(self.lease_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        try:
            data = json.dumps(identity).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError as err:
            os.close(fd)
            raise StoreError(f"cannot record the engine's identity in {self.lease_path}: {err}") from err
        self._lease_fd = fd
        return True

    async def release_ownership(self) -> None:
        fd, self._lease_fd = self._lease_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock (the content stays: the last owner)

    async def owner(self) -> dict[str, Any] | None:
        if self._lease_fd is not None:
            return _read_identity(self.lease_path)
        fd = self._open_lock_file(self.lease_path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_identity(self.lease_path) or {"pid": None}
            return None
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def no_engine_running(self) -> AsyncIterator[bool]:
        client = self._open_lock_file(self.client_lock_path)
        try:
            # Clients take turns (milliseconds each), so two of them never both see "an engine runs".
            await anyio.to_thread.run_sync(fcntl.flock, client, fcntl.LOCK_EX)
            fd = self._open_lock_file(self.lease_path)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                yield True
            finally:
                os.close(fd)
        finally:
            os.close(client)

    async def jobs_after(self, job_id: int) -> list[Job]:
        final = [s.value for s in JobState if s.final]

        def work(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id > ? AND state NOT IN ({', '.join('?' * len(final))}) ORDER BY id",
                (job_id, *final),
            ).fetchall()
            return [self._job_from_row(r) for r in rows]

        return await self._read(work)

    async def set_point_of_no_return(self, job_id: int, reason: str, *, now: float) -> Event:
        def work(conn: sqlite3.Connection) -> Event:
            self._job_state(conn, job_id)
            conn.execute("UPDATE jobs SET point_of_no_return = ?, updated_at = ? WHERE id = ?", (reason, now, job_id))
            return self._event(conn, job_id, "point-of-no-return", {"reason": reason}, now)

        return await self._txn(work)

    async def set_recovery(self, job_id: int, note: str | None, *, now: float) -> Event:
        def work(conn: sqlite3.Connection) -> Event:
            self._job_state(conn, job_id)
            conn.execute("UPDATE jobs SET recovery = ?, updated_at = ? WHERE id = ?", (note, now, job_id))
            return self._event(conn, job_id, "recovery", {"pending": note is not None, "note": note}, now)

        return await self._txn(work)

    async def get_job(self, job_id: int, *, steps: bool = True) -> Job:
        def work(conn: sqlite3.Connection) -> Job:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(f"no job {job_id}")
            job = self._job_from_row(row)
            if steps:
                rows = conn.execute(
                    "SELECT job_id, idx, name, node, method, args, state, started_at, ended_at, deadline, attempts, result, error "
                    "FROM steps WHERE job_id = ? ORDER BY idx",
                    (job_id,),
                ).fetchall()
                job.steps = [self._step_from_row(r) for r in rows]
            return job

        return await self._read(work)

    async def list_jobs(self, *, states: Iterable[JobState] | None = None, limit: int | None = None) -> list[Job]:
        wanted = [JobState(s).value for s in states] if states is not None else None

        def work(conn: sqlite3.Connection) -> list[Job]:
            sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
            args: list[Any] = []
            if wanted is not None:
                if not wanted:
                    return []
                sql += f" WHERE state IN ({', '.join('?' * len(wanted))})"
                args += wanted
            sql += " ORDER BY id"
            if limit is not None:
                sql += " LIMIT ?"
                args.append(int(limit))
            return [self._job_from_row(r) for r in conn.execute(sql, args).fetchall()]

        return await self._read(work)

    # --- steps and events ---------------------------------------------------

    async def step_start(
        self, job_id: int, *, name: str, node: str | None, method: str | None, args: str, deadline: float | None, now: float
    ) -> tuple[Step, Event]:
        def work(conn: sqlite3.Connection) -> tuple[Step, Event]:
            self._job_state(conn, job_id)
            idx = conn.execute("SELECT COALESCE(MAX(idx), -1) + 1 FROM steps WHERE job_id = ?", (job_id,)).fetchone()[0]
            conn.execute(
                "INSERT INTO steps (job_id, idx, name, node, method, args, state, started_at, deadline) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, idx, name, node, method, args, StepState.RUNNING.value, now, deadline),
            )
            step = Step(job_id=job_id, idx=idx, name=name, node=node, method=method, args=args, started_at=now, deadline=deadline)
            event = self._event(
                conn, job_id, "step-start",
                {"idx": idx, "step": name, "node": node, "method": method, "args": args, "deadline": deadline}, now,
            )
            return step, event

        return await self._txn(work)

    async def step_end(
        self,
        job_id: int,
        idx: int,
        *,
        state: StepState,
        now: float,
        result: Any = None,
        error: ErrorInfo | None = None,
        attempts: int = 1,
        inventory: Sequence[InventoryChange] = (),
    ) -> Event:
        result_text = _dumps(result)
        error_text = _dumps(error)

        def work(conn: sqlite3.Connection) -> Event:
            row = conn.execute("SELECT name, node FROM steps WHERE job_id = ? AND idx = ?", (job_id, idx)).fetchone()
            if row is None:
                raise StoreError(f"job {job_id} has no step {idx}")
            conn.execute(
                "UPDATE steps SET state = ?, ended_at = ?, result = ?, error = ?, attempts = ? WHERE job_id = ? AND idx = ?",
                (state.value, now, result_text, error_text, attempts, job_id, idx),
            )
            self._apply_inventory(conn, inventory, job_id, now)
            data: dict[str, Any] = {"idx": idx, "step": row[0], "node": row[1], "state": state.value, "attempts": attempts}
            if result is not None:
                data["result"] = _loads(result_text)
            if error is not None:
                data["error"] = _loads(error_text)
            if inventory:
                data["inventory"] = msgspec.to_builtins(list(inventory))
            return self._event(conn, job_id, "step-end", data, now)

        return await self._txn(work)

    async def add_event(self, job_id: int | None, kind: str, data: dict[str, Any], *, now: float) -> Event:
        return await self._txn(lambda conn: self._event(conn, job_id, kind, data, now))

    async def events(self, job_id: int | None, *, after: int = 0) -> list[Event]:
        def work(conn: sqlite3.Connection) -> list[Event]:
            if job_id is None:
                rows = conn.execute(
                    "SELECT seq, job_id, ts, kind, data FROM events WHERE job_id IS NULL AND seq > ? ORDER BY seq", (after,)
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT seq, job_id, ts, kind, data FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)
                ).fetchall()
            return [Event(seq=s, job_id=j, ts=t, kind=k, data=_loads(d)) for s, j, t, k, d in rows]

        return await self._read(work)

    # --- inventory ----------------------------------------------------------

    @staticmethod
    def _record_from_row(row: Sequence[Any]) -> InstanceRecord:
        name, spec, primary, admin, cleanup, version = row
        try:
            return msgspec.convert(
                {
                    "name": name,
                    "spec": _loads(spec),
                    "primary": primary,
                    "admin_state": admin,
                    "pending_cleanup": _loads(cleanup),
                    "version": version,
                },
                InstanceRecord,
            )
        except msgspec.ValidationError as err:
            raise StoreError(f"corrupt inventory row for instance {name!r}: {err}") from err

    def _read_instance(self, conn: sqlite3.Connection, name: str) -> InstanceRecord | None:
        row = conn.execute(
            "SELECT name, spec, primary_node, admin_state, pending_cleanup, version FROM instances WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else self._record_from_row(row)

    def _write_instance(self, conn: sqlite3.Connection, record: InstanceRecord, now: float) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO instances (name, spec, primary_node, admin_state, pending_cleanup, version, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                record.name,
                _dumps(record.spec),
                record.primary,
                record.admin_state.value,
                _dumps(list(record.pending_cleanup)),
                record.version,
                now,
            ),
        )

    def _apply_inventory(self, conn: sqlite3.Connection, changes: Sequence[InventoryChange], job_id: int | None, now: float) -> None:
        for change in changes:
            record = self._read_instance(conn, change.instance)
            if record is None:
                raise InstanceNotKnown(f"inventory change {change!r}: no instance {change.instance!r}")
            self._write_instance(conn, apply_change(record, change, job_id=job_id), now)

    async def instances(self) -> dict[str, InstanceRecord]:
        def work(conn: sqlite3.Connection) -> dict[str, InstanceRecord]:
            rows = conn.execute(
                "SELECT name, spec, primary_node, admin_state, pending_cleanup, version FROM instances ORDER BY name"
            ).fetchall()
            return {r[0]: self._record_from_row(r) for r in rows}

        return await self._read(work)

    async def add_instance(self, record: InstanceRecord, *, now: float, replace: bool = False) -> None:
        def work(conn: sqlite3.Connection) -> None:
            if not replace and self._read_instance(conn, record.name) is not None:
                raise StoreError(f"instance {record.name!r} already exists")
            self._write_instance(conn, record, now)
            self._event(conn, None, "inventory", {"added": record.name, "primary": record.primary}, now)

        await self._txn(work)

    async def remove_instance(self, name: str, *, now: float) -> None:
        def work(conn: sqlite3.Connection) -> None:
            cur = conn.execute("DELETE FROM instances WHERE name = ?", (name,))
            if cur.rowcount == 0:
                raise InstanceNotKnown(f"no instance {name!r}")
            self._event(conn, None, "inventory", {"removed": name}, now)

        await self._txn(work)

    async def apply_inventory(self, changes: Sequence[InventoryChange], *, job_id: int | None, now: float) -> None:
        await self._txn(lambda conn: self._apply_inventory(conn, changes, job_id, now))
