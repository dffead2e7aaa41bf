"""The fake driver's lifecycle, inventory, settings and faults (no migration)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import anyio
import pytest

import hv
from hv.fake import FakeHypervisor

from .conftest import NodeFactory, inst


@pytest.mark.asyncio
async def test_start_list_info_and_memory_accounting(make_node: NodeFactory) -> None:
    node = make_node("n1", memory_total=1024, cpu_total=2)
    await node.start_instance(inst("web1", 256))
    await node.start_instance(inst("db1", 128), startup_paused=True)
    assert await node.list_instances() == ["db1", "web1"]
    info = await node.get_instance_info("web1")
    assert info is not None and info.state is hv.HvInstanceState.RUNNING and info.memory == 256
    assert (await node.get_instance_info("db1")).state is hv.HvInstanceState.PAUSED  # type: ignore[union-attr]
    assert await node.get_instance_info("nope") is None
    ni = await node.get_node_info()
    assert (ni.memory_total, ni.memory_free, ni.cpu_total, ni.hv_name) == (1024, 640, 2, "fake")
    with pytest.raises(hv.HypervisorError, match="already exists"):
        await node.start_instance(inst("web1", 64))
    with pytest.raises(hv.HypervisorError, match="not enough memory.*needs 1000 MiB, node has 640 MiB free"):
        await node.start_instance(inst("big", 1000))
    # minmem < free < maxmem: the instance gets what is free (instance_startup_memory).
    await node.start_instance(hv.Instance(name="flex", beparams=hv.BeParams(minmem=100, maxmem=4096)))
    assert (await node.get_instance_info("flex")).memory == 640  # type: ignore[union-attr]
    assert (await node.get_node_info()).memory_free == 0
    for bad in ("../x", "a/b", ".hidden", "", "x" * 64):
        with pytest.raises(hv.HypervisorError, match="invalid instance name"):
            await node.start_instance(hv.Instance(name=bad))
    with pytest.raises(hv.ParameterError, match="'bogus' is not supported"):
        await node.start_instance(inst("odd", hvparams={"bogus": 1}))


@pytest.mark.asyncio
async def test_state_survives_restart_and_nodes_are_separate(make_node: NodeFactory, tmp_path: Path) -> None:
    first = make_node("n1")
    await first.start_instance(inst("web1", 64))
    await first.aclose()
    again = make_node("n1")  # an agent restart: same directory, new object
    assert await again.list_instances() == ["web1"]
    other = make_node("n2")
    assert await other.list_instances() == []
    await other.start_instance(inst("web1", 64))  # the same name on another node is another instance
    rec = tmp_path / "n1" / "instances" / "web1.json"
    assert stat.S_IMODE(rec.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "n1").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "n1" / "events.jsonl").stat().st_mode) == 0o600
    assert not [p for p in rec.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.asyncio
async def test_soft_stop_is_honoured_after_the_guest_delay(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node("n1")
    FakeHypervisor.configure(tmp_path / "n1", soft_stop_delay=0.05)
    await node.start_instance(inst())
    res = await node.stop_instance(inst(), timeout=5)
    assert res.stage is hv.StopStage.SOFT and not res.hard
    assert [(s.stage, s.ended_it) for s in res.stages] == [(hv.StopStage.SOFT, True)]
    assert 0.04 <= res.stages[0].seconds < 1.0
    assert await node.list_instances() == []
    again = await node.stop_instance(None, name="web1", retry=True)
    assert again.stage is hv.StopStage.ALREADY_STOPPED
    with pytest.raises(hv.InstanceNotFound, match="web1"):
        await node.stop_instance(inst())


@pytest.mark.asyncio
async def test_guest_ignoring_acpi_escalates_to_hard_stop(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node("n1")
    FakeHypervisor.configure(tmp_path / "n1", soft_stop_delay=None, hard_stop_delay=0.02)
    await node.start_instance(inst())
    reports: list[dict] = []
    with hv.progress_sink(reports.append):
        res = await node.stop_instance(inst(), timeout=0.2)
    assert res.stage is hv.StopStage.MONITOR and res.hard
    assert [(s.stage, s.ended_it) for s in res.stages] == [(hv.StopStage.SOFT, False), (hv.StopStage.MONITOR, True)]
    assert res.stages[0].seconds >= 0.19  # the whole soft timeout was waited
    assert [r["stage"] for r in reports] == ["soft", "monitor"]
    stages = [(e["stage"], e["ended_it"]) for e in FakeHypervisor.read_events(tmp_path / "n1") if e["event"] == "stop-stage"]
    assert stages == [("soft", False), ("monitor", True)]
    # A guest that would honour ACPI, but later than the timeout, is also stopped hard.
    FakeHypervisor.configure(tmp_path / "n1", soft_stop_delay=10.0)
    await node.start_instance(inst())
    assert (await node.stop_instance(inst(), timeout=0.05)).stage is hv.StopStage.MONITOR
    # force: hard at once.
    FakeHypervisor.configure(tmp_path / "n1", soft_stop_delay=0.0)
    await node.start_instance(inst())
    res = await node.stop_instance(inst(), force=True)
    assert res.stage is hv.StopStage.MONITOR and [s.stage for s in res.stages] == [hv.StopStage.MONITOR]


@pytest.mark.asyncio
async def test_paused_guest_does_not_answer_acpi(make_node: NodeFactory) -> None:
    node = make_node("n1")
    await node.start_instance(inst(), startup_paused=True)
    res = await node.stop_instance(inst(), timeout=0.1)
    assert res.stage is hv.StopStage.MONITOR


@pytest.mark.asyncio
async def test_reboot_balloon_console_verify_powercycle(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node("n1", memory_total=1024)
    spec = hv.Instance(name="web1", beparams=hv.BeParams(minmem=128, maxmem=512))
    await node.start_instance(spec)
    before = await node.get_instance_info("web1")
    assert before is not None and before.memory == 512
    await node.reboot_instance(spec)
    after = await node.get_instance_info("web1")
    assert after is not None and after.id == before.id
    rec = json.loads((tmp_path / "n1" / "instances" / "web1.json").read_text())
    assert rec["boots"] == 2
    await node.balloon_instance_memory(spec, 256)
    assert (await node.get_instance_info("web1")).memory == 256  # type: ignore[union-attr]
    assert (await node.get_node_info()).memory_free == 768
    for bad in (64, 1024, "256"):
        with pytest.raises(hv.ParameterError, match=r"outside \[128, 512\]"):
            await node.balloon_instance_memory(spec, bad)  # type: ignore[arg-type]
    console = await node.get_instance_console(spec)
    assert console.kind == "message" and console.instance == "web1" and console.node == "n1"
    assert await node.verify() is None
    await node.powercycle_node()
    assert await node.list_instances() == []
    assert any(e["event"] == "powercycle" and e["instances"] == ["web1"] for e in FakeHypervisor.read_events(tmp_path / "n1"))
    with pytest.raises(hv.InstanceNotFound):
        await node.reboot_instance(spec)


@pytest.mark.asyncio
async def test_configure_validates_and_is_read_at_each_call(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node("n1", memory_total=1024)
    with pytest.raises(hv.ParameterError, match="'bandwith': unknown setting"):
        FakeHypervisor.configure(tmp_path / "n1", bandwith=10)
    with pytest.raises(hv.ParameterError, match="bandwidth"):
        FakeHypervisor.configure(tmp_path / "n1", bandwidth=0)
    with pytest.raises(hv.ParameterError, match="soft_stop_delay"):
        FakeHypervisor.configure(tmp_path / "n1", soft_stop_delay="soon")
    with pytest.raises(hv.ParameterError, match="faults"):
        FakeHypervisor.configure(tmp_path / "n1", faults={"verify": {"eror": "x"}})
    FakeHypervisor.configure(tmp_path / "n1", memory_total=2048, hv_version="2.1")
    ni = await node.get_node_info()
    assert (ni.memory_total, ni.hv_version) == (2048, "2.1")
    cfg = tmp_path / "n1" / "config.json"
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert FakeHypervisor.read_settings(tmp_path / "n1").memory_total == 2048
    # A hand-broken file is an error naming the file; nothing is lost by a failed configure.
    cfg.write_text('{"bandwidth": -1}')
    with pytest.raises(hv.ParameterError, match="config.json.*bandwidth"):
        await node.get_node_info()
    problem = await node.verify()
    assert problem is not None and "config.json" in problem and "bandwidth" in problem
    os.unlink(cfg)
    assert (await node.get_node_info()).memory_total == 1024  # the constructor's value again


@pytest.mark.asyncio
async def test_faults_in_process_and_from_the_file(make_node: NodeFactory, tmp_path: Path) -> None:
    faults = hv.Faults()
    node = make_node("n1", faults=faults)
    faults.inject("start_instance", error="disk on fire", times=1)
    with pytest.raises(hv.InjectedFault, match="disk on fire") as err:
        await node.start_instance(inst())
    assert err.value.node == "n1"
    await node.start_instance(inst())  # the fault was used up
    FakeHypervisor.configure(tmp_path / "n1", faults={"reboot_instance": {"error": "bad luck", "times": 1}})
    with pytest.raises(hv.InjectedFault, match="reboot_instance: bad luck"):
        await node.reboot_instance(inst())
    await node.reboot_instance(inst())
    assert FakeHypervisor.read_settings(tmp_path / "n1").faults["reboot_instance"].times == 0
    FakeHypervisor.configure(tmp_path / "n1", faults={"get_node_info": {"delay": 0.1}})
    began = anyio.current_time()
    await node.get_node_info()
    assert anyio.current_time() - began >= 0.09
    events = FakeHypervisor.read_events(tmp_path / "n1")
    errors = [e for e in events if e["event"] == "error"]
    assert [(e["method"], e["instance"], e["error"]) for e in errors] == [
        ("start_instance", "web1", "InjectedFault"),
        ("reboot_instance", "web1", "InjectedFault"),
    ]


@pytest.mark.asyncio
async def test_cancelled_call_is_journaled(make_node: NodeFactory, tmp_path: Path) -> None:
    """A hang (from the file, as chaos sets it) cancelled by the caller leaves a "cancelled" event."""
    node = make_node("n1")
    await node.start_instance(inst())
    FakeHypervisor.configure(tmp_path / "n1", faults={"get_instance_info": {"hang": True}})
    with anyio.move_on_after(0.1) as scope:
        await node.get_instance_info("web1")
    assert scope.cancelled_caught
    events = [e for e in FakeHypervisor.read_events(tmp_path / "n1") if e.get("method") == "get_instance_info"]
    assert [(e["event"], e["instance"]) for e in events] == [("start", "web1"), ("cancelled", "web1")]
    # A stop cancelled during its soft wait leaves the instance in place.
    FakeHypervisor.configure(tmp_path / "n1", faults={}, soft_stop_delay=None)
    with anyio.move_on_after(0.1):
        await node.stop_instance(inst(), timeout=30)
    assert await node.list_instances() == ["web1"]
    stops = [e["event"] for e in FakeHypervisor.read_events(tmp_path / "n1") if e.get("method") == "stop_instance"]
    assert stops == ["start", "cancelled"]


@pytest.mark.asyncio
async def test_driver_from_registry_and_parameters(tmp_path: Path) -> None:
    cls = hv.get_hypervisor_class("fake")
    assert cls is FakeHypervisor and cls.CAN_MIGRATE
    cls.check_parameter_syntax(cls.fill_hvparams({}))
    with pytest.raises(hv.ParameterError, match="migration_mode"):
        cls.check_parameter_syntax(cls.fill_hvparams({"migration_mode": "teleport"}))
    with pytest.raises(hv.ParameterError, match="memory_total"):
        FakeHypervisor(tmp_path / "x", memory_total=0)
    async with hv.get_hypervisor("fake", state_dir=tmp_path / "n9", node="n9") as node:
        assert (await node.get_node_info()).memory_total == 8192
