"""Bad input is refused in one line, from outside, and nothing stored changes.

Every case runs the real ``herd`` command line in a subprocess and checks
what an operator sees: the exit code, ONE stderr line starting ``herd:`` that
names what is wrong and where, no traceback, and the store (its file's bytes,
its jobs) exactly as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import hv
from engine import InvalidOperation
from engine._optable import op_from_dict
from engine._ops import Noop
from engine._store import SqliteStore
from engine.cli import run

from .conftest import FakeCluster

REPO = Path(__file__).resolve().parents[2]
HUGE = "a" * 10240


def herd(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HERD_DEBUG"}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=50, cwd=REPO, env=env
    )


def refused(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one error line of a refused command (asserting its shape)."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("herd: "), line
    assert res.returncode == 1, (res.returncode, line)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def snapshot(store: Path) -> tuple[str, int, int]:
    """The store file's hash and its job and event counts (read without writing)."""
    digest = hashlib.sha256(store.read_bytes()).hexdigest()
    conn = sqlite3.connect(f"{store.absolute().as_uri()}?immutable=1", uri=True)  # creates no -wal/-shm
    try:
        jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        conn.close()
    return digest, jobs, events


class Env:
    def __init__(self, tmp_path: Path, cluster: Path, store: Path) -> None:
        self.tmp_path = tmp_path
        self.cluster = cluster
        self.store = store

    def submit(self, kind: str, *fields: str, cluster: Path | None = None) -> subprocess.CompletedProcess[str]:
        return herd("submit", kind, *fields, "--no-wait", "--store", str(self.store), "--cluster", str(cluster or self.cluster))


@pytest.fixture
def env(local_cluster: FakeCluster, tmp_path: Path) -> Env:
    cluster = local_cluster.write_file(tmp_path / "cluster.toml")
    store = tmp_path / "herd.db"
    res = herd("submit", "noop", "--no-wait", "--store", str(store), "--cluster", str(cluster))
    assert res.returncode == 0, res.stderr
    return Env(tmp_path, cluster, store)


# --- item 4: the operation named is the operation; each field once ------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["stop-instance", "instance=web1", "kind=start-instance"], "'kind' is reserved"),
        (["stop-instance", "instance=web1", "kind=stop-instance"], "'kind' is reserved"),
        (["stop-instance", "instance=web1", "instance=web2"], "'instance' is given twice"),
        (["reboot-instance", "instance=web1", "reboot-type=soft", "reboot_type=hard"], "'reboot_type' is given twice"),
        (["stop-instance", "instance=web1", "timeout"], "key=value"),
        (["stop-instance", "instanse=web1"], "unknown field `instanse`"),
    ],
)
def test_fields_that_change_meaning_are_refused(env: Env, args: list[str], needle: str) -> None:
    before = snapshot(env.store)
    refused(env.submit(*args), args[0], needle)
    assert snapshot(env.store) == before


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"kind": 5}, "'kind' must be a string"),
        ({"kind": "noop", 1: 2}, "field names must be strings"),
        ({"instance": "web1"}, "needs a 'kind'"),
        ({"kind": "noop", HUGE: 1}, "(10240 characters)"),
    ],
)
def test_op_from_dict_refuses_what_the_cli_refuses(data: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidOperation) as info:
        op_from_dict(data)
    assert needle in str(info.value) and len(str(info.value)) < 300


# --- item 5: cluster-file errors are one line naming file and key -------------

