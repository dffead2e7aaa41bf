"""Shared fixtures: a local cluster of fake nodes behind real SSH servers.

For other test packages (anyio tests, ``pytestmark = pytest.mark.anyio``)::

    from tests.transport.cluster_fixtures import local_ssh_cluster, ssh_transport  # noqa: F401

    async def test_x(local_ssh_cluster, ssh_transport):
        info = await ssh_transport.node("n1").get_node_info()
        events = FakeHypervisor.read_events(local_ssh_cluster.state_dir("n1"))

``local_ssh_cluster``: 2 ``fake`` nodes (n1, n2), asyncssh servers, keepalive
1 s × 2; ``.config`` is the ClusterConfig (known_hosts + identity file),
``.config_path`` the same as TOML, ``kill/restart/freeze/thaw(node)``.
``ssh_transport``: an open :class:`~transport.SshTransport` to it.
``make_local_cluster(**kwargs)``: for other shapes —
``async with make_local_cluster(n=3, server="sshd") as lc:``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from transport import SshTransport
from transport.testing import LocalCluster


@pytest.fixture
def make_local_cluster(tmp_path: Path) -> Callable[..., LocalCluster]:
    """A factory: ``make_local_cluster(n=3, server="sshd", hypervisor="fake", hv_options=…)``."""
    count = 0

    def make(**kwargs: Any) -> LocalCluster:
        nonlocal count
        count += 1
        kwargs.setdefault("n", 2)
        kwargs.setdefault("hypervisor", "fake")
        return LocalCluster(base_dir=tmp_path / f"cluster{count}", **kwargs)

    return make


@pytest.fixture
async def local_ssh_cluster(make_local_cluster: Callable[..., LocalCluster]) -> AsyncIterator[LocalCluster]:
    async with make_local_cluster() as cluster:
        yield cluster


@pytest.fixture
async def ssh_transport(local_ssh_cluster: LocalCluster) -> AsyncIterator[SshTransport]:
    assert local_ssh_cluster.config is not None
    async with SshTransport(local_ssh_cluster.config) as transport:
        yield transport
