"""The job machinery with no-op jobs: states, locks, priority, cancel, watch."""

from __future__ import annotations

import os
import stat
import sqlite3
from pathlib import Path

import anyio
import pytest

from engine import (
    DependencyFailed,
    Engine,
    InvalidOperation,
    JobState,
    Noop,
    StoreError,
    StopInstance,
)
from engine._optable import op_from_dict
from engine._store import SCHEMA_VERSION, SqliteStore
from engine._locks import LockManager, instance_lock, node_lock, normalise

from .conftest import open_engine, record

pytestmark = pytest.mark.anyio


async def _states(engine: Engine, job_id: int) -> list[str]:
    return [e.data["state"] for e in await engine.store.events(job_id) if e.kind == "state"]


async def _wait_state(engine: Engine, job_id: int, state: JobState) -> None:
    async for ev in engine.watch(job_id):
        if ev.kind == "state" and ev.data["state"] == state.value:
            return
    raise AssertionError(f"job {job_id} ended without reaching {state.value}")


async def test_state_machine_and_journal(store_path: Path, empty_transport) -> None:
    async with open_engine(store_path, empty_transport) as engine:
        job_id = await engine.submit(Noop(steps=3))
        job = await engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED
        assert job.result == {"steps": 3}
        assert [s.name for s in job.steps] == ["noop-0", "noop-1", "noop-2"]
        assert all(s.state.value == "succeeded" and s.ended_at is not None for s in job.steps)
        assert await _states(engine, job_id) == ["queued", "waiting", "running", "succeeded"]
        kinds = [e.kind for e in await engine.store.events(job_id)]
        # every step start is journaled before its end, in order
        assert kinds == ["state"] * 3 + ["step-start", "step-end"] * 3 + ["state"]
        assert [j.id for j in await engine.list(state=JobState.SUCCEEDED)] == [job_id]
        assert await engine.list(state=JobState.RUNNING) == []


async def test_invalid_operations_never_stored(store_path: Path, empty_transport) -> None:
    async with open_engine(store_path, empty_transport, instances={"web1": record("web1", "n1")}) as engine:
        with pytest.raises(InvalidOperation, match="unknown instance 'nope'"):
            await engine.submit(StopInstance(instance="nope"))
        with pytest.raises(InvalidOperation, match="priority"):
            await engine.submit(Noop(), priority=99)
        with pytest.raises(InvalidOperation, match="depends_on"):
            await engine.submit(Noop(), depends_on=[12345])
        with pytest.raises(InvalidOperation, match="steps"):
            await engine.submit(Noop(steps=-1))
        with pytest.raises(InvalidOperation, match="deadline"):
            await engine.submit(Noop(deadlines={"x": -1.0}))
        # from outside (CLI, HTTP): a misspelt field is named, not silently dropped
        with pytest.raises(InvalidOperation, match="unknown field `instanse`"):
            op_from_dict({"kind": "stop-instance", "instanse": "web1"})
        with pytest.raises(InvalidOperation, match=r"Expected `float`, got `str` - at `\$\.timeout`"):
            op_from_dict({"kind": "stop-instance", "instance": "web1", "timeout": "soon"})
        assert await engine.list() == []
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM events WHERE job_id IS NOT NULL").fetchone()[0] == 0
    finally:
        conn.close()


async def test_same_instance_serialises_other_instance_parallel(store_path: Path, empty_transport) -> None:
    instances = {"a": record("a", "n1"), "b": record("b", "n1")}
    async with open_engine(store_path, empty_transport, instances=instances) as engine:
        first = await engine.submit(Noop(hold_instance="a", sleep=30))
        await _wait_state(engine, first, JobState.RUNNING)
        same = await engine.submit(Noop(hold_instance="a"))
        other = await engine.submit(Noop(hold_instance="b"))
        # The other instance's job runs to the end while the first still holds "a".
        assert (await engine.wait(other)).state is JobState.SUCCEEDED
        assert (await engine.get(same)).state is JobState.WAITING
        assert (await engine.get(first)).state is JobState.RUNNING
        assert engine.locks()["instance/a(x)"] == [first]
        await engine.cancel(first, reason="let the second go")
        job = await engine.wait(same)
        assert job.state is JobState.SUCCEEDED
        first_done = (await engine.get(first)).finished_at
        assert job.started_at is not None and first_done is not None and job.started_at >= first_done