CLUSTER = '[cluster]\nname = "x"\n'
NODE = CLUSTER + '[nodes.n1]\naddress = "127.0.0.1"\ntransport = "local"\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("", "cluster"),
        (CLUSTER, "nodes"),
        (NODE + "[bogus]\na = 1\n", "bogus"),
        (NODE + "colour = 1\n", "colour"),
        (CLUSTER + '[nodes.n1]\naddress = "127.0.0.1"\nport = "x"\n', "port"),
        (CLUSTER + '[nodes.n1]\naddress = "127.0.0.1"\nport = 0\n', "port"),
        (CLUSTER + '[nodes.n1]\naddress = "127.0.0.1"\nport = 70000\n', "port"),
        (CLUSTER + '[nodes.n1]\naddress = "not an address!"\ntransport = "ssh"\nuser = "root"\n', "address"),
        (CLUSTER + '[nodes.n1]\naddress = "127.0.0.1"\ntransport = "carrier-pigeon"\n', "transport"),
        (NODE + 'hypervisor = "vmware"\n', "hypervisor"),
        (CLUSTER + '[nodes."n 1;x"]\naddress = "127.0.0.1"\ntransport = "local"\n', "n 1;x"),
        (
            CLUSTER
            + 'transport = "ssh"\nuser = "root"\nidentity_file = "id_test"\nknown_hosts = "/nonexistent/known_hosts"\n'
            + '[nodes.n1]\naddress = "127.0.0.1"\n',
            "known_hosts",
        ),
        (NODE + 'agent_command = "python3 -m transport.agent; rm -rf /"\n', "agent_command"),
        (NODE + "agent_command = []\n", "agent_command"),
        ("[cluster\n", "cluster.toml"),
        (NODE + '[instances.web1]\nprimary = "nX"\n', "primary node 'nX'"),
        (NODE + '[instances.web1]\nhypervisor = "fake"\n', "'primary' is missing"),
        (NODE + "[instances.web1]\nprimary = \"n1\"\nbeparams = { minmem = 1, maxmem = 99999999999, vcpus = 1 }\n", "maxmem"),
    ],
)
def test_cluster_file_errors_are_one_line(env: Env, text: str, key: str) -> None:
    path = env.tmp_path / "bad-cluster.toml"
    path.write_text(text)
    (env.tmp_path / "id_test").write_text("not a key\n")
    (env.tmp_path / "id_test").chmod(0o600)
    before = snapshot(env.store)
    refused(env.submit("noop", cluster=path), path.name, key)
    assert snapshot(env.store) == before


# --- item 6: one name rule, one duration range --------------------------------

HOSTILE_NAMES = ["../../evil", "a;touch x", "a\nb", "n" * 300, "", "-rf", "web 1"]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_instance_names_in_the_cluster_file_are_refused(env: Env, name: str) -> None:
    path = env.tmp_path / "hostile.toml"
    path.write_text(NODE + f"[instances.{json.dumps(name)}]\nprimary = \"n1\"\n")
    before = snapshot(env.store)
    refused(env.submit("noop", cluster=path), path.name, "[instances.", "not a valid name")
    assert snapshot(env.store) == before


@pytest.mark.parametrize(
    ("args", "field"),
    [
        *[(["stop-instance", f"instance={name}"], "instance") for name in HOSTILE_NAMES],
        (["migrate", "instance=web1", "target=../n2"], "target"),
        (["failover", "instance=web1", "target=n2;x", "primary_down=true"], "target"),
        (["evacuate-node", "node=n1\n"], "node"),
        (["evacuate-node", "node=n1", 'targets=["../x"]'], "targets entry"),
        (["reconcile", "instance=web1", 'nodes=["a b"]'], "nodes entry"),
        (["noop", "hold_instance=../web1"], "hold_instance"),
        (["stop-instance", "instance=5"], "instance"),
    ],
    ids=repr,
)
def test_hostile_names_in_operations_are_refused(env: Env, args: list[str], field: str) -> None:
    before = snapshot(env.store)
    refused(env.submit(*args), args[0], field)
    assert snapshot(env.store) == before


