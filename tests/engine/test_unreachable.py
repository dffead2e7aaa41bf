"""An idempotent read that keeps finding its node unreachable marks it offline."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from engine import JobState, StartInstance

from .conftest import FakeCluster, default_instances

pytestmark = pytest.mark.anyio


async def test_read_step_on_killed_node_marks_it_offline(tmp_path: Path) -> None:
    from transport.testing import LocalCluster

    async with LocalCluster(n=2, base_dir=tmp_path / "cluster", hypervisor="fake", keepalive_interval=0.5, keepalive_count_max=2) as lc:
        fc = FakeCluster("ssh", lc.config, {n: lc.state_dir(n) for n in ("n1", "n2")}, default_instances(), lc=lc)
        async with fc.engine(tmp_path / "herd.db") as engine:
            # connected and working first
            ok = await engine.wait(await engine.submit(StartInstance(instance="web2")))
            assert ok.state is JobState.SUCCEEDED, ok.error
            await lc.kill("n1")
            assert engine.node_online("n1")  # nobody has noticed yet (no pinger)
            started = anyio.current_time()
            first = await engine.wait(await engine.submit(StartInstance(instance="web1")))
            assert anyio.current_time() - started < 8.0  # a few retries, not the 15 s deadline
            assert first.state is JobState.FAILED
            assert first.error is not None and first.error.is_a("NodeUnreachable")
            assert "NodeUnreachable" in first.error.message and "n1" in first.error.message and "check-state" in first.error.message
            step = [s for s in first.steps if s.name == "check-state"][0]
            assert step.state.value == "failed" and step.attempts > 1  # retried, then gave up
            assert not engine.node_online("n1")
            assert [n.online for n in engine.nodes() if n.name == "n1"] == [False]
            # a later job needing n1 fails fast, not after its 15 s deadline
            started = anyio.current_time()
            second = await engine.wait(await engine.submit(StartInstance(instance="web1")))
            took = anyio.current_time() - started
            assert second.state is JobState.FAILED and second.error is not None
            assert second.error.is_a("NodeOffline") and "NodeUnreachable" in second.error.message
            assert took < 1.0, took
            # n2 is unaffected
            assert engine.node_online("n2")
