"""Cross-process cancel: ``herd cancel`` / ``Engine.cancel`` in one process,
the job running in an engine in another (``tests.engine.engine_proc``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.streams.text import TextReceiveStream
from typer.testing import CliRunner

from engine import Engine, JobState, StartInstance
from engine._store import SqliteStore
from engine.cli import app

from .conftest import FakeCluster
from .test_crash import _node_saw

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


async def _start_web1(fc: FakeCluster, store: Path) -> None:
    async with fc.engine(store) as engine:
        job = await engine.wait(await engine.submit(StartInstance(instance="web1")))
        assert job.state is JobState.SUCCEEDED, job.error


async def _run_cancelled_elsewhere(
    fc: FakeCluster, tmp_path: Path, cancel: Any, *, herd_submit: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An engine process runs stop-instance held in ``stop_instance`` on n1; ``cancel(job_id)`` here.

    The process is ``tests.engine.engine_proc``, or with ``herd_submit`` the
    operator's ``herd submit … --wait``. Returns its final state event and all its events.
    """
    store = tmp_path / "herd.db"
    cluster_file = fc.write_file(tmp_path / "cluster.toml")
    await _start_web1(fc, store)
    fc.configure("n1", faults={"stop_instance": {"hang": True, "times": 1}})
    common = ["--store", str(store), "--cluster", str(cluster_file)]
    if herd_submit:
        argv = [sys.executable, "-m", "engine.cli", "submit", "stop-instance", "instance=web1", *common, "--json"]
    else:
        argv = [
            sys.executable, "-m", "tests.engine.engine_proc", *common,
            "--submit", json.dumps({"kind": "stop-instance", "instance": "web1"}), "--exit-when-done",
        ]
    seen: list[dict[str, Any]] = []
    with open(tmp_path / "engine.log", "ab") as err:
        async with await anyio.open_process(argv, cwd=REPO, stderr=err) as proc:
            try:
                assert proc.stdout is not None
                held = anyio.Event()
                job_id: list[int] = []

                async def read() -> None:
                    buffer = ""
                    async for chunk in TextReceiveStream(proc.stdout):  # type: ignore[arg-type]
                        buffer += chunk
                        *lines, buffer = buffer.split("\n")
                        for line in lines:
                            msg = json.loads(line)
                            seen.append(msg)
                            if "submitted" in msg:
                                job_id.append(msg["submitted"])
                            elif herd_submit and not job_id and msg.get("job_id") is not None:
                                job_id.append(msg["job_id"])
                            elif msg.get("kind") == "step-start" and msg["data"]["step"] == "stop":
                                held.set()

                with anyio.fail_after(30):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(read)
                        await held.wait()
                        await _node_saw(fc, "n1", "start", "stop_instance")
                        await cancel(store, job_id[0])
                assert await proc.wait() == (2 if herd_submit else 0)  # herd submit: 2 = the job did not succeed
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    final = [m for m in seen if m.get("kind") == "state" and m["data"]["state"] in ("succeeded", "failed", "cancelled")]
    assert len(final) == 1, seen
    return final[0], seen


@pytest.mark.parametrize("runner", ["engine-process", "herd-submit"])
async def test_herd_cancel_reaches_a_job_run_by_another_process(local_cluster: FakeCluster, tmp_path: Path, runner: str) -> None:
    result: dict[str, Any] = {}

    async def cancel(store: Path, job_id: int) -> None:
        started = anyio.current_time()
        res = await anyio.to_thread.run_sync(
            lambda: CliRunner().invoke(app, ["cancel", str(job_id), "--store", str(store), "--reason", "operator said so", "--timeout", "20", "--json"])
        )
        result.update(res=res, took=anyio.current_time() - started)

    final, seen = await _run_cancelled_elsewhere(local_cluster, tmp_path, cancel, herd_submit=runner == "herd-submit")
    res = result["res"]
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["state"] == "cancelled" and out["cancel_reason"] == "operator said so"
    assert "operator said so" in out["error"]["message"]
    assert result["took"] < 5.0  # noticed by polling (~0.15 s), not by a slow path
    assert final["data"]["state"] == "cancelled"
    # the engine went through the local path: cancelling (compensation), with the persisted reason
    states = [m["data"]["state"] for m in seen if m.get("kind") == "state"]
    assert states[-2:] == ["cancelling", "cancelled"]
    requested = [m for m in seen if m.get("kind") == "cancel-requested"]  # written by herd cancel, relayed to watchers
    assert [m["data"]["reason"] for m in requested] == ["operator said so"]
    cancelling = next(m for m in seen if m.get("kind") == "state" and m["data"]["state"] == "cancelling")
    assert cancelling["data"]["reason"] == "operator said so"
    # the node's call was cancelled too
    assert any(e["event"] == "cancelled" and e.get("method") == "stop_instance" for e in local_cluster.events("n1"))
    assert "web1" in local_cluster.running("n1")  # the stop never happened
    s = SqliteStore(tmp_path / "herd.db")
    await s.open()
    try:
        job = await s.get_job(final["job_id"])
        assert job.state is JobState.CANCELLED and job.cancel_reason == "operator said so"
        stop = [st for st in job.steps if st.name == "stop"][0]
        assert stop.state.value == "cancelled"
        assert [r.reason for r in await s.cancel_requests()] == ["operator said so"]
    finally:
        await s.aclose()


async def test_engine_cancel_from_another_process(local_cluster: FakeCluster, tmp_path: Path) -> None:
    """``Engine.cancel`` in this process on the same store file: the request reaches the other engine."""
    states: list[JobState] = []

    async def cancel(store: Path, job_id: int) -> None:
        async with local_cluster.engine(store) as engine:
            states.append(await engine.cancel(job_id, reason="from the API", wait=False))
            with anyio.fail_after(10):
                job = await engine.wait(job_id)  # not driven here: followed in the store
            states.append(job.state)

    final, _ = await _run_cancelled_elsewhere(local_cluster, tmp_path, cancel)
    assert final["data"]["state"] == "cancelled" and "from the API" in final["data"]["error"]["message"]
    assert states[-1] is JobState.CANCELLED
    assert any(e["event"] == "cancelled" and e.get("method") == "stop_instance" for e in local_cluster.events("n1"))


async def test_herd_cancel_queued_job_without_engine(local_cluster: FakeCluster, tmp_path: Path) -> None:
    """A job queued by a client engine while no engine owns the store: ``herd cancel`` settles it there."""
    cluster = local_cluster.write_file(tmp_path / "cluster.toml")
    common = ["--store", str(tmp_path / "herd.db")]
    async with Engine.open(store=tmp_path / "herd.db", cluster=cluster, role="client", node_ping_interval=None) as engine:
        job_id = await engine.submit(StartInstance(instance="web1"))
    runner = CliRunner()
    res = await anyio.to_thread.run_sync(lambda: runner.invoke(app, ["cancel", str(job_id), "--reason", "not today", *common, "--cluster", str(cluster)]))
    assert res.exit_code == 0, res.output
    assert f"job {job_id}: cancelled" in res.stdout and "not today" in res.stdout
    res = await anyio.to_thread.run_sync(lambda: runner.invoke(app, ["list", *common, "--json"]))
    assert json.loads(res.stdout)["state"] == "cancelled"
    assert "web1" not in local_cluster.running("n1")
