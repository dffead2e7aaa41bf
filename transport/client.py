"""The client side of one agent stream: many calls in flight, cancel frames.

An :class:`AgentConnection` multiplexes calls over one frame stream (an SSH
exec channel, or an in-memory pipe to an in-process agent). Its
:meth:`~AgentConnection.run_reader` task routes replies to the waiting
calls; when the stream ends every waiting call fails with
:class:`~transport.errors.NodeUnreachable`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from .errors import CallTimeout, NodeUnreachable, ProtocolError
from .protocol import (
    MAX_REPLY_FRAME,
    PROTOCOL_VERSION,
    FrameReader,
    Oversized,
    check_version,
    decode_frame,
    encode_frame,
    error_from_payload,
    frame_head_id,
)

log = structlog.get_logger("herd.transport")

ProgressCallback = Callable[[dict[str, Any]], None]
Receive = Callable[[], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]

#: How long a cancel frame may take to send before we give up on it.
CANCEL_SEND_TIMEOUT = 2.0


class _Pending:
    __slots__ = ("method", "on_progress", "done", "frame")

    def __init__(self, method: str, on_progress: ProgressCallback | None) -> None:
        self.method = method
        self.on_progress = on_progress
        self.done = anyio.Event()
        self.frame: dict[str, Any] | Exception | None = None


class AgentConnection:
    """Calls to one agent over one frame stream."""

    def __init__(self, node: str, send: Send, *, max_frame: int = MAX_REPLY_FRAME) -> None:
        self.node = node
        self._send_bytes = send
        self._send_lock = anyio.Lock()
        self.max_frame = max_frame
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._recently_cancelled: set[int] = set()
        self.hello: dict[str, Any] | None = None
        self._hello_event = anyio.Event()
        self.closed: str | None = None  # why, once the stream ended
        self._closed_event = anyio.Event()
        self.closed_error: Exception | None = None  # set when the agent was refused (version)
        self._log = log.bind(node=node)
        #: Error frames that answer no waiting call (refused malformed frames).
        self.refusals: list[dict[str, Any]] = []
        self._refusal_event = anyio.Event()

    async def next_refusal(self, index: int) -> dict[str, Any]:
        """The ``index``-th refusal, waiting for it to arrive (tests of bad frames)."""
        while len(self.refusals) <= index:
            await self._refusal_event.wait()
        return self.refusals[index]

    @property
    def alive(self) -> bool:
        return self.closed is None

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    # --- reading -------------------------------------------------------------

    async def run_reader(self, receive: Receive) -> None:
        """Route frames until end of stream, then fail every waiting call."""
        reason = "the agent's output ended"
        try:
            reader = FrameReader(receive, self.max_frame)
            while True:
                line = await reader.next()
                if line is None:
                    break
                self._on_line(line)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, EOFError) as err:
            reason = f"connection lost: {err or type(err).__name__}"
        finally:
            self.close(reason)

    def close(self, reason: str) -> None:
        """Mark the stream dead; every waiting call fails with NodeUnreachable."""
        if self.closed is not None:
            return
        self.closed = reason
        self._closed_event.set()
        self._hello_event.set()
        for pending in self._pending.values():
            if pending.frame is None:
                pending.frame = NodeUnreachable(f"{pending.method}: {reason}", node=self.node)
            pending.done.set()

    def _on_line(self, line: bytes | Oversized) -> None:
        if isinstance(line, Oversized):
            self._log.error("reply frame over the size limit dropped", size=line.size, limit=self.max_frame)
            fid = line.frame_id
            pending = self._pending.get(fid) if isinstance(fid, int) else None
            if pending is not None:  # fail the call now rather than at its deadline
                pending.frame = ProtocolError(
                    f"{pending.method}: reply of {line.size} bytes exceeds the limit of {self.max_frame} bytes",
                    node=self.node,
                )
                pending.done.set()
            return
        if not line.strip():
            return
        try:
            frame = decode_frame(line)
        except ProtocolError as err:
            fid = frame_head_id(line)
            pending = self._pending.get(fid) if isinstance(fid, int) else None
            if pending is not None:  # a reply we cannot decode fails its call now, not at its deadline
                pending.frame = ProtocolError(f"{pending.method}: bad reply from the agent: {err.message}", node=self.node)
                pending.done.set()
                return
            # Noise on stdout (a login banner, a stray print) must not kill the calls.
            self._log.warning("non-frame output from agent ignored", error=err.message)
            return
        if "hello" in frame:
            self._on_hello(frame)
            return
        fid = frame.get("id")
        pending = self._pending.get(fid) if isinstance(fid, int) else None
        if pending is None:
            if "error" in frame:
                self._log.warning("agent refused a frame", id=fid, error=frame.get("error"))
                self.refusals.append(frame)
                self._refusal_event.set()
                self._refusal_event = anyio.Event()
            elif fid not in self._recently_cancelled:
                self._log.debug("frame for no waiting call", id=fid)
            self._recently_cancelled.discard(fid)  # type: ignore[arg-type]
            return
        try:
            check_version(frame)
        except ProtocolError as err:
            pending.frame = ProtocolError(f"{pending.method}: {err.message}", node=self.node)
            pending.done.set()
            return
        if "progress" in frame:
            if pending.on_progress is not None and isinstance(frame["progress"], dict):
                try:
                    pending.on_progress(frame["progress"])
                except Exception as err:  # noqa: BLE001 - a listener's bug must not break the call
                    self._log.warning("progress callback failed", error=repr(err))
            return
        if "result" in frame or "error" in frame or "cancelled" in frame:
            pending.frame = frame
            pending.done.set()
            return
        pending.frame = ProtocolError(f"{pending.method}: reply frame has no result, error or progress", node=self.node)
        pending.done.set()

    def _on_hello(self, frame: dict[str, Any]) -> None:
        try:
            check_version(frame)
        except ProtocolError as err:
            self.closed_error = ProtocolError(f"agent speaks another protocol: {err.message}", node=self.node)
            self.close(f"agent refused: {err.message}")
            return
        hello = frame["hello"]
        if not isinstance(hello, dict):
            self._log.warning("malformed hello ignored", hello=repr(hello)[:200])
            return
        self.hello = hello
        self._hello_event.set()

    async def wait_hello(self, timeout: float) -> dict[str, Any]:
        """The agent's hello (version checked); raises if the stream ends first."""
        with anyio.move_on_after(timeout):
            await self._hello_event.wait()
        if self.closed_error is not None:
            raise self.closed_error
        if self.hello is None:
            reason = self.closed or f"no hello from the agent within {timeout:g}s"
            raise NodeUnreachable(f"agent did not start: {reason}", node=self.node)
        if self.hello.get("node") not in (None, self.node):
            raise ProtocolError(f"agent serves node {self.hello.get('node')!r}, expected {self.node!r}", node=self.node)
        return self.hello

    # --- calling -------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests of malformed frames)."""
        async with self._send_lock:
            await self._send_bytes(data)

    async def call(
        self,
        method: str,
        params: dict[str, Any],
        *,
        call_timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        after_send: Callable[[], None] | None = None,
        node_deadline: float | None = None,
    ) -> Any:
        """Send one request and wait for its reply; returns the raw (JSON) result.

        On timeout or cancellation of the caller a cancel frame goes to the
        agent, so the driver coroutine stops on the node too.
        """
        if self.closed is not None:
            raise NodeUnreachable(f"{method}: {self.closed}", node=self.node)
        call_id = next(self._ids)
        pending = _Pending(method, on_progress)
        self._pending[call_id] = pending
        sent = False
        try:
            try:
                with anyio.fail_after(call_timeout):
                    request: dict[str, Any] = {"id": call_id, "method": method, "params": params}
                    if node_deadline is not None and node_deadline < math.inf:
                        request["timeout"] = round(max(node_deadline, 0.001), 3)
                    await self._send_frame(request)
                    sent = True
                    if after_send is not None:
                        after_send()
                    await pending.done.wait()
            except TimeoutError:
                raise CallTimeout(
                    f"{method} did not answer within its deadline of {call_timeout:g}s (cancelled on the node)",
                    node=self.node,
                ) from None
        finally:
            del self._pending[call_id]
            if sent and pending.frame is None and self.closed is None:
                self._recently_cancelled.add(call_id)
                with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_SEND_TIMEOUT):
                    try:
                        await self._send_frame({"id": call_id, "cancel": True})
                    except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
        frame = pending.frame
        if isinstance(frame, Exception):
            raise frame
        assert frame is not None
        if "error" in frame:
            raise error_from_payload(frame["error"], node=self.node, method=method)
        if "cancelled" in frame:
            raise NodeUnreachable(f"{method}: the agent cancelled the call (agent shutting down)", node=self.node)
        return frame["result"]

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        data = encode_frame(frame)
        try:
            async with self._send_lock:
                await self._send_bytes(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
            self.close(f"cannot write to the agent: {err or type(err).__name__}")
            raise NodeUnreachable(f"{frame.get('method', 'cancel')}: cannot write to the agent: {err}", node=self.node) from err


__all__ = ["AgentConnection", "PROTOCOL_VERSION"]
