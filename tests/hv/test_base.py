"""The base driver's default behaviours and helpers (node info, NICs, …)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

import hv
from hv import base, params
from hv.errors import HotplugError, HypervisorError, ParameterError

MEMINFO = """MemTotal:       16384000 kB
MemFree:         1024000 kB
MemAvailable:    8192000 kB
Buffers:          204800 kB
Cached:          2048000 kB
Active:          4096000 kB
"""

CPUINFO_2_SOCKETS = "".join(
    f"processor\t: {i}\nvendor_id\t: GenuineIntel\nphysical id\t: {i // 2}\ncore id\t\t: {i % 2}\n\n" for i in range(4)
)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_linux_node_info_prefers_mem_available(tmp_path: Path) -> None:
    numa = tmp_path / "node"
    for n in ("node0", "node1", "possible"):
        (numa / n).mkdir(parents=True)
    info = hv.BaseHypervisor.get_linux_node_info(
        meminfo=write(tmp_path, "meminfo", MEMINFO),
        cpuinfo=write(tmp_path, "cpuinfo", CPUINFO_2_SOCKETS),
        sys_node_dir=str(numa),
    )
    assert info.memory_total == 16000
    assert info.memory_free == 8000
    assert info.memory_dom0 == 4000
    assert info.cpu_total == 4 and info.cpu_dom0 == 4
    assert info.cpu_sockets == 2
    assert info.cpu_nodes == 2


def test_linux_node_info_without_mem_available(tmp_path: Path) -> None:
    old_kernel = "\n".join(line for line in MEMINFO.splitlines() if not line.startswith("MemAvailable"))
    info = base.get_linux_node_info(
        meminfo=write(tmp_path, "meminfo", old_kernel),
        cpuinfo=write(tmp_path, "cpuinfo", "processor : 0\n"),
        sys_node_dir=str(tmp_path / "no-sysfs"),
    )
    assert info.memory_free == (1024000 + 204800 + 2048000) // 1024
    assert info.cpu_total == 1 and info.cpu_nodes == 1 and info.cpu_sockets == 1


@pytest.mark.parametrize(
    ("meminfo", "cpuinfo", "blamed"),
    [
        (None, "processor : 0\n", "meminfo"),
        ("MemTotal: lots kB\n", "processor : 0\n", "meminfo"),
        ("MemFree: 10 kB\n", "processor : 0\n", "meminfo"),
        (MEMINFO, "model name : x\n", "cpuinfo"),
        (MEMINFO, None, "cpuinfo"),
    ],
)
def test_linux_node_info_names_the_bad_file(tmp_path: Path, meminfo: str | None, cpuinfo: str | None, blamed: str) -> None:
    m = write(tmp_path, "meminfo", meminfo) if meminfo is not None else str(tmp_path / "meminfo")
    c = write(tmp_path, "cpuinfo", cpuinfo) if cpuinfo is not None else str(tmp_path / "cpuinfo")
    with pytest.raises(HypervisorError) as err:
        base.get_linux_node_info(meminfo=m, cpuinfo=c)
    assert str(tmp_path / blamed) in str(err.value)


class Tiny(hv.BaseHypervisor):
    """A minimal driver: only what the base needs to show its defaults."""

    NAME = "tiny"
    PARAMETERS = {"port": params.REQ_NET_PORT_CHECK, "kernel": params.OPT_FILE_CHECK}
    DEFAULTS = {"port": 5900, "kernel": ""}

    def __init__(self, free: int) -> None:
        super().__init__(node="n1")
        self.free = free

    async def get_node_info(self, hvparams=None) -> hv.NodeInfo:
        return hv.NodeInfo(memory_total=4096, memory_free=self.free, memory_dom0=0, cpu_total=1, cpu_dom0=1, cpu_nodes=1, cpu_sockets=1)


@pytest.mark.asyncio
@pytest.mark.parametrize(("free", "expected"), [(100, 256), (700, 700), (5000, 1024)])
async def test_instance_startup_memory(free: int, expected: int) -> None:
    inst = hv.Instance(name="i", beparams=hv.BeParams(minmem=256, maxmem=1024))
    assert await Tiny(free).instance_startup_memory(inst) == expected


@pytest.mark.asyncio
async def test_seed_defaults() -> None:
    drv = Tiny(100)
    inst = hv.Instance(name="i")
    assert await drv.migration_info(inst) == ""
    assert await drv.accept_instance(inst, "", "10.0.0.2") == "10.0.0.2"
    assert await drv.finalize_migration_dst(inst, "", True) is None
    assert await drv.finalize_migration_source(inst, False, True) is None
    assert await drv.cleanup_instance("i") is None
    for call in (
        drv.hot_add_device(inst, "nic", None, None, 0),
        drv.hot_del_device(inst, "disk", None, None, 0),
        drv.hot_mod_device(inst, "nic", None, None, 0),
        drv.verify_hotplug_support(inst, "hot-add", "nic"),
        drv.hotplug_supported(inst),
    ):
        with pytest.raises(HotplugError, match="not supported"):
            await call
    with pytest.raises(NotImplementedError):
        await drv.start_instance(inst)


def test_versions_and_ancillary_files() -> None:
    assert hv.BaseHypervisor.versions_safe_for_migration("7.2", "7.2")
    assert not hv.BaseHypervisor.versions_safe_for_migration("7.2", "8.0")
    assert Tiny.get_ancillary_files() == ([], [])

    class Bad(hv.BaseHypervisor):
        ANCILLARY_FILES = ["/etc/a"]
        ANCILLARY_FILES_OPT = ["/etc/b"]

    with pytest.raises(HypervisorError, match="subset"):
        Bad.get_ancillary_files()


@pytest.mark.asyncio
async def test_parameter_checks_through_the_class(tmp_path: Path) -> None:
    Tiny.check_parameter_syntax(Tiny.fill_hvparams())
    with pytest.raises(ParameterError, match="'port'.*65536"):
        Tiny.check_parameter_syntax(Tiny.fill_hvparams({"port": 65536}))
    with pytest.raises(ParameterError, match="'kernl' is not supported for hypervisor 'tiny'"):
        Tiny.check_parameter_syntax(Tiny.fill_hvparams({"kernl": "/boot/x"}))
    with pytest.raises(ParameterError, match="not found or not a file"):
        await Tiny(1).validate_parameters(Tiny.fill_hvparams({"kernel": str(tmp_path / "vmlinuz")}))


def test_next_tap_name() -> None:
    out = (
        "1: lo: <LOOPBACK,UP> mtu 65536 qdisc noqueue\n    link/loopback 00:00:00:00:00:00\n"
        "5: gnt.com.0: <BROADCAST> mtu 1500\n    link/ether aa:00:00:00:00:01\n"
        "9: gnt.com.3: <BROADCAST> mtu 1500\n    link/ether aa:00:00:00:00:02\n"
    )
    assert base.next_tap_name(out) == "gnt.com.4"
    assert base.next_tap_name("1: lo: <LOOPBACK>\n    link/loopback\n") == "gnt.com.0"
    with pytest.raises(HypervisorError, match="cannot parse"):
        base.next_tap_name("garbage\n")


@pytest.mark.asyncio
async def test_generate_tap_name_runs_ip_link() -> None:
    name = await hv.generate_tap_name()
    assert name.startswith("gnt.com.")
    with pytest.raises(HypervisorError, match="Failed to list"):
        await hv.generate_tap_name(("false",))


def _recorder(tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    out = tmp_path / "env.json"
    script = tmp_path / "ifup"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"json.dump(dict(os.environ), open({str(out)!r}, 'w'))\n"
        "print('configured', sys.argv[1:])\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script, out


@pytest.mark.asyncio
async def test_configure_nic_passes_environment(tmp_path: Path) -> None:
    script, out = _recorder(tmp_path)
    net = hv.Network(name="prod", subnet="10.1.0.0/24", gateway="10.1.0.1")
    nic = hv.Nic(mac="aa:00:00:11:22:33", ip="10.1.0.5", mode=hv.NicMode.BRIDGED, link="br0", vlan="100", name="eth-front", uuid="u-1", network=net)
    inst = hv.Instance(name="web1", tags=("a", "b"))
    await hv.configure_nic(str(script), inst, 2, nic, "gnt.com.7")
    env = json.loads(out.read_text())
    assert env["INSTANCE"] == "web1"
    assert env["MAC"] == "aa:00:00:11:22:33"
    assert env["MODE"] == "bridged"
    assert env["INTERFACE"] == "gnt.com.7"
    assert env["INTERFACE_INDEX"] == "2"
    assert env["INTERFACE_UUID"] == "u-1"
    assert env["TAGS"] == "a b"
    assert env["IP"] == "10.1.0.5"
    assert env["INTERFACE_NAME"] == "eth-front"
    assert env["LINK"] == "br0" and env["BRIDGE"] == "br0"
    assert env["VLAN"] == "100"
    assert env["NETWORK_NAME"] == "prod" and env["NETWORK_SUBNET"] == "10.1.0.0/24"
    assert env["PATH"].endswith(":/sbin:/usr/sbin")


@pytest.mark.asyncio
async def test_configure_nic_optional_fields_absent(tmp_path: Path) -> None:
    script, out = _recorder(tmp_path)
    await hv.configure_nic([str(script), "--flag"], hv.Instance(name="i"), 0, hv.Nic(mac="aa:bb:cc:dd:ee:ff", mode=hv.NicMode.ROUTED), "tap0")
    env = json.loads(out.read_text())
    for absent in ("IP", "INTERFACE_NAME", "LINK", "VLAN", "BRIDGE", "NETWORK_NAME"):
        assert absent not in env
    assert env["MODE"] == "routed"


@pytest.mark.asyncio
async def test_configure_nic_failure_carries_output(tmp_path: Path) -> None:
    script, _ = _recorder(tmp_path, exit_code=3)
    with pytest.raises(HypervisorError) as err:
        await hv.configure_nic(str(script), hv.Instance(name="i"), 0, hv.Nic(mac="aa:bb:cc:dd:ee:ff"), "gnt.com.1")
    assert "gnt.com.1" in str(err.value) and "exited 3" in str(err.value) and "configured" in str(err.value)


@pytest.mark.asyncio
async def test_configure_nic_does_not_use_a_shell(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="cannot run"):
        await hv.configure_nic(f"{tmp_path}/x; touch {tmp_path}/pwned", hv.Instance(name="i"), 0, hv.Nic(mac="m"), "t")
    assert not (tmp_path / "pwned").exists()


def test_public_names() -> None:
    for name in hv.__all__:
        assert hasattr(hv, name), name
    assert issubclass(hv.ParseError, ValueError)
    assert issubclass(hv.HypervisorTimeout, TimeoutError) and issubclass(hv.HypervisorTimeout, hv.HypervisorError)
    assert set(hv.hypervisor_names()) >= {"fake", "kvm"}
    with pytest.raises(HypervisorError, match="unknown hypervisor 'xen'"):
        hv.get_hypervisor_class("xen")
    assert len(set(hv.REMOTE_METHODS)) == len(hv.REMOTE_METHODS), "a method listed twice"
    for method in hv.REMOTE_METHODS:
        assert callable(getattr(hv.BaseHypervisor, method)), method


@pytest.mark.asyncio
async def test_faults_error_delay_times() -> None:
    faults = hv.Faults()
    faults.inject("start_instance", error="boom", times=1)
    with pytest.raises(hv.InjectedFault, match="start_instance: boom"):
        await faults.hit("start_instance", node="n1")
    await faults.hit("start_instance")  # exhausted after one hit
    faults.inject("stop_instance", error=hv.HypervisorTimeout("slow"))
    with pytest.raises(hv.HypervisorTimeout) as err:
        await faults.hit("stop_instance", node="n2")
    assert err.value.node == "n2"
    import anyio

    faults.inject("verify", hang=True)
    with anyio.move_on_after(0.05) as scope:
        await faults.hit("verify")
    assert scope.cancelled_caught


def test_progress_sink_routes_reports() -> None:
    seen: list[dict] = []
    hv.report_progress(ignored=True)
    with hv.progress_sink(seen.append):
        hv.report_progress(stage="soft", seconds=1.5)
    hv.report_progress(after=True)
    assert seen == [{"stage": "soft", "seconds": 1.5}]