async def test_priority_then_age(store_path: Path, empty_transport) -> None:
    async with open_engine(store_path, empty_transport, instances={"a": record("a", "n1")}) as engine:
        blocker = await engine.submit(Noop(hold_instance="a", sleep=30))
        await _wait_state(engine, blocker, JobState.RUNNING)
        low = await engine.submit(Noop(hold_instance="a"), priority=10)
        mid1 = await engine.submit(Noop(hold_instance="a"), priority=0)
        high = await engine.submit(Noop(hold_instance="a"), priority=-10)
        mid2 = await engine.submit(Noop(hold_instance="a"), priority=0)
        for j in (low, mid1, high, mid2):
            await _wait_state(engine, j, JobState.WAITING)
        await engine.cancel(blocker, reason="go")
        jobs = [await engine.wait(j) for j in (low, mid1, high, mid2)]
        order = [j.id for j in sorted(jobs, key=lambda j: j.started_at)]
        assert order == [high, mid1, mid2, low]


async def test_max_running_jobs(store_path: Path, empty_transport) -> None:
    async with open_engine(store_path, empty_transport, max_running_jobs=1) as engine:
        first = await engine.submit(Noop(sleep=30))
        await _wait_state(engine, first, JobState.RUNNING)
        second = await engine.submit(Noop())
        await _wait_state(engine, second, JobState.WAITING)
        assert (await engine.get(second)).state is JobState.WAITING
        assert await engine.cancel(first, reason="free the slot") is JobState.CANCELLED
        assert (await engine.wait(second)).state is JobState.SUCCEEDED


async def test_cancel_queued_waiting_running(store_path: Path, empty_transport) -> None:
    async with open_engine(store_path, empty_transport, instances={"a": record("a", "n1")}) as engine:
        running = await engine.submit(Noop(hold_instance="a", sleep=30))
        await _wait_state(engine, running, JobState.RUNNING)
        waiting = await engine.submit(Noop(hold_instance="a"))
        queued = await engine.submit(Noop(), depends_on=[running])
        await _wait_state(engine, waiting, JobState.WAITING)
        assert (await engine.get(queued)).state is JobState.QUEUED

        assert await engine.cancel(queued, reason="not needed") is JobState.CANCELLED
        assert await engine.cancel(waiting, reason="changed my mind") is JobState.CANCELLED
        assert await _states(engine, queued) == ["queued", "cancelled"]
        assert await _states(engine, waiting) == ["queued", "waiting", "cancelled"]
        assert (await engine.get(running)).state is JobState.RUNNING

        assert await engine.cancel(running, reason="operator") is JobState.CANCELLED
        job = await engine.get(running)
        assert job.cancel_reason == "operator"
        assert job.error is not None and "operator" in job.error.message and job.error.type == "JobCancelled"
        assert await _states(engine, running) == ["queued", "waiting", "running", "cancelling", "cancelled"]
        assert job.steps[-1].state.value == "cancelled"
        # nothing is left holding the lock
        assert engine.locks() == {}
        # a final job: cancel is a no-op that reports its state
        assert await engine.cancel(running, reason="again") is JobState.CANCELLED


async def test_dependency_failure_fails_dependent(store_path: Path, empty_transport) -> None:
    async with open_engine(store_path, empty_transport) as engine:
        dep = await engine.submit(Noop(sleep=30))
        await _wait_state(engine, dep, JobState.RUNNING)
        child = await engine.submit(Noop(), depends_on=[dep])
        ok_dep = await engine.submit(Noop())
        after_ok = await engine.submit(Noop(), depends_on=[ok_dep])
        assert (await engine.wait(after_ok)).state is JobState.SUCCEEDED
        await engine.cancel(dep, reason="boom")
        job = await engine.wait(child)
        assert job.state is JobState.FAILED
        assert job.error is not None and job.error.type == DependencyFailed.__name__
        assert f"job {dep}" in job.error.message and "cancelled" in job.error.message


async def test_late_watch_sees_every_event(store_path: Path, empty_transport) -> None:
    async with open_engine(store_path, empty_transport) as engine:
        job_id = await engine.submit(Noop(steps=3, sleep=0.01))
        early: list[int] = []
        async with anyio.create_task_group() as tg:

            async def follow() -> None:
                async for ev in engine.watch(job_id):
                    early.append(ev.seq)

            tg.start_soon(follow)
            await engine.wait(job_id)
        late = [ev.seq async for ev in engine.watch(job_id)]
        stored = [ev.seq for ev in await engine.store.events(job_id)]
        assert early == late == stored
        assert len(stored) == 3 + 6 + 1
        # a watch started mid-job also sees the past, then follows
        second = await engine.submit(Noop(sleep=30))
        await _wait_state(engine, second, JobState.RUNNING)
        seen: list[str] = []
        async with anyio.create_task_group() as tg:

            async def follow2() -> None:
                async for ev in engine.watch(second):
                    seen.append(ev.data.get("state") or ev.kind)

            tg.start_soon(follow2)
            await engine.cancel(second, reason="done")
        assert seen[:3] == ["queued", "waiting", "running"] and seen[-1] == "cancelled"


