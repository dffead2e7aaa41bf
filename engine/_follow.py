"""Following jobs: watch, wait, cancel, and the store watcher (other processes' jobs and cancels).

A part of :class:`engine.Engine` (a base class of it).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio

from ._jobs import Event, Job, JobState
from ._recorder import JobHandle, Recorder, shielded
from ._store import Store
from .errors import EngineError, InvalidOperation


class JobFollowing:
    """Watching, waiting for and cancelling jobs (a base of :class:`engine.Engine`)."""

    store: Store
    clock: Callable[[], float]
    log: Any
    cancel_poll_interval: float
    _rec: Recorder
    _handles: dict[int, JobHandle]
    _owner: bool
    _draining: bool
    _pending_submits: int
    _last_job_id: int
    _cancel_seq: int
    _take: Callable[[Sequence[Job]], Awaitable[None]]

    async def watch(self, job_id: int) -> AsyncIterator[Event]:
        """Every event of the job: the past ones, then live ones; ends at a final state."""
        send, recv = anyio.create_memory_object_stream[Event](math.inf)
        subs = self._rec.subscribers.setdefault(job_id, set())
        subs.add(send)
        try:
            last = 0
            for event in await self.store.events(job_id):
                yield event
                last = event.seq
                if _is_final_event(event):
                    return
            if job_id not in self._handles:
                # Not driven here: final already, or driven by another engine (follow the store).
                while True:
                    job = await self.store.get_job(job_id, steps=False)
                    for event in await self.store.events(job_id, after=last):
                        yield event
                        last = event.seq
                        if _is_final_event(event):
                            return
                    if job.final:
                        return
                    await anyio.sleep(self.cancel_poll_interval)
            async with recv:
                async for event in recv:
                    if event.seq <= last:
                        continue
                    last = event.seq
                    yield event
                    if _is_final_event(event):
                        return
        finally:
            subs.discard(send)
            if not subs:
                self._rec.subscribers.pop(job_id, None)
            send.close()
            recv.close()

    async def watch_cluster(self) -> AsyncIterator[Event]:
        """Cluster events (nodes going offline/online, inventory), live only."""
        send, recv = anyio.create_memory_object_stream[Event](math.inf)
        subs = self._rec.subscribers.setdefault(None, set())
        subs.add(send)
        try:
            async with recv:
                async for event in recv:
                    yield event
        finally:
            subs.discard(send)
            send.close()

    async def wait(self, job_id: int) -> Job:
        """Wait until the job is final; returns it with its steps."""
        handle = self._handles.get(job_id)
        if handle is not None:
            await handle.done.wait()
        else:
            job = await self.store.get_job(job_id, steps=False)
            if not job.final:
                async for _ in self.watch(job_id):
                    pass
        return await self.store.get_job(job_id)

    async def cancel(self, job_id: int, reason: str = "cancelled by operator", *, wait: bool = True) -> JobState:
        """Cancel a job; returns the state it reached (final, when ``wait``).

        Queued and waiting jobs are cancelled at once. A running job records
        the reason, then its step in progress is cancelled (on the node too),
        its compensation runs, and it ends ``cancelled``. After the
        workflow's point of no return the job finishes forward and its result
        says the cancel came too late. Children are cancelled with the parent.
        """
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidOperation(f"a cancel needs a reason, not {reason!r}")
        job, event = await shielded(self.store.request_cancel(job_id, reason, now=self.clock()))
        if event is not None:
            self._rec.publish(event)
        handle = self._handles.get(job_id)
        if handle is None:
            return job.state
        await self._apply_cancel(handle, job.cancel_reason or reason)
        if not wait:
            return handle.state
        await handle.done.wait()
        return (await self.store.get_job(job_id, steps=False)).state

    async def _apply_cancel(self, handle: JobHandle, reason: str) -> None:
        """Obey a cancel already persisted in the store (asked here or by another process)."""
        if handle.cancel_reason is not None:
            return  # already obeyed (the first reason wins)
        handle.cancel_reason = reason
        job_id = handle.id
        log = self.log.bind(job_id=job_id, op=handle.op.kind)
        if handle.recovering:
            log.warning("cancel recorded; the job is being recovered and will settle from the nodes' state")
        elif handle.ponr is not None:
            log.warning("cancel arrived after the point of no return; the job completes", reason=reason)
            self._rec.publish(await shielded(self.store.add_event(job_id, "cancel-too-late", {"reason": reason, "point_of_no_return": handle.ponr}, now=self.clock())))
        elif handle.scope is not None:
            log.info("cancelling job", reason=reason, state=handle.state.value)
            handle.scope.cancel()
        for child in list(handle.children):
            if child in self._handles:
                await self.cancel(child, f"parent job {job_id} cancelled: {reason}", wait=False)

    async def _cancel_watcher(self) -> None:
        """Obey cancel requests other processes (``herd cancel``) write to the store.

        Polls one indexed query every ``cancel_poll_interval`` s (anyio's
        clock); a request for a job this engine drives goes through the same
        path as a local :meth:`cancel`. A queued/waiting job no engine drives
        is cancelled in the store.
        """
        while True:
            await anyio.sleep(self.cancel_poll_interval)
            try:
                if self._owner and not self._draining and not self._pending_submits:
                    # Jobs other processes (clients) wrote for this owner. Skipped while a local
                    # submit is between its store write and its handle (it would be seen twice).
                    new = await self.store.jobs_after(self._last_job_id)
                    if new and not self._pending_submits:
                        self._last_job_id = max(self._last_job_id, new[-1].id)
                        await self._take(new)
                requests = await self.store.cancel_requests(after=self._cancel_seq)
            except EngineError as err:
                self.log.warning("cannot read the store's new jobs and cancel requests", error=str(err))
                continue
            for req in requests:
                self._cancel_seq = max(self._cancel_seq, req.seq)
                handle = self._handles.get(req.job_id)
                if handle is not None:
                    if handle.cancel_reason is None:
                        self.log.info("cancel requested by another process", job_id=req.job_id, reason=req.reason)
                        # The requester's event, for this engine's watchers (written in its process).
                        for ev in await self.store.events(req.job_id):
                            if ev.kind == "cancel-requested":
                                self._rec.publish(ev)
                    await self._apply_cancel(handle, req.reason)
                elif self._owner:
                    for ev in await shielded(self.store.cancel_pending_job(req.job_id, now=self.clock())):
                        self._rec.publish(ev)


def _is_final_event(event: Event) -> bool:
    if event.kind != "state":
        return False
    try:
        return JobState(event.data.get("state")).final
    except ValueError:
        return False
