"""The stream factory is pluggable: the same migration over an in-memory link.

This is what deterministic simulation will use; here it proves that nothing
in the driver depends on TCP.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from hv.fake import FakeHypervisor, StreamFactory

from .conftest import MIB, NodeFactory, inst, wait_status


class MemoryLink(anyio.abc.ByteStream):
    """One end of an in-memory byte link (bounded: a slow reader slows the writer)."""

    def __init__(self, tx: MemoryObjectSendStream[bytes], rx: MemoryObjectReceiveStream[bytes]) -> None:
        self.tx, self.rx = tx, rx

    async def send(self, item: bytes) -> None:
        try:
            await self.tx.send(bytes(item))
        except anyio.ClosedResourceError:
            raise anyio.BrokenResourceError from None

    async def receive(self, max_bytes: int = 65536) -> bytes:
        try:
            return await self.rx.receive()
        except anyio.ClosedResourceError:
            raise anyio.EndOfStream from None

    async def send_eof(self) -> None:
        await self.tx.aclose()

    async def aclose(self) -> None:
        await self.tx.aclose()
        await self.rx.aclose()


class MemoryListener:
    def __init__(self) -> None:
        self.send, self.recv = anyio.create_memory_object_stream[MemoryLink](1)

    async def accept(self) -> anyio.abc.ByteStream:
        return await self.recv.receive()

    async def aclose(self) -> None:
        self.send.close()
        self.recv.close()


class MemoryNetwork:
    """A StreamFactory shared by every node: ports are keys in a dict."""

    def __init__(self) -> None:
        self.listeners: dict[int, MemoryListener] = {}
        self.ports = itertools.count(40000)

    async def listen(self, host: str) -> tuple[MemoryListener, int]:
        port = next(self.ports)
        self.listeners[port] = listener = MemoryListener()
        return listener, port

    async def connect(self, host: str, port: int) -> anyio.abc.ByteStream:
        listener = self.listeners.get(port)
        if listener is None:
            raise ConnectionRefusedError(f"nothing listens on {host}:{port}")
        a_tx, b_rx = anyio.create_memory_object_stream[bytes](4)
        b_tx, a_rx = anyio.create_memory_object_stream[bytes](4)
        server = MemoryLink(b_tx, b_rx)
        try:
            listener.send.send_nowait(server)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.WouldBlock):
            await server.aclose()
            await a_tx.aclose()
            await a_rx.aclose()
            raise ConnectionRefusedError(f"{host}:{port} refused the connection") from None
        return MemoryLink(a_tx, a_rx)


@pytest.mark.asyncio
async def test_migration_over_an_in_memory_link(make_node: NodeFactory, tmp_path: Path) -> None:
    net = MemoryNetwork()
    assert isinstance(net, StreamFactory)
    src, dst = make_node("src", stream_factory=net), make_node("dst", stream_factory=net)
    spec = inst("web1", 16)
    FakeHypervisor.configure(tmp_path / "src", bandwidth=64 * MIB)
    await src.start_instance(spec)
    info = await src.migration_info(spec)
    address = await dst.accept_instance(spec, info, "sim-dst")
    assert address == "tcp:sim-dst:40000"
    await src.migrate_instance(spec, address, True)
    final = (await wait_status(src, spec, lambda s: s.is_final))[-1]
    assert final.status == "completed" and final.ram_transferred == 16 * MIB
    await dst.finalize_migration_dst(spec, info, True)
    await src.finalize_migration_source(spec, True, True)
    assert await src.list_instances() == [] and await dst.list_instances() == ["web1"]
    # Nothing listens on that port any more: refused, and the source runs on.
    other = inst("db1", 16)
    await src.start_instance(other)
    await src.migrate_instance(other, "tcp:sim-dst:40000", True)
    st = await src.get_migration_status(other)
    assert st.status == "failed" and "refused" in (st.error or "")
    info2 = await src.get_instance_info("db1")
    assert info2 is not None and info2.state.value == "running"