async def test_queued_jobs_survive_restart(store_path: Path, empty_transport) -> None:
    async with open_engine(store_path, empty_transport, instances={"a": record("a", "n1")}) as engine:
        blocker = await engine.submit(Noop(hold_instance="a", sleep=30))
        await _wait_state(engine, blocker, JobState.RUNNING)
        waiting = await engine.submit(Noop(hold_instance="a"))
        queued = await engine.submit(Noop(), depends_on=[waiting])
        await _wait_state(engine, waiting, JobState.WAITING)
    async with open_engine(store_path, empty_transport) as engine:
        # the running no-op is recovered (failed honestly: nothing to resume),
        # the waiting and queued ones run.
        job = await engine.wait(blocker)
        assert job.state is JobState.FAILED and job.result == {"recovered": True}
        assert (await engine.wait(waiting)).state is JobState.SUCCEEDED
        assert (await engine.wait(queued)).state is JobState.SUCCEEDED


async def test_store_file_schema_and_transitions(store_path: Path) -> None:
    store = SqliteStore(store_path)
    await store.open()
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        assert stat.S_IMODE(os.stat(store_path).st_mode) == 0o600
        job, _ = await store.create_job(Noop(), priority=0, depends_on=(), parent_id=None, now=1.0)
        with pytest.raises(StoreError, match="queued → succeeded"):
            await store.transition(job.id, [JobState.SUCCEEDED], now=2.0)
        # the refused transition left nothing behind
        assert (await store.get_job(job.id)).state is JobState.QUEUED
        assert len(await store.events(job.id)) == 1
    finally:
        await store.aclose()
    conn = sqlite3.connect(store_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
        conn.commit()
    finally:
        conn.close()
    newer = SqliteStore(store_path)
    with pytest.raises(StoreError, match="schema version 99"):
        await newer.open()


def test_lock_manager_all_or_nothing_and_order() -> None:
    locks = LockManager()
    a = [instance_lock("web1"), node_lock("n1")]
    assert [str(r) for r in normalise(a)] == ["node/n1(s)", "instance/web1(x)"]
    assert locks.try_acquire(1, a)
    assert locks.try_acquire(2, [node_lock("n1"), instance_lock("web2")])  # shared node
    assert not locks.try_acquire(3, [instance_lock("web3"), node_lock("n1", exclusive=True)])
    assert locks.holders("instance", "web3") == set()  # nothing taken by the refused request
    locks.release_all(1)
    locks.release_all(2)
    assert locks.try_acquire(3, [node_lock("n1", exclusive=True)])
    assert locks.snapshot() == {"node/n1(x)": [3]}


async def test_group_commit_isolates_a_failing_write(store_path: Path) -> None:
    store = SqliteStore(store_path)
    await store.open()
    try:
        first, _ = await store.create_job(Noop(), priority=0, depends_on=(), parent_id=None, now=1.0)
        results: dict[str, object] = {}
        async with anyio.create_task_group() as tg:

            async def create(i: int) -> None:
                job, _ = await store.create_job(Noop(steps=i), priority=0, depends_on=(), parent_id=None, now=2.0)
                results[f"job{i}"] = job.id

            async def bad() -> None:
                try:
                    await store.transition(first.id, [JobState.SUCCEEDED], now=3.0)
                except StoreError as err:
                    results["bad"] = err

            for i in range(10):
                tg.start_soon(create, i)
            tg.start_soon(bad)
            for i in range(10, 20):
                tg.start_soon(create, i)
        assert isinstance(results["bad"], StoreError)
        ids = sorted(v for k, v in results.items() if k.startswith("job"))
        assert len(ids) == 20
        jobs = await store.list_jobs()
        assert sorted(j.id for j in jobs) == sorted([first.id, *ids])
        assert (await store.get_job(first.id)).state is JobState.QUEUED
    finally:
        await store.aclose()


def test_error_info_unwraps_single_groups() -> None:
    from engine import ErrorInfo, NodeOffline

    info = ErrorInfo.from_exception(ExceptionGroup("g", [NodeOffline("n1 is down", node="n1")]), step="stop")
    assert info.type == "NodeOffline" and info.node == "n1" and info.step == "stop"
    assert info.is_a("NodeUnreachable") and info.is_a("EngineError")


async def test_unknown_job_ids(store_path: Path, empty_transport) -> None:
    from engine import JobNotFound

    async with open_engine(store_path, empty_transport) as engine:
        with pytest.raises(JobNotFound):
            await engine.get(42)
        with pytest.raises(JobNotFound):
            await engine.wait(42)
        with pytest.raises(JobNotFound):
            await engine.cancel(42, reason="x")
        with pytest.raises(JobNotFound):
            async for _ in engine.watch(42):
                pass
        with pytest.raises(InvalidOperation, match="reason"):
            await engine.cancel(1, reason=" ")
