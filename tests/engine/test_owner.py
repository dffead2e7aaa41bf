"""One engine runs a store's jobs at a time (its owner), across real processes:
``herd submit`` / ``herd serve`` subprocesses, the owner lock and its identity."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine import EngineBusy, JobNotFound, JobState, Noop
from engine._store import SqliteStore

from .conftest import FakeCluster

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


def herd(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


async def poll(what: str, check: Callable[[], Awaitable[Any]], *, timeout: float = 40.0) -> Any:
    """``await check()`` until it returns a true value (a condition with a deadline)."""
    with anyio.fail_after(timeout):
        while True:
            value = await check()
            if value:
                return value
            await anyio.sleep(0.05)
    raise AssertionError(what)  # pragma: no cover


async def read_job(store: Path, job_id: int) -> Any:
    s = SqliteStore(store)
    await s.open()
    try:
        return await s.get_job(job_id, steps=False), await s.events(job_id)
    finally:
        await s.aclose()


def process_gone(pid: int) -> bool:
    """The process exited (a zombie not yet reaped by init counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] == "Z"


def owner_identity(store: Path) -> dict[str, Any]:
    return json.loads(Path(f"{store}.engine-lock").read_text())


async def wait_runner_gone(store: Path) -> None:
    """The background runner (identity in the owner lock file) exits once idle."""
    pid = owner_identity(store)["pid"]
    assert pid != os.getpid()

    async def gone() -> bool:
        return process_gone(pid)

    await poll(f"runner pid {pid} exits when idle", gone, timeout=45.0)


async def test_two_submitters_never_run_jobs_beside_each_other(local_cluster: FakeCluster, tmp_path: Path) -> None:
    """Item 1: the second ``herd submit --wait`` hands its job to the first process's engine,
    which holds web1 exclusively across processes: the running intervals do not overlap."""
    store, cluster = tmp_path / "herd.db", local_cluster.write_file(tmp_path / "cluster.toml")
    common = ["--store", str(store), "--cluster", str(cluster), "--json"]
    with open(tmp_path / "a.err", "wb") as a_err, open(tmp_path / "b.err", "wb") as b_err:
        async with await anyio.open_process(
            herd("submit", "noop", "hold_instance=web1", "steps=3", "sleep=1", *common), cwd=REPO, stderr=a_err
        ) as a:
            try:
                async def first_running() -> bool:
                    try:
                        return (await read_job(store, 1))[0].state is JobState.RUNNING
                    except JobNotFound:
                        return False

                await poll("job 1 running", first_running)
                b = await anyio.run_process(herd("submit", "noop", "hold_instance=web1", *common), cwd=REPO, stderr=b_err, check=False)
                assert b.returncode == 0, (tmp_path / "b.err").read_text()
                assert await a.wait() == 0, (tmp_path / "a.err").read_text()
            finally:
                if a.returncode is None:
                    a.kill()
                    await a.wait()
    intervals = []
    for job_id in (1, 2):
        job, events = await read_job(store, job_id)
        assert job.state is JobState.SUCCEEDED, job.error
        states = [(e.seq, e.data["state"]) for e in events if e.kind == "state"]
        started = [seq for seq, st in states if st == "running"]
        ended = [seq for seq, st in states if st == "succeeded"]
        assert len(started) == 1 and len(ended) == 1, states
        intervals.append((started[0], ended[0]))
    (s1, e1), (s2, e2) = intervals
    assert e1 < s2, f"job 2 ran (events {s2}..{e2}) while job 1 held web1 (events {s1}..{e1})"
    submitted = (await read_job(store, 2))[1][0].seq
    if submitted < e1:  # submitted while the first process ran (not only on a very slow machine): handed to it
        assert f"engine pid {a.pid} runs this store; following job 2 there" in (tmp_path / "b.err").read_text()


@pytest.mark.timeout(120)  # the background runner exits 10 s after its last job
@pytest.mark.parametrize("then", ["nothing", "submit-wait"])
async def test_no_wait_job_is_run_by_the_store_engine(local_cluster: FakeCluster, tmp_path: Path, then: str) -> None:
    """Item 2: a ``--no-wait`` job runs with no later command (a background ``herd serve``
    runs it and exits when idle); a later short-lived ``herd submit --wait`` neither
    adopts and abandons it nor fails it as interrupted."""
    store, cluster = tmp_path / "herd.db", local_cluster.write_file(tmp_path / "cluster.toml")
    common = ["--store", str(store), "--cluster", str(cluster), "--json"]
    res = await anyio.run_process(herd("submit", "noop", "steps=3", "sleep=0.5", "--no-wait", *common), cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout) == {"job_id": 1}
    ident = owner_identity(store)
    assert ident["role"] == "herd serve" and ident["pid"] != os.getpid()
    if then == "submit-wait":
        res = await anyio.run_process(herd("submit", "noop", *common), cwd=REPO, check=False)
        assert res.returncode == 0, res.stderr.decode()
        assert (await read_job(store, 2))[0].state is JobState.SUCCEEDED

    async def first_final() -> Any:
        job = (await read_job(store, 1))[0]
        return job if job.final else None

    job = await poll("job 1 final", first_final)
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result == {"steps": 3}  # run straight through, not recovered after an abandoned start
    await wait_runner_gone(store)
    assert stat.S_IMODE((tmp_path / "serve.log").stat().st_mode) == 0o600


