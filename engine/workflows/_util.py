"""Small helpers shared by the instance workflows."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

import hv

T = TypeVar("T")


def as_type(value: Any, typ: type[T], *, what: str) -> T:
    """A node's answer as ``typ`` (transports may hand back plain dicts)."""
    if isinstance(value, typ):
        return value
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as err:
        raise hv.HypervisorError(f"unexpected answer for {what}: {value!r} ({err})") from err


def instance_info(value: Any) -> hv.InstanceInfo | None:
    return None if value is None else as_type(value, hv.InstanceInfo, what="get_instance_info")


def is_running(info: hv.InstanceInfo | None) -> bool:
    """Exists and is not shut down (running or paused both count as 'there')."""
    return info is not None and hv.HvInstanceState(info.state) is not hv.HvInstanceState.SHUTDOWN
