"""Migrate through the engine on fake nodes: the happy path, validation, pre-checks."""

from __future__ import annotations

import anyio
import pytest

from engine import InvalidOperation, JobState, Migrate

from .conftest import MIB, spec, step_names

pytestmark = pytest.mark.anyio


async def test_migration_moves_the_instance_and_the_inventory(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec(mem=128))}, settings={"bandwidth": 256 * MIB}) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2"))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        await env.assert_runs_once("web1", "n2")
        names = step_names(job)
        # the six steps, in order, each journaled
        order = ["migration_info", "accept_instance", "migrate_instance", "monitor", "finalize_migration_dst", "finalize_migration_source"]
        assert [n for n in names if n in order] == order
        assert job.result["source"] == "n1" and job.result["target"] == "n2"
        assert job.result["ram_total"] == 128 * MIB
        # progress: percent never goes backwards, ends at 100
        progress = [e.data for e in await env.events(job_id, "progress") if e.data.get("step") == "monitor"]
        assert progress, "no progress events"
        percents = [p["percent"] for p in progress]
        assert percents == sorted(percents) and percents[-1] == 100.0
        assert {"ram_transferred", "ram_remaining", "ram_total", "rate_bps", "eta_s", "dirty_rate_bps"} <= set(progress[0])
        # the primary changed in the transaction that journaled finalize_migration_dst's end
        ends = [e.data for e in await env.events(job_id, "step-end") if e.data.get("inventory")]
        assert len(ends) == 1
        assert {"type": "set-primary", "instance": "web1", "node": "n2"} in ends[0]["inventory"]
        assert "finalize_migration_dst" in str(ends[0])


async def test_submit_validation_names_what_is_wrong(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec())}) as env:
        with pytest.raises(InvalidOperation, match="target 'n9' is not a node of the cluster"):
            await env.engine.submit(Migrate(instance="web1", target="n9"))
        with pytest.raises(InvalidOperation, match="n1 is the source"):
            await env.engine.submit(Migrate(instance="web1", target="n1"))
        with pytest.raises(InvalidOperation, match="unknown instance 'nope'"):
            await env.engine.submit(Migrate(instance="nope", target="n2"))
        with pytest.raises(InvalidOperation, match="unknown knob 'bogus'"):
            await env.engine.submit(Migrate(instance="web1", target="n2", policy={"bogus": 1}))
        with pytest.raises(InvalidOperation, match="downtime_max_ms"):
            await env.engine.submit(Migrate(instance="web1", target="n2", policy={"downtime_max_ms": 0}))
        assert await env.engine.list() == []


async def test_prechecks_fail_with_what_and_where(make_env) -> None:
    async with make_env(nodes=("n1", "n2", "n3"), instances={"web1": ("n1", spec()), "db1": ("n2", spec("db1"))}) as env:
        # already present on the target
        await env.start(spec("web1"), "n3")
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n3")))
        assert job.state is JobState.FAILED
        assert "already present on target node n3" in job.error.message and job.error.node == "n3"
        await env.transport.node("n3").stop_instance(spec("web1"), force=True)
        # hypervisor versions differ
        env.configure("n2", hv_version="2.0")
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.FAILED and "not safe for migration" in job.error.message
        env.configure("n2", hv_version="1.0")
        # not running on its primary
        await env.transport.node("n1").stop_instance(spec("web1"), force=True)
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.FAILED and "not running on its primary node n1" in job.error.message
        assert await env.where("web1") == {}


async def test_balloon_to_fit_the_target(make_env) -> None:
    big = spec("web1", mem=512, minmem=128)
    async with make_env(instances={"web1": ("n1", big)}, memory={"n1": 1024, "n2": 300}) as env:
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.SUCCEEDED, job.error
        assert "balloon" in step_names(job)
        info = await env.transport.node("n2").get_instance_info("web1")
        assert info.memory == 300
        await env.assert_runs_once("web1", "n2")


