"""The fake migration's byte stream: a pluggable link and a small framed protocol.

:class:`StreamFactory` opens the link; :class:`TcpStreamFactory` (the default)
uses real TCP, and a deterministic simulation can swap in in-memory links.

Every frame is ``type (1 byte) | length (4 bytes, big endian) | payload``:

``H``  header, JSON ``{"instance", "ram_total", "source_node", "live"}`` (source → target)
``D``  simulated memory pages, raw bytes (source → target)
``E``  end, JSON ``{"ram_transferred"}`` (source → target, the guest is paused)
``A``  ack, JSON ``{"ram_received"}`` (target → source: the target has it all)
"""

from __future__ import annotations

import json
import struct
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from ..errors import MigrationError

FRAME_HEADER = struct.Struct("!cI")
HEADER, DATA, END, ACK = b"H", b"D", b"E", b"A"
#: The largest JSON frame accepted (a data frame may be up to MAX_DATA_FRAME).
MAX_JSON_FRAME = 64 * 1024
MAX_DATA_FRAME = 16 * 1024 * 1024


class ProtocolError(MigrationError):
    """The peer sent something the stream protocol does not allow (fails the migration)."""


@runtime_checkable
class IncomingListener(Protocol):
    """Accepts the one connection of an incoming migration."""

    async def accept(self) -> ByteStream: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class StreamFactory(Protocol):
    """How the fake driver opens migration links (swap it for simulation)."""

    async def connect(self, host: str, port: int) -> ByteStream:
        """A byte stream to a listener at ``host:port``."""
        ...

    async def listen(self, host: str) -> tuple[IncomingListener, int]:
        """A listener on ``host`` at a port the system picks, and that port."""
        ...


class _TcpListener:
    def __init__(self, listener: Any) -> None:
        self._listener = listener

    async def accept(self) -> ByteStream:
        return await self._listener.accept()

    async def aclose(self) -> None:
        await self._listener.aclose()


class TcpStreamFactory:
    """Real TCP: ``anyio.connect_tcp`` and a listener on port 0 (OS-allocated)."""

    async def connect(self, host: str, port: int) -> ByteStream:
        return await anyio.connect_tcp(host, port)

    async def listen(self, host: str) -> tuple[IncomingListener, int]:
        multi = await anyio.create_tcp_listener(local_host=host, local_port=0)
        first, *rest = multi.listeners
        for extra in rest:  # a name that resolves to several addresses: keep one
            await extra.aclose()
        return _TcpListener(first), int(first.extra(SocketAttribute.local_port))


async def send_frame(stream: ByteStream, kind: bytes, payload: bytes | memoryview) -> None:
    await stream.send(FRAME_HEADER.pack(kind, len(payload)))
    if len(payload):
        await stream.send(payload)


async def send_json(stream: ByteStream, kind: bytes, value: dict[str, Any]) -> None:
    await send_frame(stream, kind, json.dumps(value, separators=(",", ":")).encode())


class FrameReader:
    """Reads frames from a byte stream (data payloads are consumed, not kept)."""

    def __init__(self, stream: ByteStream) -> None:
        self._buffered = BufferedByteReceiveStream(stream)

    async def next_header(self) -> tuple[bytes, int]:
        raw = await self._buffered.receive_exactly(FRAME_HEADER.size)
        kind, length = FRAME_HEADER.unpack(raw)
        if kind not in (HEADER, DATA, END, ACK):
            raise ProtocolError(f"unknown frame type {kind!r}")
        limit = MAX_DATA_FRAME if kind == DATA else MAX_JSON_FRAME
        if length > limit:
            raise ProtocolError(f"{kind.decode()} frame of {length} bytes exceeds {limit}")
        return kind, length

    async def read_json(self, length: int) -> dict[str, Any]:
        raw = await self._buffered.receive_exactly(length) if length else b""
        try:
            value = json.loads(raw)
        except ValueError as err:
            raise ProtocolError(f"malformed JSON frame: {err}") from err
        if not isinstance(value, dict):
            raise ProtocolError(f"JSON frame must be an object, not {type(value).__name__}")
        return value

    async def skip(self, length: int) -> int:
        """Consume ``length`` payload bytes; returns how many arrived."""
        left = length
        while left:
            chunk = await self._buffered.receive(min(left, 1024 * 1024))
            left -= len(chunk)
        return length

    async def expect_json(self, kind: bytes) -> dict[str, Any]:
        got, length = await self.next_header()
        if got != kind:
            raise ProtocolError(f"expected a {kind.decode()} frame, got {got.decode()}")
        return await self.read_json(length)
