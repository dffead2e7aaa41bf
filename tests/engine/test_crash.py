"""The engine process killed (SIGKILL) at each step, reopened, jobs recovered.

The engine runs in a subprocess (``tests.engine.engine_proc``); a fault on
the fake node freezes the job at the chosen step, the test SIGKILLs the
process, clears the fault, reopens the store in-process and checks that
``recover()`` drove the job to a final state consistent with the node.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.text import TextReceiveStream

from engine import AdminState, JobState, StartInstance

from .conftest import FakeCluster

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


async def run_until_step(
    store: Path, cluster_file: Path, op: dict[str, Any], step: str, log: Path, on_step: Callable[[str], None] | None = None,
    in_flight: Callable[[], Any] | None = None,
) -> int:
    """Start an engine process, submit ``op``, SIGKILL it once ``step`` has started; the job id.

    ``in_flight``: awaited before the kill (e.g. until the node shows the call started).
    """
    argv = [sys.executable, "-m", "tests.engine.engine_proc", "--store", str(store), "--cluster", str(cluster_file), "--submit", json.dumps(op)]
    job_id = None
    with open(log, "ab") as err:
        async with await anyio.open_process(argv, cwd=REPO, stderr=err) as proc:
            try:
                assert proc.stdout is not None
                buffer = ""
                with anyio.fail_after(30):
                    async for chunk in TextReceiveStream(proc.stdout):
                        buffer += chunk
                        *lines, buffer = buffer.split("\n")
                        done = False
                        for line in lines:
                            msg = json.loads(line)
                            if "submitted" in msg:
                                job_id = msg["submitted"]
                            elif msg.get("kind") == "step-start":
                                if on_step is not None:
                                    on_step(msg["data"]["step"])
                                if msg["data"]["step"] == step:
                                    done = True
                            elif msg.get("kind") == "state" and msg["data"]["state"] in ("succeeded", "failed", "cancelled"):
                                raise AssertionError(f"job ended before step {step!r}: {msg}")
                        if done:
                            if in_flight is not None:
                                await in_flight()
                            break
            finally:
                proc.kill()  # SIGKILL: no cleanup, no final writes
                await proc.wait()
    assert job_id is not None
    return job_id


async def _start_web1(fc: FakeCluster, store: Path) -> None:
    async with fc.engine(store) as engine:
        job = await engine.wait(await engine.submit(StartInstance(instance="web1")))
        assert job.state is JobState.SUCCEEDED, job.error


async def _node_saw(fc: FakeCluster, node: str, event: str, method: str) -> None:
    with anyio.fail_after(10):
        while not any(e["event"] == event and e.get("method") == method for e in fc.events(node)):
            await anyio.sleep(0.02)


# (name, op, step to kill at, faults to arm, web1 running before, expected state, web1 running after)
SCENARIOS = [
    ("start@check", {"kind": "start-instance", "instance": "web1"}, "check-state", {"get_instance_info": {"hang": True, "times": 1}}, False, "failed", False),
    ("start@memory", {"kind": "start-instance", "instance": "web1"}, "node-memory", {"get_node_info": {"hang": True, "times": 1}}, False, "failed", False),
    ("start@start", {"kind": "start-instance", "instance": "web1"}, "start", {"start_instance": {"hang": True, "times": 1}}, False, "failed", False),
    ("start@prove", {"kind": "start-instance", "instance": "web1"}, "prove-running", None, False, "succeeded", True),
    ("stop@stop", {"kind": "stop-instance", "instance": "web1", "timeout": 5}, "stop", {"stop_instance": {"hang": True, "times": 1}}, True, "succeeded", False),
    ("stop@prove", {"kind": "stop-instance", "instance": "web1"}, "prove-stopped", {"get_instance_info": {"hang": True, "times": 1}}, True, "succeeded", False),
    ("reboot@reboot", {"kind": "reboot-instance", "instance": "web1"}, "reboot", {"reboot_instance": {"hang": True, "times": 1}}, True, "failed", True),
    ("reboot@check", {"kind": "reboot-instance", "instance": "web1"}, "check-state", {"get_instance_info": {"hang": True, "times": 1}}, True, "succeeded", True),
    ("hard-reboot@stop", {"kind": "reboot-instance", "instance": "web1", "reboot_type": "hard"}, "stop", {"stop_instance": {"hang": True, "times": 1}}, True, "failed", True),
    ("hard-reboot@start", {"kind": "reboot-instance", "instance": "web1", "reboot_type": "hard"}, "start", {"start_instance": {"hang": True, "times": 1}}, True, "failed", True),
]


@pytest.mark.parametrize(("name", "op", "step", "faults", "running_before", "expected", "running_after"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
async def test_engine_killed_at_step(
    local_cluster: FakeCluster, tmp_path: Path, name: str, op: dict[str, Any], step: str,
    faults: dict[str, Any] | None, running_before: bool, expected: str, running_after: bool,
) -> None:
    store = tmp_path / "herd.db"
    cluster_file = local_cluster.write_file(tmp_path / "cluster.toml")
    if running_before:
        await _start_web1(local_cluster, store)
    on_step = None
    if faults is not None:
        local_cluster.configure("n1", faults=faults)
    else:
        # Freeze the *second* get_instance_info (prove-running): slow the
        # node-memory read, and arm the hang while it runs.
        local_cluster.configure("n1", faults={"get_node_info": {"delay": 1.0, "times": 1}})

        def on_step(s: str) -> None:
            if s == "node-memory":
                local_cluster.configure("n1", faults={"get_instance_info": {"hang": True, "times": 1}})

    method = next(iter(faults)) if faults else None
    in_flight = (lambda: _node_saw(local_cluster, "n1", "start", method)) if method else None
    job_id = await run_until_step(store, cluster_file, op, step, tmp_path / "engine.log", on_step, in_flight)
    local_cluster.configure("n1", faults={})

    async with local_cluster.engine(store) as engine:
        with anyio.fail_after(20):
            job = await engine.wait(job_id)
        assert job.state.value == expected, (job.state, job.error, job.result)
        assert job.result is not None and job.result.get("recovered") is True
        running = "web1" in local_cluster.running("n1")
        assert running is running_after
        # the invariant: the inventory says what the node really does
        record = await engine.instance("web1")
        assert record.primary == "n1"
        assert record.admin_state is (AdminState.UP if running else AdminState.DOWN)
        assert "web1" not in local_cluster.running("n2")
        # the step that was in progress at the kill is still journaled as started
        started = [s for s in job.steps if s.name == step]
        assert started and started[0].state.value == "running"


async def test_recovery_waits_for_unreachable_node(tmp_path: Path) -> None:
    """Over SSH: engine killed mid-stop, node down at reopen → pending, then settled."""
    from transport.testing import LocalCluster

    from .conftest import default_instances

    store = tmp_path / "herd.db"
    async with LocalCluster(n=2, base_dir=tmp_path / "cluster", hypervisor="fake", keepalive_interval=0.5, keepalive_count_max=2) as lc:
        fc = FakeCluster("ssh", lc.config, {n: lc.state_dir(n) for n in ("n1", "n2")}, default_instances(), lc=lc)
        cluster_file = fc.write_file(tmp_path / "herd-cluster.toml")
        await _start_web1(fc, store)
        fc.configure("n1", faults={"stop_instance": {"hang": True, "times": 1}})
        job_id = await run_until_step(
            store, cluster_file, {"kind": "stop-instance", "instance": "web1"}, "stop", tmp_path / "engine.log",
            in_flight=lambda: _node_saw(fc, "n1", "start", "stop_instance"),
        )
        await lc.kill("n1")
        fc.configure("n1", faults={})
        async with fc.engine(store, recovery_backoff=(0.2, 0.5)) as engine:
            with anyio.fail_after(20):
                async for ev in engine.watch(job_id):
                    if ev.kind == "recovery" and ev.data["pending"]:
                        assert "NodeUnreachable" in ev.data["note"] or "NodeOffline" in ev.data["note"]
                        break
            job = await engine.get(job_id)
            assert job.state is JobState.RUNNING and job.recovery and "recovery pending" in job.recovery
            await lc.restart("n1")
            with anyio.fail_after(30):
                job = await engine.wait(job_id)
            assert job.state is JobState.SUCCEEDED, job.error
            assert job.recovery is None
            assert "web1" not in fc.running("n1")
            assert (await engine.instance("web1")).admin_state is AdminState.DOWN
