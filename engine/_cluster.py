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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

import hv

from ._inventory import AdminState, InstanceRecord
from .errors import InvalidOperation, shorten

#: Bounds of ``beparams`` (MiB and count): beyond them a value is a typo.
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
MAX_VCPUS = 1024

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


def instance_from_table(
    name: str, table: Mapping[str, Any], *, where: str = "cluster file", nodes: Collection[str] | None = None
) -> InstanceRecord:
    """An inventory record from an ``[instances.NAME]`` table (validated).

    ``nodes``: the cluster's node names, when known: ``primary`` must be one.
    """
    from ._ops import check_name, name_problem

    problem = name_problem(name, echo=False)
    if problem is not None:
        raise InvalidOperation(f"{where}: [instances.{shorten(name, 40)}]: the name {problem}")
    here = f"{where}: [instances.{name}]"
    if not isinstance(table, Mapping):
        raise InvalidOperation(f"{here} must be a table")
    unknown = set(table) - _INSTANCE_KEYS
    if unknown:
        raise InvalidOperation(f"{here}: unknown keys {shorten(sorted(unknown))} (known: {sorted(_INSTANCE_KEYS)})")
    known = f" (nodes: {', '.join(sorted(nodes))})" if nodes else ""
    if "primary" not in table:
        raise InvalidOperation(f"{here}: key 'primary' is missing: name the node the instance runs on{known}")
    primary = table["primary"]
    check_name(here, "primary", primary)
    if nodes is not None and primary not in nodes:
        raise InvalidOperation(f"{here}: primary node {primary!r} is not a node of the cluster{known}: add [nodes.{primary}] or fix 'primary'")
    spec_fields = {k: v for k, v in table.items() if k not in ("primary", "admin_state")}
    try:
        spec = msgspec.convert({"name": name, **spec_fields}, hv.Instance)
        admin = AdminState(table.get("admin_state", "down"))
    except (msgspec.ValidationError, ValueError) as err:
        raise InvalidOperation(f"{here}: {err}") from err
    be = spec.beparams
    if not (0 <= be.minmem <= be.maxmem <= MAX_MEMORY_MIB and 1 <= be.vcpus <= MAX_VCPUS):
        raise InvalidOperation(
            f"{here}: beparams need 0 <= minmem <= maxmem <= {MAX_MEMORY_MIB} (MiB) and 1 <= vcpus <= {MAX_VCPUS}, "
            f"got minmem={shorten(be.minmem)} maxmem={shorten(be.maxmem)} vcpus={shorten(be.vcpus)}"
        )
    from ._ops import check_hvparams

    check_hvparams(here, spec)
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
        raise InvalidOperation(f"{path}: 'instances' must be a table of tables ([instances.NAME])")
    from transport import parse_cluster

    data["instances"] = {}
    config = parse_cluster(data, source=str(path), base_dir=path.parent)
    from transport.config import check_known_hosts

    for node in config.nodes.values():
        if node.transport == "ssh":
            check_known_hosts(node, source=str(path))  # a missing file is a config error, not a dead node
    name = str(getattr(config, "name", None) or data.get("name") or "herd")
    cluster = Cluster(config=config, name=name)
    nodes = cluster.node_names or None
    cluster.instances = {n: instance_from_table(n, t, where=str(path), nodes=nodes) for n, t in instances_table.items()}
    return cluster
