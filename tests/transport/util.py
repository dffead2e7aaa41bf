"""Helpers of the transport tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


async def eventually(probe: Callable[[], T], *, timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``probe`` until truthy: only for watching another process (a node agent)."""
    with anyio.move_on_after(timeout):
        while True:
            value = probe()
            if value:
                return value
            await anyio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
