"""``python -m hv.fake``: what chaos runs use to change a node behind SSH."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hv.fake import FakeHypervisor

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hv.fake", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_configure_settings_and_events_from_the_shell(tmp_path: Path) -> None:
    node = tmp_path / "n1"
    res = run("configure", str(node), "bandwidth=1048576", "soft_stop_delay=null", "hv_version=2.0",
              'faults={"verify": {"error": "boom", "times": 2}}')
    assert res.returncode == 0, res.stderr
    settings = FakeHypervisor.read_settings(node)
    assert settings.bandwidth == 1048576 and settings.soft_stop_delay is None and settings.hv_version == "2.0"
    assert settings.faults["verify"].error == "boom" and settings.faults["verify"].times == 2
    shown = json.loads(run("settings", str(node)).stdout)
    assert shown["bandwidth"] == 1048576
    bad = run("configure", str(node), "bandwdth=5")
    assert bad.returncode == 2 and "'bandwdth': unknown setting" in bad.stderr
    bad = run("configure", str(node), "dirty_rate=fast")
    assert bad.returncode == 2 and "dirty_rate" in bad.stderr
    assert FakeHypervisor.read_settings(node).bandwidth == 1048576  # a refused change changed nothing
    assert run("events", str(node)).stdout == ""
