"""The cluster as the engine sees it: the transport's node config + the inventory.

A cluster file is the transport's TOML (nodes, SSH settings) plus
``[instances.NAME]`` tables::

    [instances.web1]
    primary = "node1"
    hypervisor = "fake"          # default "fake"
    admin_state = "up"           # optional, default "down"
    hvparams = { }
    beparams = { minmem = 128, maxmem = 256, vcpus = 1 }
    nics = [ { mac = "aa:00:00:00:00:01" } ]
    disks = [ { path = "/srv/web1.img" } ]
    tags = ["web"]

The instances seed the store's inventory the first time; after that the
store is the truth and changes only through jobs.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import hv

from ._inventory import AdminState, InstanceRecord
from .errors import InvalidOperation

_INSTANCE_KEYS = {"primary", "hypervisor", "admin_state", "hvparams", "beparams", "nics", "disks", "tags", "uuid"}


@dataclass
class Cluster:
    """``config``: the transport's ClusterConfig (None with an explicit transport)."""

    config: Any = None
    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    name: str = "herd"

    @property
    def node_names(self) -> list[str]:
        nodes = getattr(self.config, "nodes", None)
        if nodes is None:
            return []
        if isinstance(nodes, Mapping):
            return list(nodes)
        return [getattr(n, "name", n) for n in nodes]


def instance_from_table(name: str, table: Mapping[str, Any], *, where: str = "cluster file") -> InstanceRecord:
    """An inventory record from an ``[instances.NAME]`` table (validated)."""
    if not isinstance(table, Mapping):
        raise InvalidOperation(f"{where}: [instances.{name}] must be a table")
    unknown = set(table) - _INSTANCE_KEYS
    if unknown:
        raise InvalidOperation(f"{where}: [instances.{name}]: unknown keys {sorted(unknown)} (known: {sorted(_INSTANCE_KEYS)})")
    primary = table.get("primary")
    if not isinstance(primary, str) or not primary:
        raise InvalidOperation(f"{where}: [instances.{name}]: 'primary' must name a node")
    spec_fields = {k: v for k, v in table.items() if k not in ("primary", "admin_state")}
    try:
        spec = msgspec.convert({"name": name, **spec_fields}, hv.Instance)
        admin = AdminState(table.get("admin_state", "down"))
    except (msgspec.ValidationError, ValueError) as err:
        raise InvalidOperation(f"{where}: [instances.{name}]: {err}") from err
    if spec.beparams.minmem > spec.beparams.maxmem or spec.beparams.minmem < 0 or spec.beparams.vcpus < 1:
        raise InvalidOperation(f"{where}: [instances.{name}]: beparams need 0 <= minmem <= maxmem and vcpus >= 1, got {spec.beparams}")
    from ._ops import check_hvparams

    check_hvparams(f"{where}: [instances.{name}]", spec)
    return InstanceRecord(name=name, spec=spec, primary=primary, admin_state=admin)


def load_cluster(path: str | os.PathLike[str]) -> Cluster:
    """Read a cluster file: the transport's node config plus ``[instances]``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InvalidOperation(f"cannot read cluster file {path}: {err}") from err
    instances_table = data.pop("instances", {})
    if not isinstance(instances_table, Mapping):
        raise InvalidOperation(f"{path}: 'instances' must be a table of tables")
    instances = {name: instance_from_table(name, t, where=str(path)) for name, t in instances_table.items()}
    from transport import parse_cluster

    data["instances"] = {}
    config = parse_cluster(data, source=str(path), base_dir=path.parent)
    name = str(getattr(config, "name", None) or data.get("name") or "herd")
    cluster = Cluster(config=config, instances=instances, name=name)
    unknown = [r.name for r in instances.values() if cluster.node_names and r.primary not in cluster.node_names]
    if unknown:
        raise InvalidOperation(f"{path}: instances {unknown} name a primary node that is not in the cluster")
    return cluster
