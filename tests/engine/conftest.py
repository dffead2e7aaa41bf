"""Fixtures for the engine tests: stores on disk, engines on LocalTransport."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import hv
from engine import Cluster, Engine, InstanceRecord, AdminState
from transport import LocalTransport


@contextlib.asynccontextmanager
async def open_engine(store: Path, transport: Any, instances: dict[str, InstanceRecord] | None = None, **options: Any) -> AsyncIterator[Engine]:
    options.setdefault("node_ping_interval", None)
    async with Engine.open(store=store, cluster=Cluster(instances=instances or {}), transport=transport, **options) as engine:
        yield engine


def record(name: str, primary: str, *, admin: AdminState = AdminState.DOWN, hypervisor: str = "fake", **spec: Any) -> InstanceRecord:
    return InstanceRecord(name=name, spec=hv.Instance(name=name, hypervisor=hypervisor, **spec), primary=primary, admin_state=admin)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "herd.db"


@pytest.fixture
async def empty_transport() -> AsyncIterator[LocalTransport]:
    async with LocalTransport({}) as transport:
        yield transport
