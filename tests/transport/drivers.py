"""A small recording driver for transport tests that must not depend on hv.fake.

It is a real :class:`hv.BaseHypervisor` (loaded by agents as
``tests.transport.drivers:RecordingHypervisor``); every call start, end and
cancellation is appended to ``<state_dir>/events.jsonl`` so a test in another
process can check what ran on the node, cleanup included.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

import hv


class StreamStalledLike(hv.MigrationError):
    """A driver's own error subclass, unknown to the engine: like hv.fake's StreamStalled."""


class DiskTimeout(hv.HypervisorTimeout):
    """A driver's own HypervisorTimeout subclass: must stay a TimeoutError on the engine side."""


class BadMask(hv.ParseError):
    """Two known ancestors deep, one of them also a ValueError."""


#: What ``verify(hvparams={"fail": KEY})`` raises on the node.
FAILURES: dict[str, type[hv.HypervisorError]] = {
    "stalled": StreamStalledLike,
    "disk-timeout": DiskTimeout,
    "bad-mask": BadMask,
    "param-value": hv.ParameterValueError,
}


class RecordingHypervisor(hv.BaseHypervisor):
    NAME = "recording"

    def __init__(self, state_dir: str, *, node: str | None = None, slow: float = 30.0) -> None:
        super().__init__(node=node)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.slow = slow
        self.instances: dict[str, hv.Instance] = {}

    def _event(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"event": kind, "node": self.node, **fields})
        with open(self.state_dir / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    @staticmethod
    def read_events(state_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
        path = Path(state_dir) / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    async def start_instance(self, instance, block_devices=None, startup_paused=False) -> None:
        if instance.name in self.instances:
            raise hv.HypervisorError(f"instance {instance.name} is already running", node=self.node)
        self.instances[instance.name] = instance
        self._event("start", instance=instance.name)

    async def stop_instance(self, instance, force=False, retry=False, name=None, timeout=None) -> hv.StopResult:
        name = name or instance.name
        if name not in self.instances:
            if retry:
                return hv.StopResult(name=name, stage=hv.StopStage.ALREADY_STOPPED)
            raise hv.InstanceNotFound(f"instance {name} is not running", node=self.node)
        del self.instances[name]
        return hv.StopResult(
            name=name,
            stage=hv.StopStage.SIGKILL if force else hv.StopStage.SOFT,
            stages=(hv.StageTiming(stage=hv.StopStage.SOFT, seconds=0.01, ended_it=not force),),
        )

    async def list_instances(self, hvparams: Mapping[str, Any] | None = None) -> list[str]:
        return sorted(self.instances)

    async def get_instance_info(self, instance_name, hvparams=None) -> hv.InstanceInfo | None:
        inst = self.instances.get(instance_name)
        if inst is None:
            return None
        return hv.InstanceInfo(name=inst.name, id=1, memory=inst.beparams.maxmem, vcpus=inst.beparams.vcpus, state=hv.HvInstanceState.RUNNING)

    async def get_all_instances_info(self, hvparams=None) -> list[hv.InstanceInfo]:
        return [i for n in sorted(self.instances) if (i := await self.get_instance_info(n)) is not None]

    async def get_node_info(self, hvparams=None) -> hv.NodeInfo:
        return hv.NodeInfo(memory_total=4096, memory_free=2048, memory_dom0=512, cpu_total=2, cpu_dom0=2, cpu_nodes=1, cpu_sockets=1, hv_name="recording")

    async def verify(self, hvparams=None) -> str | None:
        """Slow on purpose when hvparams says so (the cancellation target), or fails as told."""
        if hvparams and hvparams.get("fail"):
            raise FAILURES[hvparams["fail"]](f"verify failed: {hvparams['fail']}", node=self.node)
        if hvparams and hvparams.get("sleep"):
            self._event("begin", method="verify")
            try:
                for step in range(int(hvparams["sleep"] * 10)):
                    hv.report_progress(step=step)
                    await anyio.sleep(0.1)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.05)  # cleanup that itself awaits
                    self._event("cleanup", method="verify")
            return "slept"
        return None

    async def reboot_instance(self, instance) -> None:
        raise hv.InjectedFault("reboot refused", node=self.node)

    async def balloon_instance_memory(self, instance, mem: int) -> None:
        raise RuntimeError(f"driver bug with {mem}")
