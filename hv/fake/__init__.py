"""The ``fake`` hypervisor: a simulated node for tests, demos and chaos runs.

State lives in a per-node directory; migrations really stream bytes between
two nodes (TCP by default); speed, dirty rate, guest behaviour and faults are
settable at run time through ``FakeHypervisor.configure(state_dir, ...)``.
"""

from __future__ import annotations

from ._config import FileFault, Settings
from ._driver import FakeHypervisor
from ._live import StreamStalled
from ._state import InstanceRecord, MigrationRecord, check_instance_name, read_events
from ._stream import IncomingListener, StreamFactory, TcpStreamFactory

__all__ = [
    "FakeHypervisor",
    "FileFault",
    "IncomingListener",
    "InstanceRecord",
    "MigrationRecord",
    "Settings",
    "StreamFactory",
    "StreamStalled",
    "TcpStreamFactory",
    "check_instance_name",
    "read_events",
]
