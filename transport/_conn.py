"""What the local and SSH transports share: per-node connections, calls, backoff.

A transport must be entered (``async with transport:``) in the task that will
close it: it owns a task group in which each node's connection (its agent
stream reader, for SSH the connection itself) runs. A node's connection is
opened on first use and reused; when it dies, the next call opens a new one,
after a backoff if the last attempt failed.

A connect attempt runs in the transport's task group, not in the caller's
task: every stage of it has its own deadline (see the subclasses), so a stuck
attempt ends, is cleaned up and logged with the stage it was stuck in, however
short the callers' deadlines are. Callers only wait for the attempt's outcome,
each within its own deadline; concurrent callers share one attempt, and the
call after a failed attempt starts a fresh one.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import math
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio
import anyio.abc
import structlog

from hv.errors import HypervisorError

from ._base import NodeClient, ProgressCallback, Transport
from .client import AgentConnection
from .errors import CallTimeout, ConfigError, HostKeyError, NodeUnreachable, ProtocolError, TransportError, UnknownNode
from .faults import TransportFaults
from .protocol import decode_result, encode_params

log = structlog.get_logger("herd.transport")

#: Seconds the node lets a call outlive the caller's deadline before it cancels
#: the call by itself (a backstop for a cancel frame lost in a partition).
NODE_DEADLINE_GRACE = 1.0


def _transport_error(err: BaseException) -> TransportError | None:
    """The TransportError behind ``err``, looking inside task-group exception groups."""
    if isinstance(err, TransportError):
        return err
    if isinstance(err, BaseExceptionGroup):
        for inner in err.exceptions:
            found = _transport_error(inner)
            if found is not None:
                return found
    return None


@contextlib.contextmanager
def connect_stage(node: str, stage: str | Callable[[], str], limit: float, detail: str = "") -> Iterator[None]:
    """Bound one stage of a connect by ``limit`` seconds; overrunning it is NodeUnreachable naming the stage.

    ``stage`` may be a callable: the stage reached when the deadline hit (the
    SSH handshake reports its progress that way).
    """
    try:
        with anyio.fail_after(limit):
            yield
    except TimeoutError as err:
        if isinstance(err, TransportError):
            raise
        name = stage() if callable(stage) else stage
        raise StageTimeout(
            f"connect stuck in stage {name!r}{detail}: no progress within {limit:g}s; abandoned", node=node, stage=name
        ) from None


class StageTimeout(NodeUnreachable):
    """A connect stage overran its deadline (``stage`` names it)."""

    def __init__(self, message: str = "", *, node: str | None = None, stage: str = "") -> None:
        super().__init__(message, node=node)
        self.stage = stage


class ConnectAttempt:
    """One connect attempt's outcome, awaited by every caller that needs the node."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.scope = anyio.CancelScope()  # cancelled when the transport closes
        self.conn: AgentConnection | None = None
        self.error: TransportError | None = None


class NodeState:
    """One node's connection and reconnect bookkeeping."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attempt: ConnectAttempt | None = None  # the connect in progress, if any
        self.conn: AgentConnection | None = None
        self.hangup: Callable[[], None] | None = None  # drops the link (sync)
        self.backoff = 0.0
        self.retry_at = -math.inf
        self.last_error: str | None = None
        self.last_failure: TransportError | None = None
        self.connects = 0  # successful connection count (tests, metrics)
        self.task_done: anyio.Event | None = None  # set when the connection task ended


class _Client(NodeClient):
    def __init__(self, transport: ConnectionTransport, name: str) -> None:
        self._transport = transport
        self.name = name

    async def call(
        self,
        method: str,
        /,
        *args: Any,
        call_timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> Any:
        return await self._transport._call(self.name, method, args, kwargs, call_timeout, on_progress)

    async def connection(self) -> AgentConnection:
        """The node's live agent connection (opened if needed): tests, raw frames."""
        return await self._transport._connection(self._transport._state(self.name))

    def __repr__(self) -> str:
        return f"<NodeClient {self.name} via {type(self._transport).__name__}>"


