"""The node agent: serves one node's hypervisor driver over the wire protocol.

``python -m transport.agent --node n1 --hypervisor fake --hv-option state_dir=/var/lib/herd/n1``
(console script ``herd-agent``) reads request frames on stdin and writes
reply frames on stdout (see :mod:`transport.protocol`); logs go to stderr.
Many calls run at once; a cancel frame cancels the driver coroutine, whose
cleanup runs before the ``cancelled`` acknowledgement is sent. When stdin
closes (the SSH session died) every call is cancelled, its cleanup runs, and
the agent exits: no orphan agents on nodes.

:class:`Agent` is transport-agnostic: :class:`~transport.LocalTransport`
runs the very same object over in-memory pipes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

import hv
from hv import BaseHypervisor
from hv.errors import HypervisorError

from .errors import ProtocolError
from .protocol import (
    KIND_TIMEOUT,
    MAX_REPLY_FRAME,
    MAX_REQUEST_FRAME,
    METHODS,
    PROTOCOL_VERSION,
    FrameReader,
    Oversized,
    check_version,
    decode_frame,
    frame_head_id,
    decode_params,
    encode_frame,
    error_payload,
    to_wire,
    valid_id,
)

log = structlog.get_logger("herd.agent")

Receive = Callable[[], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]

_REQUEST_FIELDS = frozenset({"v", "id", "method", "params", "timeout"})
_CANCEL_FIELDS = frozenset({"v", "id", "cancel"})


class Agent:
    """Serves ``driver`` (the hypervisor of node ``node``) on one frame stream."""

    def __init__(
        self,
        driver: BaseHypervisor,
        *,
        node: str,
        hypervisor: str | None = None,
        max_frame: int = MAX_REQUEST_FRAME,
    ) -> None:
        self.driver = driver
        self.node = node
        self.hypervisor = hypervisor or getattr(driver, "NAME", type(driver).__name__)
        self.max_frame = max_frame
        self._calls: dict[int | str, anyio.CancelScope] = {}
        self._out: MemoryObjectSendStream[bytes] | None = None
        self._log = log.bind(node=node)

    @property
    def calls_in_flight(self) -> int:
        return len(self._calls)

    async def serve(self, receive: Receive, send: Send) -> None:
        """Serve until ``receive`` reports end of stream (or the caller is cancelled).

        Either way every running call is cancelled and its cleanup awaited.
        """
        out_send, out_recv = anyio.create_memory_object_stream[bytes](math.inf)
        self._out = out_send
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._writer, out_recv, send, outer.cancel_scope)
            try:
                async with anyio.create_task_group() as calls:
                    self._emit(
                        {"hello": {"node": self.node, "hypervisor": self.hypervisor, "pid": os.getpid(), "protocol": PROTOCOL_VERSION}}
                    )
                    reader = FrameReader(receive, self.max_frame)
                    while True:
                        try:
                            line = await reader.next()
                        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
                            self._log.warning("agent input failed", error=str(err))
                            line = None
                        if line is None:
                            break
                        self._handle(line, calls)
                    if self._calls:
                        self._log.info("input closed: cancelling calls", calls=len(self._calls))
                    calls.cancel_scope.cancel()
            finally:
                self._out = None
                out_send.close()

    # --- frames in -----------------------------------------------------------

    def _handle(self, line: bytes | Oversized, calls: anyio.abc.TaskGroup) -> None:
        if isinstance(line, Oversized):
            fid = line.frame_id
            self._refuse(
                fid if valid_id(fid) else None,
                ProtocolError(f"frame of {line.size} bytes exceeds the limit of {self.max_frame} bytes"),
            )
            return
        if not line.strip():
            return  # blank lines are keep-alive noise, not frames
        try:
            frame = decode_frame(line)
        except ProtocolError as err:
            fid = frame_head_id(line)  # answer the id when the frame starts like ours
            self._refuse(fid if valid_id(fid) else None, err)
            return
        fid = frame.get("id")
        reply_id = fid if valid_id(fid) else None
        try:
            check_version(frame)
            if "id" not in frame:
                raise ProtocolError("frame has no 'id'")
            if reply_id is None:
                raise ProtocolError(f"'id' must be an integer or a non-empty string (≤128 chars), got {fid!r:.60}")
            if "cancel" in frame:
                _no_unknown(frame, _CANCEL_FIELDS)
                if frame["cancel"] is not True:
                    raise ProtocolError(f"'cancel' must be true, got {frame['cancel']!r:.60}")
                scope = self._calls.get(fid)
                if scope is not None:
                    self._log.debug("cancel", id=fid)
                    scope.cancel()
                return  # a cancel for a call that already ended is no error
            if "method" not in frame:
                raise ProtocolError("frame has neither 'method' nor 'cancel'")
            _no_unknown(frame, _REQUEST_FIELDS)
            method = frame["method"]
            if not isinstance(method, str):
                raise ProtocolError(f"'method' must be a string, got {method!r:.60}")
            if method not in METHODS:
                raise ProtocolError(f"unknown method {method!r:.80} (served: {', '.join(sorted(METHODS))})")
            if fid in self._calls:
                raise ProtocolError(f"id {fid!r} is already in flight")
            params = decode_params(method, frame.get("params", {}))
            timeout = frame.get("timeout")
            if timeout is not None and (
                isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
            ):
                raise ProtocolError(f"'timeout' must be a positive number of seconds, got {timeout!r:.60}")
        except ProtocolError as err:
            self._refuse(reply_id, err)
            return
        scope = anyio.CancelScope()
        self._calls[fid] = scope
        calls.start_soon(self._run, fid, method, params, scope, timeout, name=f"agent call {fid} {method}")

    def _refuse(self, fid: int | str | None, err: ProtocolError) -> None:
        self._log.warning("frame refused", id=fid, error=err.message)
        self._emit({"id": fid, "error": error_payload(err, node=self.node)})

    # --- calls ---------------------------------------------------------------

    async def _run(
        self, fid: int | str, method: str, params: dict[str, Any], scope: anyio.CancelScope, timeout: float | None
    ) -> None:
        """Run one call; its own deadline (``timeout``) holds even if a cancel frame is lost."""
        try:
            with scope:
                frame: dict[str, Any] | None = None
                try:
                    with anyio.move_on_after(math.inf if timeout is None else timeout) as limit:
                        with hv.progress_sink(lambda fields: self._progress(fid, fields)):
                            result = await self._invoke(method, params)
                        frame = {"id": fid, "result": to_wire(result)}
                        if len(encode_frame(frame)) > MAX_REPLY_FRAME:
                            raise ProtocolError(f"the result of {method} exceeds the reply limit of {MAX_REPLY_FRAME} bytes")
                except Exception as err:  # every failure becomes an error reply; the agent keeps serving
                    if not isinstance(err, HypervisorError):
                        self._log.error("driver call failed", id=fid, method=method, error=repr(err))
                    frame = {"id": fid, "error": error_payload(err, node=self.node)}
                if limit.cancelled_caught:
                    message = f"{method} ran out of its deadline of {timeout:g}s on the node; cancelled"
                    frame = {"id": fid, "error": {"kind": KIND_TIMEOUT, "class": "CallTimeout", "message": message, "node": self.node}}
                assert frame is not None
                self._emit(frame)
            if scope.cancelled_caught:
                self._emit({"id": fid, "cancelled": True})
        finally:
            self._calls.pop(fid, None)

    async def _invoke(self, method: str, params: dict[str, Any]) -> Any:
        if method == "ping":
            return {
                "node": self.node,
                "hypervisor": self.hypervisor,
                "pid": os.getpid(),
                "protocol": PROTOCOL_VERSION,
                "calls_in_flight": len(self._calls) - 1,
            }
        func = getattr(self.driver, method)
        result = func(**params)
        if isinstance(result, Awaitable):
            result = await result
        return result

    def _progress(self, fid: int | str, fields: dict[str, Any]) -> None:
        try:
            self._emit({"id": fid, "progress": to_wire(fields)})
        except (TypeError, ValueError) as err:
            self._log.warning("progress report dropped: not JSON-able", id=fid, error=str(err))

    # --- frames out ----------------------------------------------------------

    def _emit(self, frame: dict[str, Any]) -> None:
        out = self._out
        if out is None:
            return
        try:
            out.send_nowait(encode_frame(frame))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    async def _writer(
        self, frames: MemoryObjectReceiveStream[bytes], send: Send, on_fail: anyio.CancelScope
    ) -> None:
        """Write queued frames in order, batching what is ready; stop all on a broken output."""
        async with frames:
            async for first in frames:
                batch = [first]
                while True:
                    try:
                        batch.append(frames.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                try:
                    await send(b"".join(batch))
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
                    self._log.warning("agent output failed: stopping", error=str(err))
                    on_fail.cancel()
                    return


def _no_unknown(frame: Mapping[str, Any], allowed: frozenset[str]) -> None:
    extra = sorted(set(frame) - allowed)
    if extra:
        raise ProtocolError(f"unknown field {extra[0]!r:.60} in frame")


# --- stdio ---------------------------------------------------------------------


class FdReader:
    """Reads a file descriptor without blocking the event loop (pipes, sockets, ttys)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll = not stat.S_ISREG(os.fstat(fd).st_mode)
        if self._poll:
            os.set_blocking(fd, False)

    async def receive(self) -> bytes:
        while True:
            try:
                return os.read(self.fd, 1 << 16)
            except BlockingIOError:
                await anyio.wait_readable(self.fd)


class FdWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poll = not stat.S_ISREG(os.fstat(fd).st_mode)
        if self._poll:
            os.set_blocking(fd, False)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                await anyio.wait_writable(self.fd)
                continue
            view = view[written:]


def parse_hv_options(options: Sequence[str]) -> dict[str, Any]:
    """``["k=v", …]`` → dict; a value is JSON-decoded when it parses, else kept a string."""
    parsed: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--hv-option must be KEY=VALUE with KEY an identifier, got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    return parsed


def build_driver(hypervisor: str, node: str, options: Mapping[str, Any]) -> BaseHypervisor:
    """A driver by registry name (``fake``, ``kvm``) or ``module:Class`` (third-party drivers)."""
    if ":" in hypervisor:
        module_name, _, class_name = hypervisor.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(cls, type) and issubclass(cls, BaseHypervisor)):
            raise HypervisorError(f"{hypervisor} is not a BaseHypervisor subclass")
        return cls(**options, node=node)
    return hv.get_hypervisor(hypervisor, **options, node=node)


def _configure_logging(level: str) -> None:
    """Logs go to stderr: stdout carries only frames."""
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


async def run_stdio(agent: Agent) -> None:
    """Serve on stdin/stdout; SIGTERM/SIGINT/SIGHUP stop it like a closed stdin."""
    reader, writer = FdReader(sys.stdin.fileno()), FdWriter(sys.stdout.fileno())
    async with anyio.create_task_group() as tg:

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("signal: stopping", signal=signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(on_signals)
        driver: Any = agent.driver
        try:
            if hasattr(driver, "__aenter__"):
                # A driver with background work (migration streams) owns a task
                # group while entered: it lives as long as the agent.
                async with driver:
                    await agent.serve(reader.receive, writer.send)
            else:
                try:
                    await agent.serve(reader.receive, writer.send)
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                        await driver.aclose()
        finally:
            tg.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd-agent", description="Serve one node's hypervisor on stdin/stdout.")
    parser.add_argument("--node", required=True, help="this node's name (set on every error)")
    parser.add_argument("--hypervisor", default="fake", help="driver: fake, kvm, or module:Class")
    parser.add_argument(
        "--hv-option", action="append", default=[], metavar="KEY=VALUE",
        help="driver option (repeatable); VALUE is JSON-decoded when it parses, e.g. state_dir=/srv/n1",
    )
    parser.add_argument("--max-frame", type=int, default=MAX_REQUEST_FRAME, help="largest request frame, bytes")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        options = parse_hv_options(args.hv_option)
        driver = build_driver(args.hypervisor, args.node, options)
    except Exception as err:  # noqa: BLE001 - report any construction failure and exit non-zero
        print(f"herd-agent: cannot start {args.hypervisor} driver for node {args.node}: {err}", file=sys.stderr)
        return 2
    agent = Agent(driver, node=args.node, hypervisor=args.hypervisor, max_frame=args.max_frame)
    anyio.run(run_stdio, agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
