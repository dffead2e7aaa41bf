"""Reaching a node: known_hosts checked as what it is, per-port host keys, private files, bounded connects."""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.abc
import asyncssh
import msgspec
import pytest
import structlog

import transport
from transport.config import ClusterConfig
from transport.ssh import StrictKnownHosts
from transport.testing import LocalCluster, agent_command

from .conftest import RECORDING

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    async with LocalCluster(
        n=2, base_dir=tmp_path / "c", hypervisor=RECORDING, call_timeout=30, connect_timeout=1.0, agent_start_timeout=1.5
    ) as lc:
        yield lc


def _missing(path: Path) -> None:
    path.unlink()


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _mode_000(path: Path) -> None:
    path.chmod(0)


KNOWN_HOSTS_PROBLEMS = [
    pytest.param(_missing, "file does not exist", id="missing"),
    pytest.param(_directory, "file cannot be read", id="directory"),
    pytest.param(
        _mode_000, "cannot be read (Permission denied)", id="mode-000",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode 000 file"),
    ),
]


@pytest.mark.parametrize(("breakit", "expected"), KNOWN_HOSTS_PROBLEMS)
async def test_known_hosts_problem_is_a_config_error_naming_the_file(
    cluster: LocalCluster, breakit: Callable[[Path], None], expected: str
) -> None:
    assert cluster.config is not None
    breakit(cluster.known_hosts)
    # At load time: the cluster file names it, as a one-line ConfigError.
    with pytest.raises(transport.ConfigError) as caught:
        transport.load_cluster_config(cluster.config_path)
    message = str(caught.value)
    assert message.startswith(f"{cluster.config_path}: [nodes.n1] known_hosts: {expected}"), message
    assert str(cluster.known_hosts) in message and "\n" not in message
    if breakit is _missing:
        assert f"ssh-keyscan -p {cluster.port('n1')} 127.0.0.1" in message
    # At connect time (the file broke after loading): the same error, at once and
    # again on the next call — no connect attempts, no "unreachable" backoff.
    async with transport.SshTransport(cluster.config) as t:
        for _ in range(2):
            with anyio.fail_after(2):
                with pytest.raises(transport.ConfigError, match=expected) as caught:
                    await t.node("n1").ping()
            assert caught.value.node == "n1" and not isinstance(caught.value, transport.NodeUnreachable)


@pytest.mark.parametrize(
    ("entry", "port", "trusted"),
    [
        ("127.0.0.1", 22, True),
        ("127.0.0.1", 2222, False),  # asyncssh alone falls back to the port-less entry
        ("[127.0.0.1]:2222", 2222, True),
        ("[127.0.0.1]:2222", 22, False),
        ("[127.0.0.1]:22", 22, False),  # OpenSSH writes port 22 without brackets
    ],
)
def test_known_hosts_match_as_openssh_does(entry: str, port: int, trusted: bool) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
    known = StrictKnownHosts(f"{entry} {key[0]} {key[1]}\n")
    assert bool(known.match("127.0.0.1", "127.0.0.1", port)[0]) is trusted


async def test_port_less_entry_does_not_vouch_for_another_port(cluster: LocalCluster) -> None:
    assert cluster.config is not None
    text = cluster.known_hosts.read_text()
    # The right key of n1, but listed without its port: for port 22 only.
    cluster.known_hosts.write_text(text.replace(f"[127.0.0.1]:{cluster.port('n1')} ", "127.0.0.1 "))
    async with transport.SshTransport(cluster.config) as t:
        with pytest.raises(transport.HostKeyError, match=rf"UNKNOWN.*\[127.0.0.1\]:{cluster.port('n1')}"):
            await t.node("n1").ping()
        assert (await t.node("n2").ping())["node"] == "n2"


