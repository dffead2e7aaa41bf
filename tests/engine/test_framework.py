"""The workflow framework with workflows defined here: point of no return,
inventory changes in the step's transaction, children, compensation failure,
per-node migration limit, progress, log fields."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from engine import (
    BUILTIN_WORKFLOWS,
    AdminState,
    Context,
    Engine,
    InstanceRecord,
    JobState,
    Noop,
    Operation,
    Outcome,
    StartInstance,
    Workflow,
)
from engine._inventory import SetPrimary
from engine._locks import LockRequest, instance_lock

from .conftest import FakeCluster, open_engine, record

pytestmark = pytest.mark.anyio


class Gate:
    """Lets a test hold a workflow at a point and release it (in-process only)."""

    events: dict[str, anyio.Event] = {}

    @classmethod
    def reset(cls) -> None:
        cls.events = {}

    @classmethod
    def get(cls, name: str) -> anyio.Event:
        return cls.events.setdefault(name, anyio.Event())


class PonrOp(Operation, frozen=True, kw_only=True, tag="test-ponr"):
    move: str | None = None  # instance to "move" to n2 in the step that does it
    fail_after_ponr: bool = False


class PonrWorkflow(Workflow[PonrOp]):
    OP = PonrOp
    async def run(self, ctx: Context) -> Any:
        ctx.journal.progress(phase="before")
        Gate.get("before-ponr").set()
        await Gate.get("go-ponr").wait()
        await ctx.journal.point_of_no_return("switched over")
        Gate.get("after-ponr").set()
        await Gate.get("go-finish").wait()
        if self.op.move:
            await ctx.nodes.call("n2", idempotent=True, step="switch", inventory=[SetPrimary(instance=self.op.move, node="n2")]).get_node_info()
        if self.op.fail_after_ponr:
            raise RuntimeError("broke after the point of no return")
        return {"done": True}

    async def compensate(self, ctx: Context, reason: str) -> None:
        Gate.get("compensated").set()


class BadCompOp(Operation, frozen=True, kw_only=True, tag="test-bad-compensation"):
    pass


class BadCompWorkflow(Workflow[BadCompOp]):
    OP = BadCompOp
    COMPENSATION_TIMEOUT = 0.2

    async def run(self, ctx: Context) -> Any:
        await anyio.sleep_forever()

    async def compensate(self, ctx: Context, reason: str) -> None:
        await anyio.sleep(30)  # runs shielded from the cancel, but not from its own timeout


class ParentOp(Operation, frozen=True, kw_only=True, tag="test-parent"):
    children: int = 2


class ParentWorkflow(Workflow[ParentOp]):
    OP = ParentOp
    async def run(self, ctx: Context) -> Any:
        ids = [await ctx.jobs.submit_child(Noop(sleep=30)) for _ in range(self.op.children)]
        jobs = [await ctx.jobs.wait(j) for j in ids]
        return {"children": ids, "states": [j.state.value for j in jobs]}


class MigrateLike(Operation, frozen=True, kw_only=True, tag="test-migrate-like"):
    instance: str
    target: str
    MIGRATES = True

    def lock_requests(self, inventory: Mapping[str, InstanceRecord]) -> list[LockRequest]:
        return [instance_lock(self.instance)]

    def migration_nodes(self, inventory: Mapping[str, InstanceRecord]) -> tuple[str, ...]:
        return (inventory[self.instance].primary, self.target)

    def validate(self, inventory: Mapping[str, InstanceRecord], nodes: Collection[str]) -> None:
        super().validate(inventory, nodes)


class MigrateLikeWorkflow(Workflow[MigrateLike]):
    OP = MigrateLike
    async def run(self, ctx: Context) -> Any:
        await anyio.sleep_forever()


class PollOp(Operation, frozen=True, kw_only=True, tag="test-poll"):
    polls: int = 3


class PollWorkflow(Workflow[PollOp]):
    OP = PollOp
    async def run(self, ctx: Context) -> Any:
        async with ctx.journal.step("wait", node="n1") as step:
            seen = [await ctx.nodes.read("n1").get_node_info() for _ in range(self.op.polls)]
            step.result = {"polls": len(seen)}
        return {"free": seen[-1].memory_free}


#: The built-in workflows plus this module's (an engine is given its table; nothing registers itself).
WORKFLOWS = {
    **BUILTIN_WORKFLOWS,
    **{str(cls.OP.__struct_config__.tag): cls for cls in (PonrWorkflow, BadCompWorkflow, ParentWorkflow, MigrateLikeWorkflow, PollWorkflow)},
}


@pytest.fixture(autouse=True)
def _gates() -> None:
    Gate.reset()


async def _running(engine: Engine, job_id: int) -> None:
    async for ev in engine.watch(job_id):
        if ev.kind == "state" and ev.data["state"] == "running":
            return


async def test_cancel_before_and_after_point_of_no_return(local_cluster: FakeCluster, store_path: Path) -> None:
    async with local_cluster.engine(store_path, workflows=WORKFLOWS) as engine:
        early = await engine.submit(PonrOp())
        await Gate.get("before-ponr").wait()
        assert await engine.cancel(early, reason="in time") is JobState.CANCELLED
        assert Gate.get("compensated").is_set()
        assert (await engine.get(early)).point_of_no_return is None

        Gate.reset()
        late = await engine.submit(PonrOp(move="web1"))
        Gate.get("go-ponr").set()
        await Gate.get("after-ponr").wait()
        async with anyio.create_task_group() as tg:
            result: list[JobState] = []

            async def cancel() -> None:
                result.append(await engine.cancel(late, reason="too late"))

            tg.start_soon(cancel)
            async for ev in engine.watch(late):
                if ev.kind == "cancel-too-late":
                    break
            Gate.get("go-finish").set()
        assert result == [JobState.SUCCEEDED]
        job = await engine.get(late)
        assert job.point_of_no_return == "switched over"
        assert job.result["done"] is True
        assert job.result["cancel"]["too_late"] is True and job.result["cancel"]["reason"] == "too late"
        assert not Gate.get("compensated").is_set()
        # the inventory change was committed with the step that made it true
        assert (await engine.instance("web1")).primary == "n2"
        switch = next(s for s in job.steps if s.name == "switch")
        end = next(e for e in await engine.store.events(late) if e.kind == "step-end" and e.data["step"] == "switch")
        assert switch.state.value == "succeeded" and end.data["inventory"] == [{"type": "set-primary", "instance": "web1", "node": "n2"}]


async def test_failure_after_point_of_no_return_skips_compensation(empty_transport: Any, store_path: Path) -> None:
    async with open_engine(store_path, empty_transport, workflows=WORKFLOWS) as engine:
        job_id = await engine.submit(PonrOp(fail_after_ponr=True))
        Gate.get("go-ponr").set()
        Gate.get("go-finish").set()
        job = await engine.wait(job_id)
        assert job.state is JobState.FAILED and job.error is not None and "after the point of no return" in job.error.message
        assert not Gate.get("compensated").is_set()
        # progress reported from the workflow is an event
        assert any(e.kind == "progress" and e.data == {"phase": "before"} for e in await engine.store.events(job_id))


async def test_compensation_timeout_fails_the_job(empty_transport: Any, store_path: Path) -> None:
    async with open_engine(store_path, empty_transport, workflows=WORKFLOWS) as engine:
        job_id = await engine.submit(BadCompOp())
        await _running(engine, job_id)
        with anyio.fail_after(10):
            state = await engine.cancel(job_id, reason="stop it")
        assert state is JobState.FAILED
        job = await engine.get(job_id)
        assert job.error is not None and job.error.type == "CompensationFailed" and "stop it" in job.error.message


async def test_cancelling_parent_cancels_children(empty_transport: Any, store_path: Path) -> None:
    async with open_engine(store_path, empty_transport, workflows=WORKFLOWS) as engine:
        parent = await engine.submit(ParentOp(children=2))
        await _running(engine, parent)
        children: list[int] = []
        with anyio.fail_after(10):
            while len(children) < 2:
                children = [j.id for j in await engine.list() if j.id != parent]
                await anyio.sleep(0.01)
        for child in children:
            await _running(engine, child)
        assert await engine.cancel(parent, reason="abort all") is JobState.CANCELLED
        for child in children:
            job = await engine.wait(child)
            assert job.state is JobState.CANCELLED and "abort all" in (job.cancel_reason or "")
            assert job.parent_id == parent


async def test_migrations_per_node_limit(empty_transport: Any, store_path: Path) -> None:
    instances = {n: record(n, "n1") for n in ("a", "b", "c")}
    async with open_engine(store_path, empty_transport, workflows=WORKFLOWS, instances=instances, max_migrations_per_node=1) as engine:
        first = await engine.submit(MigrateLike(instance="a", target="n2"))
        await _running(engine, first)
        second = await engine.submit(MigrateLike(instance="b", target="n3"))  # shares source n1
        unrelated = await engine.submit(Noop(hold_instance="c"))
        assert (await engine.wait(unrelated)).state is JobState.SUCCEEDED
        assert (await engine.get(second)).state is JobState.WAITING
        await engine.cancel(first, reason="free n1")
        await _running(engine, second)
        await engine.cancel(second, reason="done")


async def test_log_lines_carry_job_op_step_node(local_cluster: FakeCluster, store_path: Path) -> None:
    async with local_cluster.engine(store_path, workflows=WORKFLOWS) as engine:
        with structlog.testing.capture_logs() as logs:
            job = await engine.wait(await engine.submit(StartInstance(instance="web1")))
        assert job.state is JobState.SUCCEEDED
        steps = [line for line in logs if line["event"] == "step started"]
        assert steps and all(line["job_id"] == job.id and line["op"] == "start-instance" and line["node"] == "n1" and line["step"] for line in steps)
        assert any(line["event"] == "job finished" and line["job_id"] == job.id for line in logs)
        assert (await engine.instance("web1")).admin_state is AdminState.UP


async def test_reads_in_a_polling_step_are_one_journal_entry(local_cluster: FakeCluster, store_path: Path) -> None:
    async with local_cluster.engine(store_path, workflows=WORKFLOWS) as engine:
        job = await engine.wait(await engine.submit(PollOp(polls=3)))
        assert job.state is JobState.SUCCEEDED, job.error
        assert [(s.name, s.result) for s in job.steps] == [("wait", {"polls": 3})]
        assert job.result["free"] > 0
        ends = [e for e in local_cluster.events("n1") if e["event"] == "end" and e["method"] == "get_node_info"]
        assert len(ends) == 3
