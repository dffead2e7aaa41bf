"""The pending-cleanup janitor is an engine service: a cleanup left by one
engine session is done by the next one, with no job submitted."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from engine import JobState, Migrate

from .conftest import spec

pytestmark = pytest.mark.anyio


async def test_next_session_cleans_pending_cleanup_without_a_job(make_env, tmp_path: Path) -> None:
    store = tmp_path / "herd.db"
    async with make_env(instances={"web1": ("n1", spec())}, store=store) as env:
        env.fault("n1", "finalize_migration_source", error="source wedged", times=1)
        job = await env.engine.wait(await env.engine.submit(Migrate(instance="web1", target="n2")))
        assert job.state is JobState.SUCCEEDED, job.error
        record = await env.engine.instance("web1")
        assert record.primary == "n2" and [p.node for p in record.pending_cleanup] == ["n1"]
        assert await env.where("web1") == {"n1": "paused", "n2": "running"}  # the stale source
        ids = [j.id for j in await env.engine.list()]
    # a new session: nothing submitted here; the janitor starts with the engine
    async with make_env(instances={"web1": ("n1", spec())}, store=store) as env:
        env.clear_faults()
        with anyio.fail_after(10):
            while (await env.engine.instance("web1")).pending_cleanup:
                await anyio.sleep(0.02)
        await env.assert_runs_once("web1", "n2")
        new = [j for j in await env.engine.list() if j.id not in ids]
        assert [j.kind for j in new] == ["reconcile"]
        job = await env.engine.wait(new[0].id)
        assert job.state is JobState.SUCCEEDED, job.error
