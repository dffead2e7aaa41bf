"""What only the SSH transport has: keepalives, reconnects, host keys, auth, real sshd."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import asyncssh
import msgspec
import pytest

import hv
import transport
from transport.testing import LocalCluster
from tests._load import warm_call_deadline

from .conftest import RECORDING
from .drivers import RecordingHypervisor
from .util import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    async with LocalCluster(n=2, base_dir=tmp_path / "c", hypervisor=RECORDING, call_timeout=30) as lc:
        yield lc


def _cleanups(lc: LocalCluster, node: str) -> int:
    return sum(e["event"] == "cleanup" for e in RecordingHypervisor.read_events(lc.state_dir(node)))


async def test_partitioned_node_is_unreachable_within_keepalive_bound_then_reconnects(cluster: LocalCluster) -> None:
    assert cluster.config is not None
    bound = cluster.config.keepalive_interval * (cluster.config.keepalive_count_max + 1) + 1.0
    async with transport.SshTransport(cluster.config) as t:
        node = t.node("n1")
        began = anyio.Event()
        errors: list[BaseException] = []

        async def slow() -> None:
            try:
                await node.verify({"sleep": 30}, on_progress=lambda _p: began.set())
            except transport.NodeUnreachable as err:
                errors.append(err)

        with anyio.fail_after(bound + 5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await began.wait()
                cluster.freeze("n1")  # the server stops answering, the TCP connection stays open
                frozen_at = anyio.current_time()
        detected = anyio.current_time() - frozen_at
        assert errors and errors[0].node == "n1", errors
        assert detected <= bound, f"took {detected:.2f}s, bound {bound:.2f}s"
        cluster.thaw("n1")
        # Reconnects on the next call (after the backoff, if a try fell in the partition).
        async def ping_ok() -> dict:
            with anyio.move_on_after(10):
                while True:
                    try:
                        return await node.ping()
                    except transport.NodeUnreachable:
                        await anyio.sleep(0.1)
            raise AssertionError("no reconnect within 10 s")

        assert (await ping_ok())["node"] == "n1"
        assert t.connection_count("n1") == 2
        # The thawed server saw the old session go: its agent cancelled the call and cleaned up.
        await eventually(lambda: _cleanups(cluster, "n1") == 1, what="cleanup of the cut-off call")
        await eventually(lambda: len(cluster.agent_pids("n1")) == 1, what="the old agent to exit")


async def test_killed_server_fails_calls_at_once_and_reconnects_after_restart(cluster: LocalCluster) -> None:
    assert cluster.config is not None
    async with transport.SshTransport(cluster.config) as t:
        node = t.node("n2")
        old_pid = (await node.ping())["pid"]
        began = anyio.Event()
        errors: list[BaseException] = []

        async def slow() -> None:
            try:
                await node.verify({"sleep": 30}, on_progress=lambda _p: began.set())
            except transport.NodeUnreachable as err:
                errors.append(err)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await began.wait()
                await cluster.kill("n2")
        assert errors and isinstance(errors[0], transport.NodeUnreachable)
        with pytest.raises(transport.NodeUnreachable, match="cannot connect"):
            await node.ping()
        # n1 is not affected by n2's death.
        assert (await t.node("n1").ping())["node"] == "n1"
        await cluster.restart("n2")
        with anyio.fail_after(10):
            while True:
                try:
                    info = await node.ping()
                    break
                except transport.NodeUnreachable as err:
                    assert "backoff" in str(err) or "cannot connect" in str(err)
                    await anyio.sleep(0.1)
        assert info["pid"] != old_pid


async def test_closing_the_transport_ends_agents_after_their_cleanup(cluster: LocalCluster) -> None:
    assert cluster.config is not None
    began = anyio.Event()
    async with anyio.create_task_group() as tg:
        async with transport.SshTransport(cluster.config) as t:

            async def slow() -> None:
                try:
                    await t.node("n1").verify({"sleep": 30}, on_progress=lambda _p: began.set())
                except transport.NodeUnreachable:
                    pass

            tg.start_soon(slow)
            await began.wait()
            assert len(cluster.agent_pids("n1")) == 1
    # No orphan agent: stdin closed → calls cancelled → cleanup ran → agent exited.
    await eventually(lambda: not cluster.agent_pids("n1"), what="the agent to exit")
    assert _cleanups(cluster, "n1") == 1


async def test_changed_and_unknown_host_keys_are_refused(cluster: LocalCluster) -> None:
    assert cluster.config is not None
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
    cluster.write_known_hosts({"n1": " ".join(other[:2])})
    async with transport.SshTransport(cluster.config) as t:
        with pytest.raises(transport.HostKeyError, match="CHANGED") as caught:
            await t.node("n1").ping()
        assert caught.value.node == "n1" and str(cluster.known_hosts) in str(caught.value)
        assert (await t.node("n2").ping())["node"] == "n2"  # its entry is right
    cluster.known_hosts.write_text("")
    async with transport.SshTransport(cluster.config) as t:
        with pytest.raises(transport.HostKeyError, match="UNKNOWN"):
            await t.node("n2").ping()


async def test_wrong_identity_and_broken_agent_command_are_reported(cluster: LocalCluster, tmp_path: Path) -> None:
    assert cluster.config is not None
    stranger = tmp_path / "stranger_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    nodes = dict(cluster.config.nodes)
    nodes["n1"] = msgspec.structs.replace(nodes["n1"], identity_file=str(stranger))
    nodes["n2"] = msgspec.structs.replace(nodes["n2"], agent_command=["/nonexistent/python3", "-m", "transport.agent"])
    config = msgspec.structs.replace(cluster.config, nodes=nodes)
    async with transport.SshTransport(config) as t:
        with pytest.raises(transport.NodeUnreachable, match="authentication"):
            await t.node("n1").ping()
        with pytest.raises(transport.NodeUnreachable, match="nonexistent") as caught:
            await t.node("n2").ping()
        assert "exit status" in str(caught.value) and "ExceptionGroup" not in str(caught.value)


@pytest.mark.sshd
async def test_real_openssh_sshd(tmp_path: Path) -> None:
    """The real thing: OpenSSH's sshd with a private config on a loopback port."""
    async with LocalCluster(n=2, base_dir=tmp_path / "c", hypervisor=RECORDING, server="sshd") as lc:
        assert lc.config is not None
        async with transport.SshTransport(lc.config) as t:
            n1, n2 = t.node("n1"), t.node("n2")
            inst = hv.Instance(name="db1")
            await n1.start_instance(inst)
            assert await n1.list_instances() == ["db1"]
            with pytest.raises(hv.InstanceNotFound) as caught:
                await n2.stop_instance(inst)
            assert caught.value.node == "n2"
            deadline = await warm_call_deadline(n2)  # times the call, not a reconnect
            with pytest.raises(transport.CallTimeout):
                await n2.verify({"sleep": 30}, call_timeout=deadline)
            await eventually(lambda: _cleanups(lc, "n2") == 1, what="cleanup on n2 under sshd")

            async def ping(i: int) -> None:
                assert (await n1.ping())["node"] == "n1"

            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(ping, i)
            assert len(lc.agent_pids("n1")) == 1  # one long-lived agent session per node
        await eventually(lambda: not lc.agent_pids("n1") and not lc.agent_pids("n2"), what="agents to exit")


async def test_mixed_cluster_routes_each_node_to_its_transport(cluster: LocalCluster, tmp_path: Path) -> None:
    assert cluster.config is not None
    local = transport.NodeConfig(
        name="inproc", transport="local", hypervisor=RECORDING, hv_options={"state_dir": str(tmp_path / "inproc")}
    )
    config = msgspec.structs.replace(cluster.config, nodes={**cluster.config.nodes, "inproc": local})
    async with transport.connect(config) as t:
        assert isinstance(t, transport.MultiTransport)
        assert sorted(t.node_names) == ["inproc", "n1", "n2"]
        here, there = await t.node("inproc").ping(), await t.node("n1").ping()
        assert here["node"] == "inproc" and there["node"] == "n1" and here["pid"] != there["pid"]
        with pytest.raises(transport.UnknownNode):
            t.node("n3")
