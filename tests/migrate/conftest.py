"""Fixtures for the migration tests: an engine over fake nodes (LocalTransport).

``fake_env`` gives an :class:`Env`: the engine, one fake node per name (each
its own state directory), and helpers to configure the nodes and to check
the invariant (the instance runs on exactly one node, the one the
inventory names).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import hv
from engine import AdminState, Cluster, Engine, InstanceRecord, Job, JobState
from hv.fake import FakeHypervisor
from transport import LocalTransport

MIB = 1024 * 1024


def spec(name: str = "web1", mem: int = 128, minmem: int | None = None, **kw: Any) -> hv.Instance:
    return hv.Instance(name=name, beparams=hv.BeParams(minmem=minmem or mem, maxmem=mem, vcpus=1), **kw)


@dataclass
class Env:
    engine: Engine
    dirs: dict[str, Path]
    transport: Any

    def configure(self, node: str, **settings: Any) -> None:
        FakeHypervisor.configure(self.dirs[node], **settings)

    def fault(self, node: str, method: str, **fault: Any) -> None:
        current = FakeHypervisor.read_settings(self.dirs[node]).faults
        faults = {k: {"error": v.error, "delay": v.delay, "hang": v.hang, "times": v.times} for k, v in current.items()}
        faults[method] = fault
        self.configure(node, faults=faults)

    def clear_faults(self, *nodes: str) -> None:
        for node in nodes or tuple(self.dirs):
            self.configure(node, faults={})

    async def start(self, inst: hv.Instance, node: str) -> None:
        await self.transport.node(node).start_instance(inst)

    async def where(self, name: str) -> dict[str, str]:
        """Every node that holds ``name``, with the state it reports."""
        found = {}
        for node in self.dirs:
            info = await self.transport.node(node).get_instance_info(name)
            if info is not None:
                found[node] = hv.HvInstanceState(info.state).value
        return found

    async def assert_runs_once(self, name: str, node: str) -> None:
        """The invariant: running on ``node`` only, and the inventory says ``node``."""
        assert await self.where(name) == {node: "running"}
        record = await self.engine.instance(name)
        assert record.primary == node
        assert record.admin_state is AdminState.UP

    async def events(self, job_id: int, kind: str | None = None) -> list[Any]:
        return [e for e in await self.engine.store.events(job_id) if kind is None or e.kind == kind]


def step_names(job: Job) -> list[str]:
    return [s.name for s in job.steps]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_env(tmp_path: Path) -> Callable[..., Any]:
    """``async with make_env(nodes=("n1", "n2"), instances={"web1": ("n1", spec())}) as env:``."""

    @contextlib.asynccontextmanager
    async def make(
        nodes: tuple[str, ...] = ("n1", "n2"),
        instances: dict[str, tuple[str, hv.Instance]] | None = None,
        memory: dict[str, int] | None = None,
        settings: dict[str, Any] | None = None,
        store: Path | None = None,
        **options: Any,
    ) -> AsyncIterator[Env]:
        dirs = {n: tmp_path / n for n in nodes}
        drivers = {n: FakeHypervisor(dirs[n], node=n, memory_total=(memory or {}).get(n, 8192)) for n in nodes}
        for n in nodes:
            FakeHypervisor.configure(dirs[n], **{"bandwidth": 1024 * MIB, **(settings or {})})
        records = {
            name: InstanceRecord(name=name, spec=inst, primary=node, admin_state=AdminState.UP)
            for name, (node, inst) in (instances or {}).items()
        }
        options.setdefault("node_ping_interval", None)
        async with LocalTransport(drivers, owns_drivers=True) as transport:
            env_started = False
            async with Engine.open(store=store or tmp_path / "herd.db", cluster=Cluster(instances=records), transport=transport, **options) as engine:
                env = Env(engine, dirs, transport)
                if not env_started:
                    for name, (node, inst) in (instances or {}).items():
                        if await transport.node(node).get_instance_info(name) is None:
                            await env.start(inst, node)
                yield env

    return make


async def wait_final(engine: Engine, job_id: int) -> Job:
    job = await engine.wait(job_id)
    assert job.state.final
    return job


__all__ = ["Env", "JobState", "MIB", "spec", "step_names", "wait_final"]
