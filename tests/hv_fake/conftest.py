"""Fixtures: fake nodes in temporary directories, closed after each test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest_asyncio

import hv
from hv.fake import FakeHypervisor

MIB = 1024 * 1024


def inst(name: str = "web1", mem: int = 64, **kw: Any) -> hv.Instance:
    return hv.Instance(name=name, beparams=hv.BeParams(minmem=mem, maxmem=mem, vcpus=1), **kw)


NodeFactory = Callable[..., FakeHypervisor]


@pytest_asyncio.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """``make_node("n1", **kw)``: a driver on ``tmp_path/n1`` (a second call on the same name is a restart)."""
    made: list[FakeHypervisor] = []

    def factory(name: str = "n1", **kw: Any) -> FakeHypervisor:
        node = FakeHypervisor(tmp_path / name, node=name, **kw)
        made.append(node)
        return node

    yield factory
    for node in made:
        await node.aclose()


class KillableProxy:
    """A real TCP forwarder between two nodes that a test can kill mid-stream."""

    def __init__(self, target_host: str, target_port: int, *, freeze_after: int | None = None) -> None:
        self.target = (target_host, target_port)
        #: Freeze by itself once this many bytes went forward: the fault lands at a
        #: point of the stream, not at a moment (a busy machine cannot move it).
        self.freeze_after = freeze_after
        self.forwarded = 0
        self.scope = anyio.CancelScope()
        self.port = 0
        self.frozen = False

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
            self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
            task_status.started(self.port)
            with self.scope:
                await listener.serve(self._handle)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(*self.target) as upstream:

            async def pipe(src: anyio.abc.ByteStream, dst: anyio.abc.SocketStream, count: bool) -> None:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    async for data in src:
                        if self.frozen:  # a black hole: connections stay open, nothing moves
                            await anyio.sleep_forever()
                        if count:
                            self.forwarded += len(data)
                            if self.freeze_after is not None and self.forwarded >= self.freeze_after:
                                self.frozen = True
                                await anyio.sleep_forever()
                        await dst.send(data)
                    if not self.frozen:
                        await dst.send_eof()
                if self.frozen:  # not even the end of a stream (or a reset) crosses a black hole
                    await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(pipe, client, upstream, True)
                tg.start_soon(pipe, upstream, client, False)

    def freeze(self) -> None:
        """Stop moving bytes but keep the connections open (a black-holed path)."""
        self.frozen = True

    def kill(self) -> None:
        """Cut every forwarded connection at once (both sockets closed)."""
        self.scope.cancel()


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("tcp:").rpartition(":")
    return host, int(port)


async def wait_status(
    node: FakeHypervisor, spec: hv.Instance, pred: Callable[[hv.MigrationStatus], bool], timeout: float = 10.0
) -> list[hv.MigrationStatus]:
    """Long-poll ``get_migration_status`` until ``pred``; every reading seen."""
    seen: list[hv.MigrationStatus] = []
    with anyio.fail_after(timeout):
        while True:
            st = await node.get_migration_status(spec, wait=1.0)
            seen.append(st)
            if pred(st):
                return seen
