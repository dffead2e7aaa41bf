"""Fixtures of the transport tests: the same test set runs on every transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import transport
from transport.testing import LocalCluster
from tests.transport.drivers import RecordingHypervisor

NODES = ("n1", "n2")
#: The recording driver, as agents in other processes load it.
RECORDING = "tests.transport.drivers:RecordingHypervisor"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Setup:
    """A transport to recording nodes, plus where each node keeps its state."""

    def __init__(self, kind: str, transport_: transport.Transport, state_dirs: dict[str, Path]) -> None:
        self.kind = kind
        self.transport = transport_
        self.state_dirs = state_dirs

    def events(self, node: str) -> list[dict]:
        return RecordingHypervisor.read_events(self.state_dirs[node])


@pytest.fixture(params=["local", "ssh"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    state_dirs = {name: tmp_path / name for name in NODES}
    if request.param == "local":
        drivers = {name: RecordingHypervisor(str(d), node=name) for name, d in state_dirs.items()}
        async with transport.LocalTransport(drivers, call_timeout=30) as t:
            yield Setup("local", t, state_dirs)
    else:
        async with LocalCluster(n=len(NODES), base_dir=tmp_path / "cluster", hypervisor=RECORDING, call_timeout=30) as lc:
            async with transport.SshTransport(lc.config) as t:
                yield Setup("ssh", t, {name: lc.state_dir(name) for name in NODES})
