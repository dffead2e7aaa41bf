"""The engine seam: the public face, no import circles, explicit tables, typed node calls."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import anyio
import pytest

import engine
import hv
from engine import BUILTIN_WORKFLOWS, Context, Engine, InvalidOperation, Noop, Operation, Workflow

from .conftest import FakeCluster, open_engine

pytestmark = pytest.mark.anyio

ENGINE_DIR = Path(engine.__file__).parent

#: The documented public names (README "Python API", docs/engine.md "Public names").
DOCUMENTED = [
    "Engine", "Cluster", "load_cluster", "NodeStatus",
    "Operation", "Noop", "StartInstance", "StopInstance", "RebootInstance", "RebootType",
    "Migrate", "Failover", "EvacuateNode", "Reconcile", "VerifyCluster", "MigrationPolicy", "TimeoutAction",
    "Job", "JobState", "Event", "Step", "StepState", "ErrorInfo",
    "InstanceRecord", "AdminState",
    "EngineError", "InvalidOperation", "InstanceNotKnown", "JobNotFound", "StoreError", "StepFailed", "StepTimeout",
    "StepUnreachable", "NodeOffline", "JobCancelled", "CompensationFailed", "DependencyFailed", "RecoveryPending", "EngineBusy",
    "Workflow", "Outcome", "Context", "BUILTIN_WORKFLOWS", "BUILTIN_SERVICES",
]


def test_public_names_are_the_documented_ones() -> None:
    assert engine.__all__ == DOCUMENTED
    exported = {n for n, v in vars(engine).items() if not n.startswith("_") and type(v).__name__ != "module"}
    assert exported - {"annotations"} == set(DOCUMENTED)


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``engine`` that ``path`` imports (any level, TYPE_CHECKING included)."""
    modules = {".".join(p.relative_to(ENGINE_DIR.parent).with_suffix("").parts).removesuffix(".__init__") for p in ENGINE_DIR.rglob("*.py")}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        out.update(n for n in names if n in modules)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in ENGINE_DIR.rglob("*.py"):
        name = ".".join(path.relative_to(ENGINE_DIR.parent).with_suffix("").parts).removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = _imports(path, package) - {name}
    return graph


def test_no_import_circle_and_only_the_cli_and_package_import_the_engine() -> None:
    graph = _graph()
    # Every module reachable from each other one: a circle is a module that reaches itself.
    for start in graph:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            mod = todo.pop()
            if mod not in seen:
                seen.add(mod)
                todo.extend(graph.get(mod, ()))
        assert start not in seen, f"{start} imports itself through {sorted(seen)}"
    assert sorted(m for m, deps in graph.items() if "engine._engine" in deps) == ["engine", "engine.cli"]


class _Unlisted(Operation, frozen=True, kw_only=True, tag="test-unlisted"):
    pass


class _UnlistedWorkflow(Workflow[_Unlisted]):
    OP = _Unlisted

    async def run(self, ctx: Context) -> Any:
        return {"ran": True}


async def test_workflows_come_from_the_table_the_engine_is_given(store_path: Path, empty_transport: Any) -> None:
    async with open_engine(store_path, empty_transport) as plain:
        with pytest.raises(InvalidOperation, match="no workflow for operation kind 'test-unlisted'"):
            await plain.submit(_Unlisted())
        assert await plain.list() == []
    async with open_engine(store_path, empty_transport, workflows={**BUILTIN_WORKFLOWS, "test-unlisted": _UnlistedWorkflow}) as extended:
        job = await extended.wait(await extended.submit(_Unlisted()))
        assert job.result == {"ran": True} and isinstance(job.op, _Unlisted)
    assert "test-unlisted" not in BUILTIN_WORKFLOWS


class _Probe(Operation, frozen=True, kw_only=True, tag="test-probe"):
    method: str


class _ProbeWorkflow(Workflow[_Probe]):
    OP = _Probe

    async def run(self, ctx: Context) -> Any:
        node = ctx.nodes.call("n1", idempotent=True, step="probe")
        info = await getattr(node, self.op.method)()
        return {"free": info.memory_free, "steps": [s.name for s in ctx.journal.steps]}


@pytest.mark.parametrize("method", ["get_node_info", "__class__x", "close", "fill_hvparams", "start"])
async def test_node_calls_reach_only_the_node_methods(local_cluster: FakeCluster, store_path: Path, method: str) -> None:
    async with local_cluster.engine(store_path, workflows={**BUILTIN_WORKFLOWS, "test-probe": _ProbeWorkflow}) as eng:
        job = await eng.wait(await eng.submit(_Probe(method=method)))
    if method in hv.REMOTE_METHODS:
        assert job.result["steps"] == ["probe"], job.error
    else:
        assert job.error is not None and f"{method!r} is not a node method" in job.error.message
        assert job.steps == []  # refused before anything was journaled or sent


async def test_the_engine_is_not_in_the_context(store_path: Path, empty_transport: Any) -> None:
    seen: list[Context] = []

    class Look(Workflow[Noop]):
        OP = Noop

        async def run(self, ctx: Context) -> Any:
            seen.append(ctx)
            return None

    async with open_engine(store_path, empty_transport, workflows={**BUILTIN_WORKFLOWS, "noop": Look}) as eng:
        await eng.wait(await eng.submit(Noop()))
    (ctx,) = seen
    assert not any(isinstance(v, Engine) for v in vars(ctx).values())
    assert not hasattr(ctx, "engine")


class _FixedClock:
    """A clock whose wall time stands still (timestamps), with anyio's monotonic clock for deadlines."""

    def now(self) -> float:
        return 1000.0

    def monotonic(self) -> float:
        return anyio.current_time()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


async def test_the_clock_is_injected_into_the_engine_and_the_context(store_path: Path, empty_transport: Any) -> None:
    clock = _FixedClock()
    seen: list[Any] = []

    class Look(Workflow[Noop]):
        OP = Noop

        async def run(self, ctx: Context) -> Any:
            seen.append(ctx.clock)
            async with ctx.journal.step("tick"):
                pass
            return None

    async with open_engine(store_path, empty_transport, clock=clock, workflows={**BUILTIN_WORKFLOWS, "noop": Look}) as eng:
        job = await eng.wait(await eng.submit(Noop()))
    assert seen == [clock]
    assert job.created_at == job.finished_at == 1000.0 and job.steps[0].started_at == 1000.0


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"migration_policy": {"status_wait": 1.0}}, "migration_policy must be a MigrationPolicy, not dict"),
        ({"workflows": {"noop": object}}, "workflows\\['noop'\\]: .* is not a Workflow class"),
        ({"workflows": {"not-noop": BUILTIN_WORKFLOWS["noop"]}}, "workflows\\['not-noop'\\]: NoopWorkflow.OP is Noop, of kind 'noop'"),
    ],
)
async def test_bad_engine_options_are_refused_in_one_line(store_path: Path, empty_transport: Any, options: dict[str, Any], problem: str) -> None:
    with pytest.raises((ValueError, TypeError), match=problem):
        async with open_engine(store_path, empty_transport, **options):
            pass
