"""Fixtures for the engine tests: stores on disk, fake nodes behind the local
transport or real SSH servers (transport.testing.LocalCluster)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import hv
from engine import AdminState, Cluster, Engine, InstanceRecord
from hv.fake import FakeHypervisor
from transport import ClusterConfig, LocalTransport, NodeConfig

NODES = ("n1", "n2")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def open_engine(store: Path, transport: Any, instances: dict[str, InstanceRecord] | None = None, **options: Any) -> AsyncIterator[Engine]:
    options.setdefault("node_ping_interval", None)
    async with Engine.open(store=store, cluster=Cluster(instances=instances or {}), transport=transport, **options) as engine:
        yield engine


def record(name: str, primary: str, *, admin: AdminState = AdminState.DOWN, hypervisor: str = "fake", **spec: Any) -> InstanceRecord:
    return InstanceRecord(name=name, spec=hv.Instance(name=name, hypervisor=hypervisor, **spec), primary=primary, admin_state=admin)


def instances_toml(instances: dict[str, InstanceRecord]) -> str:
    """``[instances.NAME]`` tables for a cluster file."""
    lines = []
    for rec in instances.values():
        be = rec.spec.beparams
        lines += [
            "",
            f"[instances.{json.dumps(rec.name)}]",
            f"primary = {json.dumps(rec.primary)}",
            f"hypervisor = {json.dumps(rec.spec.hypervisor)}",
            f"admin_state = {json.dumps(rec.admin_state.value)}",
            f"beparams = {{ minmem = {be.minmem}, maxmem = {be.maxmem}, vcpus = {be.vcpus} }}",
        ]
    return "\n".join(lines) + "\n"


class FakeCluster:
    """Fake nodes reached over one transport kind, plus their state dirs."""

    def __init__(self, kind: str, config: ClusterConfig, state_dirs: dict[str, Path], instances: dict[str, InstanceRecord], lc: Any = None) -> None:
        self.kind = kind
        self.config = config
        self.state_dirs = state_dirs
        self.instances = instances
        self.lc = lc

    def cluster(self) -> Cluster:
        return Cluster(config=self.config, instances=dict(self.instances))

    def write_file(self, path: Path) -> Path:
        path.write_text(self.config.to_toml() + instances_toml(self.instances))
        return path

    def configure(self, node: str, **settings: Any) -> None:
        FakeHypervisor.configure(self.state_dirs[node], **settings)

    def events(self, node: str) -> list[dict[str, Any]]:
        return FakeHypervisor.read_events(self.state_dirs[node])

    def running(self, node: str) -> set[str]:
        """Instances the node really has (its state directory, read directly)."""
        from hv.fake._state import StateDir

        return set(StateDir(self.state_dirs[node], node=node).names())

    @contextlib.asynccontextmanager
    async def engine(self, store: Path, **options: Any) -> AsyncIterator[Engine]:
        options.setdefault("node_ping_interval", None)
        async with Engine.open(store=store, cluster=self.cluster(), **options) as engine:
            yield engine


def default_instances() -> dict[str, InstanceRecord]:
    be = hv.BeParams(minmem=128, maxmem=512, vcpus=1)
    return {"web1": record("web1", "n1", beparams=be), "web2": record("web2", "n2", beparams=be)}


def local_config(tmp_path: Path) -> tuple[ClusterConfig, dict[str, Path]]:
    dirs = {n: tmp_path / "nodes" / n for n in NODES}
    nodes = {
        n: NodeConfig(name=n, transport="local", hypervisor="fake", hv_options={"state_dir": str(d)}) for n, d in dirs.items()
    }
    return ClusterConfig(name="test", nodes=nodes, call_timeout=60.0), dirs


@pytest.fixture(params=["local", "ssh"])
async def fake_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FakeCluster]:
    """Two fake nodes (n1, n2) with web1 on n1 and web2 on n2: local, or behind SSH."""
    if request.param == "local":
        config, dirs = local_config(tmp_path)
        yield FakeCluster("local", config, dirs, default_instances())
        return
    from transport.testing import LocalCluster

    async with LocalCluster(n=len(NODES), base_dir=tmp_path / "cluster", hypervisor="fake", call_timeout=60.0) as lc:
        yield FakeCluster("ssh", lc.config, {n: lc.state_dir(n) for n in NODES}, default_instances(), lc=lc)


@pytest.fixture
def local_cluster(tmp_path: Path) -> FakeCluster:
    config, dirs = local_config(tmp_path)
    return FakeCluster("local", config, dirs, default_instances())


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "herd.db"


@pytest.fixture
async def empty_transport() -> AsyncIterator[LocalTransport]:
    async with LocalTransport({}) as transport:
        yield transport