async def test_engine_opened_during_a_client_lock_takes_over(local_cluster: FakeCluster, tmp_path: Path) -> None:
    """Item 9: an engine that opens while ``herd cancel`` holds its locks is not fooled for
    good: once released it owns the store, runs queued jobs and recovers interrupted ones."""
    store = tmp_path / "herd.db"
    async with local_cluster.engine(store, role="client") as client:
        assert not client.is_owner
        queued = await client.submit(Noop(steps=1))
        interrupted = await client.submit(Noop(steps=2))
    s = SqliteStore(store)
    await s.open()
    try:
        await s.transition(interrupted, [JobState.WAITING, JobState.RUNNING], now=1.0)  # as if its engine died
        async with contextlib.AsyncExitStack() as engine_stack:
            async with s.no_engine_running() as idle:  # what `herd cancel` holds while it decides
                assert idle
                engine = await engine_stack.enter_async_context(local_cluster.engine(store))
                assert not engine.is_owner
            with anyio.fail_after(20):
                done = await engine.wait(queued)
                recovered = await engine.wait(interrupted)
            assert engine.is_owner
            assert done.state is JobState.SUCCEEDED and done.result == {"steps": 1}
            assert recovered.state is JobState.FAILED and "interrupted by an engine restart" in str(recovered.error)
            assert recovered.result == {"recovered": True}
    finally:
        await s.aclose()


async def test_owner_role_refuses_while_another_engine_owns(local_cluster: FakeCluster, tmp_path: Path) -> None:
    store = tmp_path / "herd.db"
    async with local_cluster.engine(store, role="owner", label="herd serve") as owner:
        assert owner.is_owner
        with pytest.raises(EngineBusy) as err:
            async with local_cluster.engine(store, role="owner"):
                pass  # pragma: no cover
    message = str(err.value)
    assert f"another engine runs jobs from {store}: pid {os.getpid()} since " in message
    assert "UTC (herd serve); stop it or submit to it" in message


UMASK_SCRIPT = textwrap.dedent(
    """
    import os, sys, anyio
    from engine._store import SqliteStore
    os.umask(0)

    async def main(path):
        s = SqliteStore(path)
        await s.open()
        assert await s.try_own({"pid": os.getpid()})
        async with s.no_engine_running():
            pass
        await s.aclose()

    anyio.run(main, sys.argv[1])
    """
)


@pytest.mark.parametrize("existing", [None, 0o755])
async def test_store_files_private_whatever_the_umask(tmp_path: Path, existing: int | None) -> None:
    """Item 8: under umask 000 new directories are 0700 and files 0600; an existing
    too-open store directory is left alone but named in a warning with its mode."""
    base = tmp_path / "base"
    base.mkdir()
    store_dir = base / "a" / "b"
    if existing is not None:
        store_dir.mkdir(parents=True)
        os.chmod(base / "a", 0o700)
        os.chmod(store_dir, existing)
    store = store_dir / "herd.db"
    res = await anyio.run_process([sys.executable, "-c", UMASK_SCRIPT, str(store)], cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr.decode()

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    for p in (store, Path(f"{store}.engine-lock"), Path(f"{store}.client-lock")):
        assert mode(p) == 0o600, p
    if existing is None:
        assert (mode(base / "a"), mode(store_dir)) == (0o700, 0o700)
        assert b"store directory" not in res.stderr
    else:
        assert mode(store_dir) == existing
        assert f"store directory {store_dir} has mode 0755".encode() in res.stderr
        assert res.stdout == b""


async def test_drain_finishes_running_jobs_and_leaves_unstarted_ones(local_cluster: FakeCluster, tmp_path: Path) -> None:
    """``drain()``: jobs running finish; a job not started stays unstarted for the next owner, who runs it."""
    store = tmp_path / "herd.db"
    told: list[list[int]] = []
    async with local_cluster.engine(store) as engine:
        running = await engine.submit(Noop(steps=3, sleep=0.1))
        later = await engine.submit(Noop(steps=1), depends_on=[running])

        async def is_running() -> bool:
            return (await engine.get(running)).state is JobState.RUNNING

        await poll("job running", is_running)
        with anyio.fail_after(20):
            assert await engine.drain(on_wait=told.append) == [running]
        assert told == [[running]]
        assert (await engine.get(running)).state is JobState.SUCCEEDED
    job, events = await read_job(store, later)
    assert job.state in (JobState.QUEUED, JobState.WAITING) and job.started_at is None
    async with local_cluster.engine(store) as engine:
        with anyio.fail_after(20):
            assert (await engine.wait(later)).state is JobState.SUCCEEDED
