"""The ``herd`` CLI skeleton over a store and a cluster file (local fake nodes)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from engine.cli import app

from .conftest import FakeCluster


def test_submit_list_show_watch(local_cluster: FakeCluster, tmp_path: Path) -> None:
    cluster = local_cluster.write_file(tmp_path / "cluster.toml")
    store = tmp_path / "herd.db"
    runner = CliRunner()
    common = ["--store", str(store)]
    res = runner.invoke(app, ["submit", "start-instance", "instance=web1", *common, "--cluster", str(cluster), "--json"])
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert events[0]["kind"] == "state" and events[-1]["data"]["state"] == "succeeded"
    assert "web1" in local_cluster.running("n1")

    res = runner.invoke(app, ["list", *common, "--json"])
    assert res.exit_code == 0
    jobs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(j["id"], j["state"], j["kind"]) for j in jobs] == [(1, "succeeded", "start-instance")]

    res = runner.invoke(app, ["show", "1", *common])
    assert res.exit_code == 0 and "prove-running" in res.stdout

    res = runner.invoke(app, ["watch", "1", *common, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[-1])["data"]["state"] == "succeeded"

    # a bad operation is refused with a message, exit code 1, nothing stored
    res = runner.invoke(app, ["submit", "stop-instance", "instance=nope", *common, "--cluster", str(cluster)])
    assert res.exit_code == 1 and "unknown instance 'nope'" in res.output
    res = runner.invoke(app, ["list", *common, "--json"])
    assert len(res.stdout.splitlines()) == 1
