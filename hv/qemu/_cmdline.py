"""Building QEMU's argument list (never a shell string)."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from .._objects import Disk
from ._runtime import CONSOLE_SOCKET, QMP_SOCKET, Runtime


def opt(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


def is_pcie_machine(machine: str) -> bool:
    return machine == "q35" or machine.startswith("pc-q35")


def root_port_ids(rt: Runtime) -> list[str]:
    if not is_pcie_machine(rt.hvparams["machine_type"]):
        return []
    return [f"hp{i}" for i in range(rt.hvparams["hotplug_slots"])]


def build_argv(rt: Runtime, inst_dir: Path, *, incoming: bool, paused: bool) -> list[str]:
    """The QEMU command line for ``rt``; sockets are relative to ``inst_dir`` (QEMU's cwd)."""
    hv = rt.hvparams
    mem = rt.beparams.maxmem
    machine = [hv["machine_type"]]
    if not hv["acpi"]:
        machine.append("acpi=off")
    argv = [
        hv["qemu_binary"],
        "-name", f"{opt(rt.name)},debug-threads=on",
        "-nodefaults",
        "-no-user-config",
        "-accel", rt.accel,
        "-m", str(mem),
        "-smp", str(rt.beparams.vcpus),
        "-display", "none",
        "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off",
        "-pidfile", str(inst_dir / "pid"),
        "-daemonize",
    ]
    if rt.uuid:
        argv += ["-uuid", rt.uuid]
    if hv["mem_path"]:
        argv += ["-object", f"memory-backend-file,id=ram0,size={mem}M,mem-path={opt(hv['mem_path'])},share=off"]
        machine.append("memory-backend=ram0")
    argv[argv.index("-accel"):argv.index("-accel")] = ["-machine", ",".join(machine)]
    if hv["cpu_type"]:
        argv += ["-cpu", hv["cpu_type"]]
    if hv["kernel_path"]:
        argv += ["-kernel", hv["kernel_path"]]
        if hv["initrd_path"]:
            argv += ["-initrd", hv["initrd_path"]]
        if hv["kernel_args"]:
            argv += ["-append", hv["kernel_args"]]
    if hv["serial_console"]:
        argv += [
            "-chardev", f"socket,id=serial0,path={CONSOLE_SOCKET},server=on,wait=off",
            "-serial", "chardev:serial0",
        ]
    if hv["vnc_bind_address"]:
        addr = hv["vnc_bind_address"]
        host = f"[{addr}]" if ipaddress.ip_address(addr).version == 6 else addr
        argv += ["-vnc", f"{host}:0,to=99"]
    for port_id, n in zip(root_port_ids(rt), range(1, 100)):
        argv += ["-device", f"pcie-root-port,id={port_id},chassis={n},slot={n}"]
    argv += ["-device", "virtio-balloon-pci,id=balloon0", "-device", "virtio-scsi-pci,id=scsi0"]
    for i, disk in enumerate(rt.disks):
        argv += disk_args(i, disk, hv["disk_format"], hv["disk_cache"])
    for i, nic in enumerate(rt.nics):
        tap = rt.taps[i] if i < len(rt.taps) else None
        netdev = f"tap,id=net{i},ifname={tap},script=no,downscript=no" if tap else f"user,id=net{i}"
        argv += ["-netdev", netdev, "-device", f"{hv['nic_type']},netdev=net{i},mac={nic.mac},id=nic{i}"]
    for dev in rt.hotplugged:
        argv += [dev.backend_option, json.dumps(dev.backend, separators=(",", ":"))]
        argv += ["-device", json.dumps(dev.device, separators=(",", ":"))]
    if paused:
        argv.append("-S")
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def disk_args(i: int, disk: Disk, fmt: str, cache: str) -> list[str]:
    drive = f"file={opt(disk.path)},format={fmt},if=none,id=disk{i}"
    if cache != "default":
        drive += f",cache={cache}"
    if disk.readonly:
        drive += ",readonly=on"
    return ["-drive", drive, "-device", f"virtio-blk-pci,drive=disk{i},id=virtio-disk{i}"]