async def test_no_balloon_without_runtime_changes_and_never_below_minmem(make_env) -> None:
    big = spec("web1", mem=512, minmem=256)
    async with make_env(instances={"web1": ("n1", big)}, memory={"n1": 1024, "n2": 300}) as env:
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2", allow_runtime_changes=False)))
        assert job.state is JobState.FAILED and "allow_runtime_changes" in job.error.message
        env.configure("n2", memory_total=200)
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.FAILED and "less than web1's minmem of 256 MiB" in job.error.message
        await env.assert_runs_once("web1", "n1")
        assert (await env.transport.node("n1").get_instance_info("web1")).memory == 512


async def test_progress_cadence_and_completion_notice_latency(make_env) -> None:
    from hv.fake import FakeHypervisor

    async with make_env(instances={"web1": ("n1", spec(mem=128))}, settings={"bandwidth": 64 * MIB}) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2"))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        progress = [e for e in await env.events(job_id, "progress") if e.data.get("step") == "monitor"]
        gaps = [b.ts - a.ts for a, b in zip(progress, progress[1:])]
        assert len(progress) >= 3 and max(gaps) <= 1.2, gaps  # at least every second
        # the driver knew it was complete (its journal) -> the job saw it: a long poll, not a sleep
        (end,) = [e for e in FakeHypervisor.read_events(env.dirs["n1"]) if e["event"] == "stream-end" and e.get("role") == "source"]
        seen = next(e for e in progress if e.data["status"] == "completed")
        assert 0 <= seen.ts - end["t"] < 0.1, seen.ts - end["t"]


async def test_cluster_default_policy_and_per_job_override(make_env) -> None:
    from engine import MigrationPolicy

    cluster_default = MigrationPolicy(stall_window=0.3, downtime_step_ms=100, downtime_max_ms=400, status_wait=0.2)
    async with make_env(
        instances={"web1": ("n1", spec(mem=64))}, settings={"bandwidth": 64 * MIB, "dirty_rate": 128 * MIB}, migration_policy=cluster_default
    ) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", policy={"on_timeout": "force-complete"}))
        job = await env.engine.wait(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        plan = next(s for s in job.steps if s.name == "plan")
        assert plan.result["policy"]["downtime_max_ms"] == 400 and plan.result["policy"]["on_timeout"] == "force-complete"
        assert [d["action"] for d in job.result["decisions"]] == ["raise-downtime"] + ["force-complete"]


async def test_more_prechecks_name_what_and_where(make_env) -> None:
    from transport.errors import NodeUnreachable

    async with make_env(instances={"web1": ("n1", spec())}) as env:
        env.fault("n2", "validate_parameters", error="no such bridge", times=1)
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.FAILED and "hvparams are not valid on target node n2" in job.error.message
        # versions differ, overridden: the pre-check lets it through (a warning), the driver still refuses
        env.configure("n2", hv_version="2.0")
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", ignore_hv_versions=True))
        job = await env.engine.wait(job_id)
        assert [e.data["message"] for e in await env.events(job_id, "warning")][0].endswith("overridden by ignore_hv_versions")
        assert job.state is JobState.FAILED and "at step accept_instance" in job.error.message and "runs on n1" in job.error.message
        env.configure("n2", hv_version="1.0")
        # the target cannot be reached
        for method in ("get_instance_info", "get_node_info", "ping"):
            env.transport.faults.inject("n2", method, error=NodeUnreachable("n2 is powered off", node="n2"))
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.FAILED and "node n2 cannot be reached" in job.error.message
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.FAILED and "target node n2 is offline" in job.error.message
        env.transport.faults.clear("n2")
        await env.assert_runs_once("web1", "n1")


async def test_non_live_migration_pauses_then_resumes_on_the_target(make_env) -> None:
    async with make_env(instances={"web1": ("n1", spec(mem=64))}, settings={"bandwidth": 128 * MIB, "dirty_rate": 512 * MIB}) as env:
        job_id = await env.engine.submit(Migrate(instance="web1", target="n2", live=False))
        statuses = set()
        async for event in env.engine.watch(job_id):
            if event.kind == "progress" and event.data.get("status") == "active":
                statuses.add((await env.transport.node("n1").get_instance_info("web1")).state)
        job = await env.engine.get(job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        assert statuses <= {"paused"}  # the guest did not run (nor dirty) during the copy
        assert job.result["live"] is False and job.result["iterations"] <= 2
        await env.assert_runs_once("web1", "n2")
