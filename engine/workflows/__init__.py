"""Built-in workflows; importing this package registers them.

A new operation's workflow is a new module here, imported below.
"""

from __future__ import annotations

from . import noop, reboot, start, stop  # noqa: F401
from . import evacuate, failover, migrate, reconcile, verify  # noqa: F401  (live migration and around it)
