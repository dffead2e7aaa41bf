"""Against the ``fake`` hypervisor: every method, and a live migration, through transports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import hv
import transport
from transport.config import ClusterConfig, NodeConfig
from hv.fake import FakeHypervisor
from transport.testing import LocalCluster
from tests._load import warm_call_deadline

from .util import eventually


pytestmark = pytest.mark.anyio

INST = hv.Instance(name="vm1", hypervisor="fake", beparams=hv.BeParams(minmem=64, maxmem=128, vcpus=1))


class FakeSetup:
    def __init__(self, t: transport.Transport, state_dirs: dict[str, Path]) -> None:
        self.transport = t
        self.state_dirs = state_dirs


@pytest.fixture(params=["local", "ssh"])
async def fake(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FakeSetup]:
    if request.param == "local":
        dirs = {n: tmp_path / n for n in ("n1", "n2")}
        cluster = ClusterConfig(
            name="t",
            nodes={
                n: NodeConfig(name=n, transport="local", hypervisor="fake", hv_options={"state_dir": str(d)})
                for n, d in dirs.items()
            },
            call_timeout=30,
        )
        async with transport.connect(cluster) as t:
            assert isinstance(t, transport.LocalTransport)
            yield FakeSetup(t, dirs)
    else:
        async with LocalCluster(n=2, base_dir=tmp_path / "c", hypervisor="fake", call_timeout=30) as lc:
            assert lc.config is not None
            async with transport.connect(lc.config) as t:
                assert isinstance(t, transport.SshTransport)
                yield FakeSetup(t, {n: lc.state_dir(n) for n in ("n1", "n2")})


async def test_every_hypervisor_method_through_the_transport(fake: FakeSetup) -> None:
    node = fake.transport.node("n1")
    called: set[str] = set()

    async def call(method: str, *args: object, **kwargs: object) -> object:
        called.add(method)
        return await node.call(method, *args, **kwargs)

    async def refused(cls: type[hv.HypervisorError], method: str, *args: object) -> None:
        with pytest.raises(cls) as caught:
            await call(method, *args)
        assert caught.value.node == "n1"

    assert await call("start_instance", INST) is None
    assert await call("list_instances") == ["vm1"]
    info = await call("get_instance_info", "vm1")
    assert isinstance(info, hv.InstanceInfo) and info.state is hv.HvInstanceState.RUNNING
    assert await call("get_instance_info", "ghost") is None
    assert [i.name for i in await call("get_all_instances_info")] == ["vm1"]  # type: ignore[attr-defined]
    assert isinstance(await call("get_node_info"), hv.NodeInfo)
    assert isinstance(await call("get_instance_console", INST), hv.ConsoleInfo)
    assert await call("verify") is None
    assert await call("validate_parameters", {"migration_mode": "live", "migration_downtime": 300}) is None
    await refused(hv.ParameterError, "validate_parameters", {"migration_downtime": 0})
    assert isinstance(await call("instance_startup_memory", INST), int)
    assert await call("balloon_instance_memory", INST, 96) is None
    assert await call("reboot_instance", INST) is None
    assert isinstance(await call("migration_info", INST), str)
    await refused(hv.MigrationError, "set_migration_downtime", INST, 100)
    await refused(hv.MigrationError, "force_complete_migration", INST)
    assert await call("cancel_migration", INST) is None  # nothing to cancel: idempotent
    assert isinstance(await call("get_migration_status", INST), hv.MigrationStatus)
    for method in ("hot_add_device", "hot_del_device", "hot_mod_device"):
        await refused(hv.HotplugError, method, INST, "nic", {"mac": "aa:00:00:00:00:02"}, None, 1)
    await refused(hv.HotplugError, "verify_hotplug_support", INST, "hot-add", "nic")
    await refused(hv.HotplugError, "hotplug_supported", INST)
    stop = await call("stop_instance", INST, timeout=5)
    assert isinstance(stop, hv.StopResult) and stop.name == "vm1"
    assert (await call("stop_instance", None, name="vm1", retry=True)).stage is hv.StopStage.ALREADY_STOPPED  # type: ignore[attr-defined]
    await refused(hv.InstanceNotFound, "stop_instance", INST)
    assert await call("cleanup_instance", "vm1") is None
    assert await call("start_instance", INST) is None
    assert await call("powercycle_node") is None
    assert await call("list_instances") == []
    # The migration methods run in the migration test; the rest must all be here.
    migration = {"accept_instance", "migrate_instance", "finalize_migration_dst", "finalize_migration_source"}
    assert set(hv.REMOTE_METHODS) - migration <= called, set(hv.REMOTE_METHODS) - migration - called


async def test_live_migration_between_two_fake_nodes(fake: FakeSetup) -> None:
    for d in fake.state_dirs.values():
        FakeHypervisor.configure(d, bandwidth=256 * 1024 * 1024)
    src, dst = fake.transport.node("n1"), fake.transport.node("n2")
    await src.start_instance(INST)
    info = await src.migration_info(INST)
    address = await dst.accept_instance(INST, info, "127.0.0.1")
    await src.migrate_instance(instance=INST, target=address, live=True)
    readings: list[hv.MigrationStatus] = []
    with anyio.fail_after(20):
        while True:
            status = await src.get_migration_status(INST, wait=0.5)
            readings.append(status)
            if status.is_final:
                break
    assert status.succeeded, status
    assert status.ram_transferred > 0 and status.ram_total == 128 * 1024 * 1024
    await dst.finalize_migration_dst(INST, info, True)
    await src.finalize_migration_source(INST, True, True)
    assert await src.list_instances() == []
    assert await dst.list_instances() == ["vm1"]
    dst_info = await dst.get_instance_info("vm1")
    assert dst_info is not None and dst_info.state is hv.HvInstanceState.RUNNING


async def test_cancelled_call_is_journaled_cancelled_on_the_fake_node(fake: FakeSetup) -> None:
    node = fake.transport.node("n2")
    # A warm connection: the deadline times the call, not the connect (SSH, agent start).
    deadline = await warm_call_deadline(node)
    FakeHypervisor.configure(fake.state_dirs["n2"], faults={"get_node_info": {"hang": True}})
    with pytest.raises(transport.CallTimeout):
        await node.get_node_info(call_timeout=deadline)

    def cancelled() -> bool:
        events = FakeHypervisor.read_events(fake.state_dirs["n2"])
        return any(e["event"] == "cancelled" and e.get("method") == "get_node_info" for e in events)

    await eventually(cancelled, what="a 'cancelled' event in the fake node's journal")
