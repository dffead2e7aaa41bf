"""Pure checks of the QEMU driver: hvparams, status mapping, version compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest

import hv
from hv.qemu import QemuHypervisor


def test_status_mapping_and_versions() -> None:
    st = QemuHypervisor.status_from_qmp(
        {
            "status": "wait-unplug",
            "ram": {"transferred": 10, "remaining": 30, "total": 40, "mbps": 8.0, "dirty-pages-rate": 2, "page-size": 4096, "dirty-sync-count": 3},
            "expected-downtime": 12,
            "setup-time": 4,
        }
    )
    assert st.status == "wait-unplug" and not st.is_final
    assert (st.ram_transferred, st.ram_remaining, st.ram_total, st.iterations) == (10, 30, 40, 3)
    assert st.rate_bps == 1e6 and st.dirty_rate_bps == 8192 and st.expected_downtime_ms == 12 and st.setup_time_ms == 4
    assert QemuHypervisor.status_from_qmp({}).status == "none"
    assert QemuHypervisor.versions_safe_for_migration("7.2.22", "7.2.9")
    assert not QemuHypervisor.versions_safe_for_migration("7.2.22", "8.0.0")
    assert not QemuHypervisor.versions_safe_for_migration("garbage", "garbage")
    QemuHypervisor.check_parameter_syntax(QemuHypervisor.DEFAULTS)
    for key, bad in [("accel", "xen"), ("migration_caps", "auto-converge:bogus"), ("migration_bandwidth", -1), ("acpi", "yes"), ("vnc_bind_address", "localhost")]:
        with pytest.raises(hv.ParameterError, match=key):
            QemuHypervisor.check_parameter_syntax({**QemuHypervisor.DEFAULTS, key: bad})


@pytest.mark.asyncio
async def test_registered_and_faults_by_method(tmp_path: Path) -> None:
    faults = hv.Faults()
    drv = hv.get_hypervisor("kvm", run_dir=tmp_path / "n1", node="n1", faults=faults)
    assert isinstance(drv, QemuHypervisor) and drv.CAN_MIGRATE and drv.NAME == "kvm"
    faults.inject("list_instances", error="disk on fire", times=1)
    with pytest.raises(hv.InjectedFault, match="disk on fire") as err:
        await drv.list_instances()
    assert err.value.node == "n1"
    assert await drv.list_instances() == []
    for name in ("set_migration_downtime", "force_complete_migration", "cancel_migration"):
        assert name in hv.REMOTE_METHODS
    with pytest.raises(hv.ParameterError, match="port_range"):
        QemuHypervisor(tmp_path / "n2", port_range=(2000, 1000))
    await drv.aclose()


@pytest.mark.asyncio
async def test_verify_and_describe(tmp_path: Path) -> None:
    drv = QemuHypervisor(tmp_path / "n1", node="n1")
    assert QemuHypervisor.kvm_status(str(tmp_path / "no-kvm")) == (False, f"{tmp_path / 'no-kvm'} does not exist (no KVM module, or not exposed to this machine)")
    facts = await drv.describe()
    assert facts["binary"] == "qemu-system-x86_64" and facts["accel"] in ("kvm", "tcg")
    assert facts["accel"] == ("kvm" if facts["kvm_usable"] else "tcg")
    problem = await drv.verify({"qemu_binary": "/nonexistent/qemu"})
    assert problem is not None and "/nonexistent/qemu" in problem
    if not facts["kvm_usable"]:
        assert "KVM is not usable" in (await drv.verify({"accel": "kvm"}) or "")
    assert "not supported" in (await drv.verify({"bogus": 1}) or "")
    await drv.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["hot_add_device", "hot_del_device"])
@pytest.mark.parametrize("seq", ["1; rm", -1, 1.5, True, None])
async def test_hotplug_seq_is_checked_before_anything_runs(tmp_path: Path, method: str, seq: object) -> None:
    """A bad ``seq`` is one HotplugError naming it, before QEMU or the run directory is looked at."""
    drv = QemuHypervisor(tmp_path / "run", node="n1")
    with pytest.raises(hv.HotplugError, match="hotplug seq must be a non-negative integer") as err:
        await getattr(drv, method)(hv.Instance(name="absent"), "nic", None, None, seq)
    assert err.value.node == "n1"