@pytest.mark.anyio
async def test_add_instance_refuses_hostile_names(local_cluster: FakeCluster, store_path: Path) -> None:
    async with local_cluster.engine(store_path) as engine:
        before = await engine.store.instances()
        for name in HOSTILE_NAMES:
            with pytest.raises((InvalidOperation, hv.HypervisorError), match="name"):
                await engine.add_instance(hv.Instance(name=name), "n1")
        assert await engine.store.instances() == before


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["stop-instance", "instance=web1", "timeout=1e308"], ["timeout", "1e+308", "604800"]),
        (["stop-instance", "instance=web1", "timeout=-1"], ["timeout", "-1", "604800"]),
        (["stop-instance", "instance=web1", "timeout=NaN"], ["timeout", "nan"]),
        (["stop-instance", "instance=web1", "timeout=Infinity"], ["timeout", "inf"]),
        (["stop-instance", "instance=web1", "timeout=604801"], ["timeout", "604801"]),
        (["reboot-instance", "instance=web1", "timeout=1e308"], ["timeout", "604800"]),
        (["noop", "sleep=1e9"], ["sleep", "604800"]),
        (["noop", 'deadlines={"x": 1e308}'], ["deadline for 'x'", "604800"]),
        (["noop", 'deadlines={"x": 0}'], ["deadline for 'x'", "> 0"]),
        (["migrate", "instance=web1", "target=n2", 'policy={"stall_window": 1e308}'], ["stall_window", "604800"]),
        (["migrate", "instance=web1", "target=n2", 'policy={"downtime_max_ms": 1000000000}'], ["downtime_max_ms", "600000"]),
        (["migrate", "instance=web1", "target=n2", 'policy={"status_wait": 60}'], ["status_wait", "5"]),
    ],
    ids=repr,
)
def test_out_of_range_durations_are_refused(env: Env, args: list[str], needles: list[str]) -> None:
    before = snapshot(env.store)
    refused(env.submit(*args), args[0], *needles)
    assert snapshot(env.store) == before


# --- item 7: long values are cut, saying how long they were ---------------------


@pytest.mark.parametrize(
    "args",
    [
        ["submit", "stop-instance", f"instance={HUGE}"],
        ["submit", HUGE],
        ["submit", "noop", f"{HUGE}=1"],
        ["submit", "noop", f"hold_instance={HUGE}"],
        ["submit", "noop", f"deadlines={json.dumps({HUGE: -1})}"],
        ["list", "--state", HUGE],
        ["submit", "stop-instance", HUGE],
    ],
    ids=lambda a: " ".join(x[:12] for x in a),
)
def test_long_values_are_cut_in_errors(env: Env, args: list[str]) -> None:
    before = snapshot(env.store)
    res = herd(*args, "--store", str(env.store), *(["--cluster", str(env.cluster)] if args[0] == "submit" else []))
    line = refused(res)
    assert len(line) < 300 and "characters)" in line, line
    assert snapshot(env.store) == before


def test_long_names_in_the_cluster_file_are_cut(env: Env) -> None:
    path = env.tmp_path / "long.toml"
    path.write_text(NODE + f'[instances.{HUGE}]\nprimary = "n1"\n')
    line = refused(env.submit("noop", cluster=path), path.name, "(10240 characters)")
    assert len(line) < 300


# --- item 5: the store: wrong path, read-only, damaged ------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["list"], "is a directory"),
        (["show", "1"], "is a directory"),
        (["watch", "1"], "is a directory"),
        (["submit", "noop", "--no-wait"], "is a directory"),
    ],
)
def test_a_directory_as_the_store_is_refused(env: Env, args: list[str], needle: str) -> None:
    extra = ["--cluster", str(env.cluster)] if args[0] == "submit" else []
    before = snapshot(env.store)
    files = sorted(p.name for p in env.tmp_path.iterdir())
    refused(herd(*args, "--store", str(env.tmp_path), *extra), str(env.tmp_path), needle)
    assert sorted(p.name for p in env.tmp_path.iterdir()) == files and snapshot(env.store) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["list"], "no store at"),
        (["show", "1"], "no store at"),
        (["watch", "1"], "no store at"),
        (["cancel", "1"], "no store at"),
        (["show", "999999999999999999999999"], "job ids are 1..9223372036854775807"),
        (["show", "--", "-1"], "job ids are 1.."),
        (["watch", "0"], "job ids are 1.."),
        (["show", "x"], "job_id"),
        (["bogus-command"], "bogus-command"),
    ],
)
def test_missing_stores_and_impossible_job_ids(tmp_path: Path, args: list[str], needle: str) -> None:
    store = tmp_path / "missing" / "herd.db"
    refused(herd(*args, "--store", str(store)), needle)
    assert not store.parent.exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["show", "999999"], ["no job 999999", "herd.db"]),
        (["watch", "999999"], ["no job 999999", "herd.db"]),
        (["cancel", "999999999999999999999999"], ["out of range", "9223372036854775807"]),
    ],
)
def test_job_ids_no_job_has_are_refused_on_a_store(env: Env, args: list[str], needles: list[str]) -> None:
    before = snapshot(env.store)
    refused(herd(*args, "--store", str(env.store)), *needles)
    assert snapshot(env.store) == before


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="herd-ro-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(path)


