"""The fake node's durable state: one directory per node.

Layout (directories 0700, files 0600)::

    <state_dir>/config.json            tunables (see _config.py)
    <state_dir>/instances/<name>.json  one record per instance (atomic writes)
    <state_dir>/events.jsonl           the node's journal, one JSON object a line

A new driver object on the same directory (an agent restart) sees the same
instances; two directories are two nodes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec

from .._objects import HvInstanceState, Instance
from ..base import check_instance_name, is_instance_name
from ..errors import HypervisorError

INSTANCES_DIR = "instances"
EVENTS_FILE = "events.jsonl"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file, fsync it, and rename it over ``path`` (0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class MigrationRecord(msgspec.Struct, kw_only=True):
    """The durable part of a migration, on either side."""

    role: str  # "source" | "target"
    status: str  # a MigrationState value
    peer: str = ""  # source: the target address; target: the listen address
    live: bool = True
    paused_by_migration: bool = False  # source: we paused the guest, so a failure resumes it
    error: str | None = None
    ram_total: int = 0
    ram_transferred: int = 0
    downtime_ms: int | None = None
    total_time_ms: int | None = None
    iterations: int | None = None


class InstanceRecord(msgspec.Struct, kw_only=True):
    """One instance on this node."""

    spec: Instance
    state: HvInstanceState
    id: int
    memory: int  # MiB
    vcpus: int
    started_at: float  # wall clock (only for uptime)
    boots: int = 1
    migration: MigrationRecord | None = None


class StateDir:
    """Reads and writes one node's directory."""

    def __init__(self, root: str | os.PathLike[str], *, node: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.instances = self.root / INSTANCES_DIR
        self.events_path = self.root / EVENTS_FILE
        self.node = node
        for d in (self.root, self.instances):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    def record_path(self, name: str) -> Path:
        return self.instances / f"{check_instance_name(name, node=self.node)}.json"

    def names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.instances))
        except FileNotFoundError:
            return []
        return [e[:-5] for e in entries if e.endswith(".json") and is_instance_name(e[:-5])]

    def read(self, name: str) -> InstanceRecord | None:
        path = self.record_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return msgspec.json.decode(data, type=InstanceRecord)
        except msgspec.DecodeError as err:
            raise HypervisorError(f"corrupt instance record {path}: {err}", node=self.node) from err

    def write(self, rec: InstanceRecord) -> None:
        atomic_write(self.record_path(rec.spec.name), msgspec.json.encode(rec))

    def remove(self, name: str) -> bool:
        try:
            self.record_path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def remove_leftovers(self, name: str) -> int:
        """Remove temp files a crash mid-write left for ``name``; how many."""
        check_instance_name(name, node=self.node)
        count = 0
        for entry in os.listdir(self.instances):
            if entry.startswith(f".{name}.json.") and entry.endswith(".tmp"):
                (self.instances / entry).unlink(missing_ok=True)
                count += 1
        return count

    def append_event(self, event: dict[str, Any]) -> None:
        """One line in the journal; a single O_APPEND write, so lines never interleave."""
        line = (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_events(state_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The node's journal; a torn last line (a crash mid-write) is skipped."""
    path = Path(state_dir) / EVENTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            events.append(value)
    return events
