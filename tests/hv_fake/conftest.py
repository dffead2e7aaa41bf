"""Fixtures: fake nodes in temporary directories, closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
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
