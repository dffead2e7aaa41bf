"""Guards for tests that need a real component (QEMU, sshd, …).

Outside CI a missing component skips the test with the reason and the
package that provides it. Under CI (``CI`` set) it fails instead: CI installs
everything through ``scripts/test``, so a missing part there is a bug.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_binary(name: str, package: str) -> str:
    """The path of ``name``; skip (or fail under CI) when it is missing."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if path is None:
        reason = f"{name} is not installed (Debian package {package}; scripts/test installs it when run as root)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must have every real component: {reason}")
        pytest.skip(reason)
    return path