class ConnectionTransport(Transport):
    """Base of :class:`LocalTransport` and :class:`SshTransport`."""

    def __init__(
        self,
        names: Iterable[str],
        *,
        call_timeout: float | None,
        backoff_min: float = 0.2,
        backoff_max: float = 5.0,
        connect_timeout: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        self._states = {name: NodeState(name) for name in names}
        self.call_timeout = call_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self._rng = rng or random.Random()
        self.faults = TransportFaults()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False

    # --- Transport -----------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        return list(self._states)

    def node(self, name: str) -> _Client:
        self._state(name)
        return _Client(self, name)

    async def __aenter__(self) -> ConnectionTransport:
        if self._tg is not None or self._closed:
            raise TransportError(f"{type(self).__name__} can be entered once")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Hang up every node (their agents cancel what runs and exit), then stop."""
        if self._closed:
            return
        self._closed = True
        tg, self._tg = self._tg, None
        with anyio.CancelScope(shield=True):
            for state in self._states.values():
                if state.attempt is not None:
                    state.attempt.scope.cancel()
                self._hangup(state, "transport closed")
            # Give connection tasks a moment to finish their cleanup (agents
            # cancel their calls and exit, SSH channels close) before cancelling.
            with anyio.move_on_after(10):
                for state in self._states.values():
                    if state.task_done is not None:
                        await state.task_done.wait()
        # Outside any scope of ours: it may exit task groups entered in __aenter__.
        await self._after_hangup()
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    async def _after_hangup(self) -> None:
        """Hook: runs once every connection ended, before the task group exits."""

    # --- fault injection / chaos ---------------------------------------------

    async def drop_connection(self, name: str) -> None:
        """Drop the node's connection now (calls in flight fail NodeUnreachable)."""
        state = self._state(name)
        conn = state.conn
        self._hangup(state, "connection dropped")
        if conn is not None:
            await conn.wait_closed()

    def connection_count(self, name: str) -> int:
        """How many times the node's connection was (re)opened."""
        return self._state(name).connects

    # --- internals -----------------------------------------------------------

    def _state(self, name: str) -> NodeState:
        try:
            return self._states[name]
        except KeyError:
            raise UnknownNode(f"unknown node {name!r} (known: {', '.join(self._states)})") from None

    def _hangup(self, state: NodeState, reason: str) -> None:
        if state.conn is not None:
            state.conn.close(reason)
        if state.hangup is not None:
            try:
                state.hangup()
            except Exception as err:  # noqa: BLE001 - best effort
                log.warning("hangup failed", node=state.name, error=repr(err))

    async def _call(
        self,
        name: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        call_timeout: float | None,
        on_progress: ProgressCallback | None,
    ) -> Any:
        state = self._state(name)
        try:
            params = encode_params(method, args, kwargs)
        except ProtocolError as err:
            err.node = name
            raise
        timeout = call_timeout if call_timeout is not None else self.call_timeout
        after_send = None
        if self.faults.take_drop(name, method):
            after_send = lambda: self._hangup(state, f"connection dropped by fault injection during {method}")  # noqa: E731
        try:
            with anyio.fail_after(timeout):
                await self.faults.hit(name, method)
                conn = await self._connection(state)
                # What is left of the deadline (ours or an enclosing one) goes to the node
                # too, with a grace so that normally our cancel frame gets there first.
                left = anyio.current_effective_deadline() - anyio.current_time() + NODE_DEADLINE_GRACE
                raw = await conn.call(
                    method, params, on_progress=on_progress, after_send=after_send, node_deadline=left
                )
        except TimeoutError as err:
            if isinstance(err, (TransportError, HypervisorError)):
                raise
            raise CallTimeout(
                f"{method} on node {name} did not answer within its deadline of {timeout:g}s; cancelled",
                node=name,
            ) from None
        try:
            return decode_result(method, raw)
        except ProtocolError as err:
            err.node = name
            raise

    async def _connection(self, state: NodeState) -> AgentConnection:
        if self._tg is None:
            raise TransportError(
                f"{type(self).__name__} is not open: use `async with transport:`"
                + (" (it was closed)" if self._closed else ""),
                node=state.name,
            )
        if state.conn is not None and state.conn.alive:
            return state.conn
        attempt = state.attempt
        if attempt is None:
            now = anyio.current_time()
            if now < state.retry_at:
                if isinstance(state.last_failure, (ConfigError, HostKeyError)):
                    # Not a transient failure: say what is wrong, not "unreachable".
                    raise copy.copy(state.last_failure).with_traceback(None) from None
                raise NodeUnreachable(
                    f"not reconnecting for another {state.retry_at - now:.1f}s (backoff); last error: {state.last_error}",
                    node=state.name,
                )
            state.attempt = attempt = ConnectAttempt()
            self._tg.start_soon(self._connect, state, attempt, name=f"connect {state.name}")
        # Our own deadline bounds this wait; the attempt goes on (bounded by its
        # stage deadlines) and its outcome serves the next caller.
        await attempt.done.wait()
        if attempt.conn is not None:
            return attempt.conn
        err = attempt.error or NodeUnreachable("connect abandoned: the transport is closing", node=state.name)
        # A fresh exception per caller: one raised in many tasks would share a traceback.
        fresh = copy.copy(err)
        raise fresh.with_traceback(None) from None

    async def _connect(self, state: NodeState, attempt: ConnectAttempt) -> None:
        """Run one connect attempt to its end (success, failure or a stage deadline) and log it."""
        assert self._tg is not None
        t0 = anyio.current_time()
        try:
            with attempt.scope:
                conn: AgentConnection = await self._tg.start(self._run_connection, state)
            if attempt.scope.cancelled_caught:
                log.info("connect abandoned: transport closing", node=state.name)
                return
        except Exception as err:  # noqa: BLE001 - any failure to connect means unreachable
            cause = _transport_error(err)
            if cause is None:
                cause = NodeUnreachable(f"cannot connect: {err!r}", node=state.name)
                cause.__cause__ = err
            attempt.error = state.last_failure = cause
            self._note_failure(state, cause, elapsed=anyio.current_time() - t0)
        else:
            state.backoff = 0.0
            state.retry_at = -math.inf
            state.last_error = None
            state.last_failure = None
            state.connects += 1
            state.conn = attempt.conn = conn
            log.info("connected", node=state.name, elapsed=round(anyio.current_time() - t0, 3))
        finally:
            state.attempt = None
            attempt.done.set()

    def _note_failure(self, state: NodeState, err: BaseException, *, elapsed: float = 0.0) -> None:
        state.last_error = str(err)
        base = self.backoff_min if state.backoff == 0 else min(self.backoff_max, state.backoff * 2)
        state.backoff = base
        # Jitter in [base/2, base] so that many engines do not reconnect in step.
        state.retry_at = anyio.current_time() + base * (0.5 + 0.5 * self._rng.random())
        log.warning(
            "connect failed",
            node=state.name,
            stage=getattr(err, "stage", None),
            elapsed=round(elapsed, 3),
            error=str(err),
            retry_in=round(state.retry_at - anyio.current_time(), 2),
        )

    async def _run_connection(self, state: NodeState, *, task_status: anyio.abc.TaskStatus[AgentConnection]) -> None:
        started = False
        state.task_done = done = anyio.Event()

        def report(conn: AgentConnection) -> None:
            nonlocal started
            started = True
            task_status.started(conn)

        try:
            await self._serve_connection(state, report)
        except Exception as err:
            if not started:
                raise
            log.error("connection task failed", node=state.name, error=repr(err))
        finally:
            state.hangup = None
            if state.conn is not None:
                state.conn.close("connection closed")
            done.set()

    @abc.abstractmethod
    async def _serve_connection(self, state: NodeState, started: Callable[[AgentConnection], None]) -> None:
        """Open the node's agent stream, call ``started(conn)``, serve until it ends.

        Must set ``state.hangup`` to a callable that closes the link, and
        raise a :class:`TransportError` when the link cannot be opened.
        """
