"""The no-op workflow: journaled steps that touch no node (benchmarks, tests)."""

from __future__ import annotations

from typing import Any

from .._ops import Noop
from .._workflow import Context, Outcome, Workflow


class NoopWorkflow(Workflow[Noop]):
    OP = Noop
    async def run(self, ctx: Context) -> Any:
        for i in range(self.op.steps):
            async with ctx.journal.step(f"noop-{i}") as step:
                if self.op.sleep:
                    await ctx.clock.sleep(self.op.sleep)
                step.result = {"i": i}
        return {"steps": self.op.steps}

    async def recover(self, ctx: Context) -> Outcome:
        # Nothing on any node to reconcile: the journal is the whole truth.
        if ctx.cancel_reason:
            return Outcome.cancelled(ctx.cancel_reason)
        done = sum(1 for s in ctx.journal.steps if s.state.value == "succeeded")
        return Outcome.failed(RuntimeError(f"interrupted by an engine restart after {done} of {self.op.steps} steps"))
