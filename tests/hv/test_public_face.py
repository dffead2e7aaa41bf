"""hv's small public face: what each package exports, its error tree by name, and driver signatures."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

import hv
import hv.errors
import hv.fake
import hv.qemu
from hv.fake._stream import ProtocolError as FakeStreamProtocolError

PUBLIC: dict[str, set[str]] = {
    "hv": {
        "REMOTE_METHODS", "BaseHypervisor", "BeParams", "ConsoleInfo", "Disk", "Fault", "Faults",
        "HotplugError", "HvInstanceState", "HypervisorError", "HypervisorTimeout", "InjectedFault",
        "Instance", "InstanceInfo", "InstanceNotFound", "MIGRATION_FAILED_STATUSES",
        "MIGRATION_FINAL_STATUSES", "MigrationError", "MigrationState", "MigrationStatus", "Network",
        "Nic", "NicMode", "NodeInfo", "ParameterError", "ParameterValueError", "ParseError",
        "StageTiming", "StopResult", "StopStage", "configure_nic", "generate_tap_name",
        "get_hypervisor", "get_hypervisor_class", "get_linux_node_info", "hypervisor_names",
        "progress_sink", "report_progress",
    },
    "hv.fake": {
        "FakeHypervisor", "FileFault", "IncomingListener", "InstanceRecord", "MigrationRecord",
        "Settings", "StreamFactory", "StreamStalled", "TcpStreamFactory", "check_instance_name", "read_events",
    },
    "hv.qemu": {"RUNSTATE_MAP", "QemuHypervisor", "QmpCommandError"},
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_package_exports_exactly_its_public_names(package: str) -> None:
    """``__all__`` is the agreed list, each name resolves, and nothing else of hv's own is left lying public."""
    mod = importlib.import_module(package)
    assert set(mod.__all__) == PUBLIC[package]
    assert len(mod.__all__) == len(set(mod.__all__)), "a name listed twice"
    for name in mod.__all__:
        assert hasattr(mod, name), name
    unlisted = {
        name
        for name, value in vars(mod).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and (getattr(value, "__module__", None) or "").startswith("hv")
        and name not in mod.__all__
    }
    assert not unlisted, f"{package} shows names it does not export: {sorted(unlisted)}"


def test_error_classes_by_name_are_the_whole_public_tree() -> None:
    """``hv.errors.ERROR_CLASSES`` maps each public error class's name to it, and nothing else."""
    tree = {
        name: value
        for name, value in vars(hv.errors).items()
        if isinstance(value, type) and issubclass(value, hv.HypervisorError)
    }
    assert hv.errors.ERROR_CLASSES == tree
    for name, cls in hv.errors.ERROR_CLASSES.items():
        assert cls.__name__ == name and getattr(hv, name) is cls


#: Each driver-specific error class and the public class it must be caught as.
DRIVER_ERRORS: dict[type, type] = {
    hv.qemu.QmpCommandError: hv.HypervisorError,
    hv.fake.StreamStalled: hv.MigrationError,
    FakeStreamProtocolError: hv.MigrationError,
}


def _all_subclasses(cls: type) -> set[type]:
    found: set[type] = set()
    todo = [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_driver_error_is_known() -> None:
    """A new error class in hv is either public (in ERROR_CLASSES) or listed here with its public parent."""
    own = {c for c in _all_subclasses(hv.HypervisorError) if c.__module__.startswith("hv.")}
    assert own - set(hv.errors.ERROR_CLASSES.values()) == set(DRIVER_ERRORS)


@pytest.mark.parametrize("cls", list(DRIVER_ERRORS), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_driver_errors_are_caught_as_their_public_class(cls: type) -> None:
    """The nearest public ancestor (what the engine side rebuilds from the ancestry) is the right one."""
    nearest = next(c for c in cls.__mro__ if c in hv.errors.ERROR_CLASSES.values())
    assert nearest is DRIVER_ERRORS[cls]
    err = cls("boom", node="n1")
    assert isinstance(err, hv.HypervisorError) and str(err) == "[node n1] boom"


@pytest.mark.parametrize("driver", [hv.fake.FakeHypervisor, hv.qemu.QemuHypervisor], ids=lambda d: d.NAME)
@pytest.mark.parametrize("method", hv.REMOTE_METHODS)
def test_driver_methods_take_the_interface_parameters(driver: type, method: str) -> None:
    """The wire decodes parameters from BaseHypervisor: a driver must take exactly the same ones."""
    want = inspect.signature(getattr(hv.BaseHypervisor, method)).parameters
    got = inspect.signature(getattr(driver, method)).parameters
    assert [(p.name, p.kind, p.default) for p in got.values()] == [(p.name, p.kind, p.default) for p in want.values()]


def test_migrate_instance_takes_no_cluster_name() -> None:
    assert list(inspect.signature(hv.BaseHypervisor.migrate_instance).parameters) == ["self", "instance", "target", "live"]