async def test_test_cluster_creates_private_files_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        async with LocalCluster(n=1, base_dir=tmp_path / "c", hypervisor=RECORDING) as lc:
            assert lc.config is not None
            async with transport.SshTransport(lc.config) as t:
                await t.node("n1").ping()  # the server and agent wrote their files too
            found = 0
            for root, dirs, files in os.walk(lc.base_dir):
                for name in dirs:
                    mode = stat.S_IMODE(os.stat(Path(root, name)).st_mode)
                    assert mode == 0o700, (Path(root, name), oct(mode))
                for name in files:
                    mode = stat.S_IMODE(os.stat(Path(root, name)).st_mode)
                    assert mode & 0o022 == 0, (Path(root, name), oct(mode))
                    found += 1
            for path in (lc.identity_file, lc.known_hosts, lc.authorized_keys, lc.config_path,
                         lc.base_dir / "n1" / "server.log", lc.base_dir / "n1" / "ssh_host_ed25519_key"):
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
            assert found >= 6
            assert stat.S_IMODE(os.stat(lc.base_dir).st_mode) == 0o700
    finally:
        os.umask(old)


# --- connects that never end --------------------------------------------------------


class BlackHole:
    """A plain TCP listener on a port: accepts connections, never says a word."""

    def __init__(self) -> None:
        self._scope = anyio.CancelScope()
        self._stopped = anyio.Event()
        self._held: list[anyio.abc.SocketStream] = []

    async def run(self, port: int, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            with self._scope:
                multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
                async with multi:
                    (listener,) = multi.listeners
                    task_status.started()
                    while True:
                        self._held.append(await listener.accept())
        finally:
            for stream in self._held:
                await stream.aclose()
            self._stopped.set()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()


@pytest.mark.parametrize("kind", ["black-hole", "silent-agent"])
async def test_stuck_connect_stage_fails_within_its_deadline_then_the_next_call_recovers(
    cluster: LocalCluster, tmp_path: Path, kind: str
) -> None:
    assert cluster.config is not None
    flag = tmp_path / "silent"
    # The agent command: silent (sleeps, never says hello) while the flag exists.
    script = f"if [ -e {shlex.quote(str(flag))} ]; then exec sleep 1000; fi; exec \"$@\""
    nodes = dict(cluster.config.nodes)
    nodes["n1"] = msgspec.structs.replace(nodes["n1"], agent_command=["sh", "-c", script, "sh", *agent_command()])
    config: ClusterConfig = msgspec.structs.replace(cluster.config, nodes=nodes)
    stage, limit = ("ssh handshake", config.connect_timeout) if kind == "black-hole" else ("agent hello", config.agent_start_timeout)
    hole = BlackHole()
    async with anyio.create_task_group() as tg, transport.SshTransport(config) as t:
        if kind == "black-hole":
            await cluster.kill("n1")  # its port now answers TCP and nothing else
            await tg.start(hole.run, cluster.port("n1"))
        else:
            flag.touch()
        node = t.node("n1")
        with structlog.testing.capture_logs() as logs:
            began = anyio.current_time()
            async with anyio.create_task_group() as calls:
                impatient: list[BaseException] = []

                async def short_call() -> None:
                    # A caller with a shorter deadline than the stage's is not held behind it.
                    try:
                        await node.ping(call_timeout=0.3)
                    except transport.CallTimeout as err:
                        impatient.append(err)
                        impatient.append(anyio.current_time() - began)  # type: ignore[arg-type]

                calls.start_soon(short_call)
                with pytest.raises(transport.NodeUnreachable, match=f"stage '{stage}'") as caught:
                    await node.ping()
            elapsed = anyio.current_time() - began
        assert caught.value.node == "n1"
        assert limit <= elapsed + 0.05 and elapsed < limit + 3.0, elapsed
        assert impatient and impatient[1] < 0.3 + 1.0, impatient  # type: ignore[operator]
        failed = [e for e in logs if e["event"] == "connect failed"]
        assert failed and failed[0]["node"] == "n1" and failed[0]["stage"] == stage, logs
        assert failed[0]["elapsed"] >= limit - 0.05
        # Fix the node; the next call (after the short backoff) connects afresh.
        if kind == "black-hole":
            await hole.stop()
            await cluster.restart("n1")
        else:
            flag.unlink()
        with anyio.fail_after(10):
            while True:
                try:
                    assert (await node.ping())["node"] == "n1"
                    break
                except transport.NodeUnreachable as err:
                    assert "backoff" in str(err), err
                    await anyio.sleep(0.05)
        assert t.connection_count("n1") == 1
