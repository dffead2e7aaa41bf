"""Cancel and failure at each step: the instance ends running once, on the source
(before the point of no return) or on the target (after it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest

from engine import Engine, Event, JobState, Migrate, Reconcile

from .conftest import MIB, spec, step_names

pytestmark = pytest.mark.anyio

SLOW = {"bandwidth": 32 * MIB}  # 128 MiB takes 4 s: room to act mid-copy


async def until(engine: Engine, job_id: int, pred: Callable[[Event], bool]) -> Event:
    async for event in engine.watch(job_id):
        if pred(event):
            return event
    raise AssertionError(f"job {job_id} ended before the awaited event")


def step_started(name: str) -> Callable[[Event], bool]:
    return lambda e: e.kind == "step-start" and e.data.get("name", e.data.get("step")) == name


# (method whose step hangs, node it runs on)
BEFORE_PONR = [
    ("migration_info", "n1"),
    ("accept_instance", "n2"),
    ("migrate_instance", "n1"),
]


@pytest.mark.parametrize(
    ("method", "node", "step"),
    [("get_instance_info", "n1", "check-source"), ("validate_parameters", "n2", "check-hvparams"), *((m, n, m) for m, n in BEFORE_PONR)],
)
async def test_cancel_at_step_leaves_it_on_the_source(make_env, method: str, node: str, step: str) -> None:
    async with make_env(instances={"web1": ("n1", spec())}, settings=SLOW) as env:
        env.fault(node, method, delay=30.0, times=1)
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2"))
        await until(env.engine, job_id, step_started(step))
        state = await env.engine.cancel(job_id, "operator changed their mind")
        assert state is JobState.CANCELLED
        job = await env.engine.get(job_id)
        assert "cancelled" in job.error.message
        await env.assert_runs_once("web1", "n1")


async def test_cancel_mid_copy_rolls_back(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}, settings=SLOW) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2"))
        await until(env.engine, job_id, lambda e: e.kind == "progress" and e.data.get("percent", 0) > 5)
        began = anyio.current_time()
        assert await env.engine.cancel(job_id, "too slow") is JobState.CANCELLED
        assert anyio.current_time() - began < 2.0
        job = await env.engine.get(job_id)
        names = step_names(job)
        # the driver's migration is cancelled first, then both sides finalized
        assert names.index("rollback-cancel") < names.index("rollback-finalize-dst") < names.index("rollback-finalize-source")
        await env.assert_runs_once("web1", "n1")


@pytest.mark.parametrize(("method", "node"), [("finalize_migration_dst", "n2"), ("finalize_migration_source", "n1")])
async def test_cancel_after_point_of_no_return_completes_forward(make_env, method: str, node: str) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        env.fault(node, method, delay=1.0, times=1)
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2"))
        await until(env.engine, job_id, step_started(method))
        assert await env.engine.cancel(job_id, "too late") is JobState.SUCCEEDED
        job = await env.engine.get(job_id)
        assert job.result["cancel"]["too_late"] is True
        await env.assert_runs_once("web1", "n2")


@pytest.mark.parametrize(("method", "node"), BEFORE_PONR)
async def test_failure_at_step_leaves_it_on_the_source(make_env, method: str, node: str) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        env.fault(node, method, error="disk on fire", times=1)
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.FAILED
        # the error names the step, the node and the cause, and where the instance is now
        assert f"at step {method}" in job.error.message and f"on node {node}" in job.error.message
        assert "disk on fire" in job.error.message and "runs on n1" in job.error.message
        await env.assert_runs_once("web1", "n1")


async def test_status_reads_failing_transiently_are_tolerated(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}, settings=SLOW) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", policy={"status_failures": 3}))
        await until(env.engine, job_id, lambda e: e.kind == "progress")
        env.fault("n1", "get_migration_status", error="monitor hiccup", times=2)
        job = await env.engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        assert len(await env.events(job_id, "status-read-failed")) == 2
        await env.assert_runs_once("web1", "n2")


async def test_monitor_lost_aborts_the_driver_migration_first(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}, settings=SLOW) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", policy={"status_failures": 2}))
        await until(env.engine, job_id, lambda e: e.kind == "progress")
        env.fault("n1", "get_migration_status", error="monitor gone")
        job = await env.engine.wait(job_id)
        assert job.state is JobState.FAILED
        assert "could not be read 3 times" in job.error.message
        assert step_names(job).index("rollback-cancel") < step_names(job).index("rollback-finalize-dst")
        env.clear_faults()
        await env.assert_runs_once("web1", "n1")


async def test_failure_finalizing_the_target_completes_forward(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        env.fault("n2", "finalize_migration_dst", error="flaky", times=1)
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.SUCCEEDED, job.error
        assert "complete-finalize-target" in step_names(job)
        await env.assert_runs_once("web1", "n2")


async def test_source_that_cannot_be_finalized_is_pending_cleanup_then_cleaned(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        env.fault("n1", "finalize_migration_source", error="source wedged", times=1)
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.SUCCEEDED, job.error
        assert "source wedged" in job.result["pending_cleanup"]
        record = await env.engine.instance("web1")
        assert record.primary == "n2" and [p.node for p in record.pending_cleanup] == ["n1"]
        assert await env.where("web1") == {"n1": "paused", "n2": "running"}  # the stale source, paused
        job = await env.engine.wait(await env.engine.submit(Reconcile(instance="web1")))
        assert job.state is JobState.SUCCEEDED, job.error
        await env.assert_runs_once("web1", "n2")
        assert (await env.engine.instance("web1")).pending_cleanup == ()


async def test_step_timeout_rolls_back(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        env.fault("n2", "accept_instance", hang=True, times=1)
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2", deadlines={"accept_instance": 0.5})))
        assert job.state is JobState.FAILED
        assert "StepTimeout" in job.error.message and "deadline of 0.5s" in job.error.message and "runs on n1" in job.error.message
        await env.assert_runs_once("web1", "n1")
