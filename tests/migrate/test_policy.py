"""The convergence policy: pure decisions, then real non-converging fake migrations."""

from __future__ import annotations

import pytest

from engine import InvalidOperation, JobState, Migrate, MigrationPolicy
from engine._policy import GIB, Action, Convergence

from .conftest import MIB, spec

MIB_ = 2**20


def conv(**knobs: object) -> Convergence:
    policy = MigrationPolicy().with_overrides(knobs)
    return Convergence(policy, ram_total=GIB, started=0.0, downtime_ms=300)


def test_stall_raises_downtime_step_by_step_to_the_cap_then_aborts() -> None:
    c = conv(stall_window=5.0, downtime_step_ms=300, downtime_max_ms=900)
    assert c.observe(0.0, 900 * MIB_) is None
    assert c.observe(4.9, 900 * MIB_) is None
    d = c.observe(5.0, 900 * MIB_)
    assert d.action is Action.RAISE_DOWNTIME and d.downtime_ms == 600 and "not fallen for 5.0s" in d.reason
    assert c.observe(9.0, 900 * MIB_) is None  # the raise restarts the window
    d = c.observe(10.0, 900 * MIB_)
    assert d.action is Action.RAISE_DOWNTIME and d.downtime_ms == 900 and "(the cap)" in d.reason
    d = c.observe(15.0, 900 * MIB_)
    assert d.action is Action.ABORT and "at the downtime cap of 900 ms" in d.reason
    assert c.observe(99.0, 900 * MIB_) is None  # decided once


def test_progress_resets_the_stall_window() -> None:
    c = conv(stall_window=5.0)
    c.observe(0.0, 900 * MIB_)
    assert c.observe(4.0, 500 * MIB_) is None  # a new low
    assert c.observe(8.0, 499 * MIB_) is None  # not enough progress, but the window restarted at 4.0
    assert c.observe(9.0, 499 * MIB_).action is Action.RAISE_DOWNTIME


def test_completion_timeout_scales_with_ram_and_forces_completion() -> None:
    c = conv(timeout_per_gib=100.0, min_timeout=10.0, stall_window=1000.0, on_timeout="force-complete", force_grace=30.0)
    assert c.timeout == 100.0
    assert c.observe(99.0, 10 * MIB_) is None or True
    d = c.observe(100.0, 5 * MIB_)
    assert d.action is Action.FORCE_COMPLETE and "completion timeout of 100s" in d.reason and "1.00 GiB" in d.reason
    assert c.observe(129.0, 5 * MIB_) is None
    assert c.observe(130.0, 5 * MIB_).action is Action.ABORT  # forcing did not finish it
    assert MigrationPolicy(min_timeout=60.0).completion_timeout(GIB // 100) == 60.0


def test_auto_converge_waits_for_the_timeout_at_the_cap() -> None:
    c = conv(stall_window=1.0, downtime_max_ms=300, auto_converge=True, timeout_per_gib=50.0, min_timeout=1.0)
    c.observe(0.0, 900 * MIB_)
    d = c.observe(1.0, 900 * MIB_)
    assert d.action is Action.AUTO_CONVERGE and "throttle" in d.reason
    assert c.observe(20.0, 900 * MIB_) is None
    assert c.observe(50.0, 900 * MIB_).action is Action.ABORT


def test_policy_knobs_are_validated() -> None:
    with pytest.raises(InvalidOperation, match="stall_window must be a finite number > 0"):
        MigrationPolicy().with_overrides({"stall_window": -1})
    with pytest.raises(InvalidOperation, match="on_timeout"):
        MigrationPolicy().with_overrides({"on_timeout": "pray"})
    with pytest.raises(InvalidOperation, match="downtime_start_ms"):
        MigrationPolicy().with_overrides({"downtime_start_ms": 5000})


# --- real (fake-driver) migrations whose dirty rate beats the bandwidth ---------------

NON_CONVERGING = {"bandwidth": 64 * MIB, "dirty_rate": 128 * MIB}
FAST_POLICY = {"stall_window": 0.4, "downtime_step_ms": 200, "downtime_max_ms": 700, "status_wait": 0.2}


async def _policy_events(env, job_id: int) -> list[dict]:
    return [e.data for e in await env.events(job_id, "policy")]


@pytest.mark.anyio
async def test_non_converging_migration_raises_downtime_then_aborts(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec(mem=64))}, settings=NON_CONVERGING) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", policy=FAST_POLICY))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.FAILED
        actions = [(p["action"], p.get("downtime_ms")) for p in await _policy_events(env, job_id)]
        assert actions == [("raise-downtime", 500), ("raise-downtime", 700), ("abort", None)]
        assert "convergence policy aborted" in job.error.message and "runs on n1" in job.error.message
        assert all(p["reason"] for p in await _policy_events(env, job_id))
        await env.assert_runs_once("web1", "n1")


@pytest.mark.anyio
async def test_non_converging_migration_force_completes_when_configured(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec(mem=64))}, settings=NON_CONVERGING) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", policy={**FAST_POLICY, "on_timeout": "force-complete"}))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        actions = [p["action"] for p in await _policy_events(env, job_id)]
        assert actions == ["raise-downtime", "raise-downtime", "force-complete"]
        assert [d["action"] for d in job.result["decisions"]] == actions
        await env.assert_runs_once("web1", "n2")


@pytest.mark.anyio
async def test_raising_the_downtime_lets_it_converge(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec(mem=64))}, settings=NON_CONVERGING) as env:
        policy = {**FAST_POLICY, "downtime_step_ms": 400, "downtime_max_ms": 2000}
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", policy=policy))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        raised = [p["downtime_ms"] for p in await _policy_events(env, job_id) if p["action"] == "raise-downtime"]
        assert raised and raised[-1] >= 1100  # 64 MiB at 64 MiB/s needs ~1 s of downtime
        await env.assert_runs_once("web1", "n2")


@pytest.mark.anyio
async def test_completion_timeout_aborts(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec(mem=64))}, settings=NON_CONVERGING) as env:
        policy = {"stall_window": 100.0, "timeout_per_gib": 1.0, "min_timeout": 0.8, "status_wait": 0.2}
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", policy=policy))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.FAILED
        (decision,) = await _policy_events(env, job_id)
        assert decision["action"] == "abort" and "completion timeout of 0.8s" in decision["reason"]
        await env.assert_runs_once("web1", "n1")
