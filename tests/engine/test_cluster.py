"""Cluster files: the transport's nodes plus validated [instances] tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import AdminState, InvalidOperation, load_cluster

BASE = """
[cluster]
name = "t"
transport = "local"
[nodes.n1]
hv_options = { state_dir = "n1" }
"""


def _write(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(BASE + extra)
    return path


def test_instances_are_read(tmp_path: Path) -> None:
    cluster = load_cluster(_write(tmp_path, '[instances.web1]\nprimary = "n1"\nadmin_state = "up"\nbeparams = { minmem = 64, maxmem = 256, vcpus = 2 }\ntags = ["web"]\n'))
    rec = cluster.instances["web1"]
    assert rec.primary == "n1" and rec.admin_state is AdminState.UP
    assert rec.spec.beparams.maxmem == 256 and rec.spec.tags == ("web",) and rec.spec.hypervisor == "fake"
    assert cluster.node_names == ["n1"] and cluster.name == "t"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[instances.web1]\nprimary = "n9"\n', r"\[instances.web1\]: primary node 'n9' is not a node of the cluster \(nodes: n1\)"),
        ("[instances.web1]\nhypervisor = \"fake\"\n", r"\[instances.web1\]: key 'primary' is missing: name the node"),
        ('[instances.web1]\nprimary = "n1"\ncolour = "red"\n', r"unknown keys \['colour'\]"),
        ('[instances.web1]\nprimary = "n1"\nhvparams = { migration_downtime = "x" }\n', r"migration_downtime"),
        ('[instances.web1]\nprimary = "n1"\nbeparams = { minmem = 512, maxmem = 256 }\n', r"minmem <= maxmem"),
        ('[instances.web1]\nprimary = "n1"\nadmin_state = "sideways"\n', r"\[instances.web1\]"),
    ],
)
def test_bad_instances_are_refused_with_where(tmp_path: Path, table: str, message: str) -> None:
    path = _write(tmp_path, table)
    with pytest.raises(InvalidOperation, match=message) as info:
        load_cluster(path)
    assert str(path) in str(info.value)