def test_read_only_store_lists_but_refuses_writes(env: Env, public_dir: Path) -> None:
    """File 0444 in a directory 0555: list/show work (SQLite mode=ro), submit is refused in one line."""
    store_dir = public_dir / "ro"
    store_dir.mkdir()
    store = store_dir / "herd.db"
    shutil.copyfile(env.store, store)
    store.chmod(0o444)
    store_dir.chmod(0o555)
    # root ignores file modes: run the commands as nobody, as an operator would meet them
    prefix: tuple[str, ...] = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups") if os.geteuid() == 0 else ()
    if prefix and shutil.which("setpriv") is None:
        pytest.fail("running as root needs setpriv (util-linux) to test a read-only store as another user")
    before = snapshot(store)
    res = herd("list", "--store", str(store), "--json", prefix=prefix)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert [json.loads(line)["kind"] for line in res.stdout.splitlines()] == ["noop"]
    res = herd("show", "1", "--store", str(store), prefix=prefix)
    assert res.returncode == 0 and "noop" in res.stdout, res.stderr
    cluster = public_dir / "cluster.toml"
    shutil.copyfile(env.cluster, cluster)
    cluster.chmod(0o644)
    res = herd("submit", "noop", "--no-wait", "--store", str(store), "--cluster", str(cluster), prefix=prefix)
    refused(res, str(store))
    assert snapshot(store) == before
    assert sorted(p.name for p in store_dir.iterdir()) == ["herd.db"]


def _make_store(path: Path, jobs: int) -> None:
    async def main() -> None:
        store = SqliteStore(path)
        await store.open()
        try:
            for i in range(jobs):
                await store.create_job(Noop(steps=i % 7), priority=0, depends_on=(), parent_id=None, now=float(i))
        finally:
            await store.aclose()

    anyio.run(main)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    if how == "garbage":
        data = bytearray(b"this is not a database, only some bytes " * 200)
    elif how == "truncated":
        data = data[: page * 3]
    elif how == "corrupt-pages":
        for offset in range(page, len(data)):
            data[offset] = (offset * 7 + 13) % 256
    elif how == "future-schema":
        conn = sqlite3.connect(path)
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
        conn.commit()
        conn.close()
        return
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("how", "needle"),
    [
        ("garbage", "is corrupt"),
        ("truncated", "is corrupt"),
        ("corrupt-pages", "is corrupt"),
        ("future-schema", "schema version 99"),
    ],
)
@pytest.mark.parametrize("command", ["list", "show", "submit"])
def test_damaged_stores_are_refused_untouched(env: Env, how: str, needle: str, command: str) -> None:
    store = env.tmp_path / "damaged.db"
    _make_store(store, 300)
    _damage(store, how)
    before = store.read_bytes()
    args = {"list": ["list"], "show": ["show", "250"], "submit": ["submit", "noop", "--no-wait", "--cluster", str(env.cluster)]}[command]
    line = refused(herd(*args, "--store", str(store)), str(store), needle)
    if needle == "is corrupt":
        assert "it was not changed" in line and "restore it from a backup" in line
    assert store.read_bytes() == before


# --- anything else: one line, and --debug shows the traceback ---------------


@pytest.mark.parametrize("debug", [False, True])
def test_unexpected_errors_are_one_line_unless_debug(env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], debug: bool) -> None:
    async def boom(self: SqliteStore, **kwargs: object) -> list[object]:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.delenv("HERD_DEBUG", raising=False)
    monkeypatch.setattr(SqliteStore, "list_jobs", boom)
    code = run(["list", "--store", str(env.store), *(["--debug"] if debug else [])])
    err = capsys.readouterr().err
    assert code == 1
    last = err.splitlines()[-1]
    assert last == "herd: unexpected error: RuntimeError: boom second line (run with --debug for the traceback)"
    assert ("Traceback" in err) is debug
    assert len(err.splitlines()) == 1 or debug
