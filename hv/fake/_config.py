"""The fake node's run-time tunables: ``<state_dir>/config.json``.

Tests and chaos runs change a node's behaviour while it serves (bandwidth,
dirty rate, how its guests answer ACPI, injected faults) by rewriting this
file; the driver re-reads it at the start of every call, and a migration
stream re-reads it while it runs. Writes are atomic and the file is 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec

from ..errors import ParameterError
from ._state import atomic_write

CONFIG_FILE = "config.json"
LOCK_FILE = ".config.lock"
GIB = 1024 * 1024 * 1024


class FileFault(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A fault armed through ``config.json`` for one method name."""

    error: str | None = None
    delay: float = 0.0
    hang: bool = False
    times: int | None = None  # hits left; None: every call


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Every setting, with its default (see :meth:`FakeHypervisor.configure`)."""

    bandwidth: int = GIB  # bytes/s of simulated memory streamed
    dirty_rate: int = 0  # bytes/s re-dirtied while a live migration runs
    soft_stop_delay: float | None = 0.05  # seconds to honour ACPI; None: ignores ACPI
    hard_stop_delay: float = 0.01  # seconds a hard stop takes
    reboot_delay: float = 0.01  # seconds a reboot takes
    memory_total: int | None = None  # MiB; None: the constructor's value
    cpu_total: int | None = None  # None: the constructor's value
    hv_version: str = "1.0"
    chunk_size: int = 64 * 1024  # bytes per data frame on the migration stream
    connect_timeout: float = 5.0  # seconds for the migration connection and the final ack
    stall_timeout: float | None = None  # seconds a stream may make no progress; None: wait (like QEMU)
    faults: dict[str, FileFault] = msgspec.field(default_factory=dict)


SETTING_NAMES = tuple(Settings.__struct_fields__)


def _fail(where: str, message: str) -> ParameterError:
    return ParameterError(f"fake hypervisor setting {where}: {message}")


def _number(where: str, value: Any, *, integer: bool = False, minimum: float = 0.0, positive: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise _fail(where, f"must be {kind}, not {value!r}")
    if not math.isfinite(value) or value < minimum or (positive and value <= 0):
        raise _fail(where, f"must be {'> 0' if positive else f'>= {minimum:g}'} and finite, not {value!r}")


def validate(settings: Settings, where: str = "") -> Settings:
    """Range checks msgspec's type checks do not cover; returns ``settings``."""
    p = f"{where}: " if where else ""
    _number(f"{p}'bandwidth'", settings.bandwidth, integer=True, positive=True)
    _number(f"{p}'dirty_rate'", settings.dirty_rate, integer=True)
    if settings.soft_stop_delay is not None:
        _number(f"{p}'soft_stop_delay'", settings.soft_stop_delay)
    _number(f"{p}'hard_stop_delay'", settings.hard_stop_delay)
    _number(f"{p}'reboot_delay'", settings.reboot_delay)
    if settings.memory_total is not None:
        _number(f"{p}'memory_total'", settings.memory_total, integer=True, positive=True)
    if settings.cpu_total is not None:
        _number(f"{p}'cpu_total'", settings.cpu_total, integer=True, positive=True)
    if not isinstance(settings.hv_version, str) or not settings.hv_version:
        raise _fail(f"{p}'hv_version'", f"must be a non-empty string, not {settings.hv_version!r}")
    _number(f"{p}'chunk_size'", settings.chunk_size, integer=True, positive=True)
    if settings.chunk_size > 16 * 1024 * 1024:
        raise _fail(f"{p}'chunk_size'", f"must be at most 16 MiB, not {settings.chunk_size}")
    _number(f"{p}'connect_timeout'", settings.connect_timeout, positive=True)
    if settings.stall_timeout is not None:
        _number(f"{p}'stall_timeout'", settings.stall_timeout, positive=True)
    for method, fault in settings.faults.items():
        if not isinstance(method, str) or not method.isidentifier():
            raise _fail(f"{p}'faults'", f"key must be a method name, not {method!r}")
        _number(f"{p}'faults.{method}.delay'", fault.delay)
        if fault.times is not None:
            _number(f"{p}'faults.{method}.times'", fault.times, integer=True)
    return settings


def _decode(data: Mapping[str, Any], where: str) -> Settings:
    unknown = sorted(set(data) - set(SETTING_NAMES))
    if unknown:
        raise _fail(
            f"{where}: {unknown[0]!r}", f"unknown setting (known: {', '.join(SETTING_NAMES)})"
        )
    try:
        settings = msgspec.convert(dict(data), type=Settings)
    except msgspec.ValidationError as err:
        raise _fail(where, str(err)) from err
    return validate(settings, where)


class ConfigFile:
    """One node's ``config.json``: cached by mtime, merged and written atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CONFIG_FILE
        self.lock_path = state_dir / LOCK_FILE
        self._cache: tuple[tuple[int, int, int], Settings] | None = None

    def read(self) -> Settings:
        """The current settings (defaults when the file does not exist)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return Settings()
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return Settings()
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise _fail(str(self.path), f"not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise _fail(str(self.path), f"must hold a JSON object, not {type(data).__name__}")
        settings = _decode(data, str(self.path))
        self._cache = (key, settings)
        return settings

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise read-modify-write of the file across processes."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, settings: Settings) -> None:
        atomic_write(self.path, msgspec.json.format(msgspec.json.encode(settings), indent=2) + b"\n")
        self._cache = None

    def merge(self, updates: Mapping[str, Any]) -> Settings:
        """Merge ``updates`` into the file (validated first; unknown names refused)."""
        unknown = sorted(set(updates) - set(SETTING_NAMES))
        if unknown:
            raise _fail(repr(unknown[0]), f"unknown setting (known: {', '.join(SETTING_NAMES)})")
        with self.locked():
            current = msgspec.to_builtins(self.read())
            current.update(updates)
            settings = _decode(current, "configure()")
            self.write(settings)
            return settings

    def consume_fault(self, method: str) -> FileFault | None:
        """The armed file fault for ``method``, counting one hit against ``times``."""
        settings = self.read()
        fault = settings.faults.get(method)
        if fault is None or (fault.times is not None and fault.times <= 0):
            return None
        if fault.times is None:
            return fault
        with self.locked():
            settings = self.read()
            fault = settings.faults.get(method)
            if fault is None or fault.times is None or fault.times <= 0:
                return fault if fault is not None and fault.times is None else None
            faults = dict(settings.faults)
            faults[method] = msgspec.structs.replace(fault, times=fault.times - 1)
            self.write(msgspec.structs.replace(settings, faults=faults))
            return fault
