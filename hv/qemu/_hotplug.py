"""The QEMU driver's hotplug: NICs and disks added and removed over QMP."""

from __future__ import annotations

import os
from typing import Any

import anyio
import msgspec

from .. import params as _p
from .._objects import Disk, Instance, Nic
from ..errors import HotplugError, HypervisorError
from ._cmdline import root_port_ids
from ._core import QemuCore
from ._monitor import Monitor, QmpCommandError
from ._runtime import HotDevice


class QemuHotplug(QemuCore):
    """Hotplug methods of :class:`~hv.qemu.QemuHypervisor`."""

    def _dev_id(self, dev_type: str, seq: int) -> str:
        """The QEMU id of hotplugged device number ``seq`` (a non-negative integer) of ``dev_type``."""
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise self._err(HotplugError, f"hotplug seq must be a non-negative integer, not {_p.shorten(seq, 40)}")
        return f"hot{self._dev_type(dev_type)}{seq}"

    @staticmethod
    def _dev_type(dev_type: str) -> str:
        kind = str(dev_type).lower()
        if kind not in ("nic", "disk"):
            raise HotplugError(f"hotplug of device type {dev_type!r} is not supported (nic, disk)")
        return kind

    async def verify_hotplug_support(self, instance: Instance, action: str, dev_type: str) -> None:
        await self.faults.hit("verify_hotplug_support", node=self.node)
        self._dev_type(dev_type)
        if str(action).lower() not in ("add", "remove", "hot-add", "hot-remove"):
            raise self._err(HotplugError, f"hotplug action {action!r} is not supported by {self.NAME} (add, remove)")

    async def hotplug_supported(self, instance: Instance) -> None:
        await self.faults.hit("hotplug_supported", node=self.node)
        _, rt = self._live_runtime(instance.name)
        if await self._runstate(instance.name) == "inmigrate":
            raise self._err(HotplugError, f"instance {instance.name} is being received; no hotplug now")

    async def hot_add_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        """NIC: netdev + NIC on a free PCIe root port. Disk: blockdev + scsi-hd on scsi0."""
        await self.faults.hit("hot_add_device", node=self.node)
        kind, dev_id = self._dev_type(dev_type), self._dev_id(dev_type, seq)
        name = instance.name
        async with self._lock(name):
            _, rt = self._live_runtime(name)
            if any(d.device_id == dev_id for d in rt.hotplugged):
                raise self._err(HotplugError, f"instance {name}: device {dev_id} is already plugged")
            if kind == "nic":
                nic = device if isinstance(device, Nic) else msgspec.convert(device, Nic)
                used = {d.device.get("bus") for d in rt.hotplugged}
                ports = [p for p in root_port_ids(rt) if p not in used]
                dev: dict[str, Any] = {"driver": rt.hvparams["nic_type"], "id": dev_id, "netdev": f"{dev_id}-net", "mac": nic.mac}
                if root_port_ids(rt):
                    if not ports:
                        raise self._err(HotplugError, f"instance {name}: no free hotplug slot (hotplug_slots={rt.hvparams['hotplug_slots']})")
                    dev["bus"] = ports[0]
                hot = HotDevice(kind=kind, device_id=dev_id, backend_id=f"{dev_id}-net", backend_option="-netdev",
                                backend={"type": "user", "id": f"{dev_id}-net"}, device=dev)
                await self._qmp(name, "netdev_add", hot.backend)
            else:
                disk = device if isinstance(device, Disk) else msgspec.convert(device, Disk)
                if not _p.is_norm_abs_path(disk.path) or not os.path.exists(disk.path):
                    raise self._err(HotplugError, f"instance {name}: disk {_p.shorten(disk.path)} is not an existing absolute path")
                backend = {"driver": rt.hvparams["disk_format"], "node-name": f"{dev_id}-blk", "read-only": disk.readonly,
                           "file": {"driver": "file", "filename": disk.path}}
                hot = HotDevice(kind=kind, device_id=dev_id, backend_id=f"{dev_id}-blk", backend_option="-blockdev",
                                backend=backend, device={"driver": "scsi-hd", "id": dev_id, "drive": f"{dev_id}-blk", "bus": "scsi0.0"})
                await self._qmp(name, "blockdev-add", backend)
            try:
                await self._qmp(name, "device_add", hot.device)
            except HypervisorError as err:
                with anyio.CancelScope(shield=True):
                    await self._del_backend(name, hot)
                raise self._err(HotplugError, f"instance {name}: hot-add of {kind} failed: {err.message}") from err
            rt.hotplugged.append(hot)
            self.run_dir.write_runtime(rt)

    async def _del_backend(self, name: str, hot: HotDevice) -> None:
        cmd, args = ("netdev_del", {"id": hot.backend_id}) if hot.backend_option == "-netdev" else ("blockdev-del", {"node-name": hot.backend_id})
        try:
            await self._qmp(name, cmd, args)
        except QmpCommandError:
            pass

    async def hot_del_device(self, instance: Instance, dev_type: str, device: Any, extra: Any, seq: int) -> None:
        """``device_del`` and wait for DEVICE_DELETED (PCI unplug needs the guest's cooperation)."""
        await self.faults.hit("hot_del_device", node=self.node)
        kind, dev_id = self._dev_type(dev_type), self._dev_id(dev_type, seq)
        name = instance.name
        async with self._lock(name):
            _, rt = self._live_runtime(name)
            hot = next((d for d in rt.hotplugged if d.device_id == dev_id), None)
            if hot is None:
                raise self._err(HotplugError, f"instance {name}: no hotplugged {kind} with seq {seq}")
            mon = self._monitor(name)
            await mon.connect()
            since = mon.event_count
            mon.deleted_devices.discard(dev_id)
            try:
                await mon.execute("device_del", {"id": dev_id})
            except QmpCommandError as err:
                if err.error_class != "DeviceNotFound":
                    raise self._err(HotplugError, f"instance {name}: device_del {dev_id} failed: {err.message}") from err
            deadline = anyio.current_time() + self.qmp_timeout
            while not self._deleted(mon, dev_id):
                left = deadline - anyio.current_time()
                if left <= 0:
                    raise self._err(HotplugError, f"instance {name}: the guest did not release {dev_id} within {self.qmp_timeout}s")
                await mon.wait_event(since, left)
                since = mon.event_count
            await self._del_backend(name, hot)
            rt.hotplugged = [d for d in rt.hotplugged if d.device_id != dev_id]
            self.run_dir.write_runtime(rt)

    @staticmethod
    def _deleted(mon: Monitor, dev_id: str) -> bool:
        return dev_id in mon.deleted_devices
