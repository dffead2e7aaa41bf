"""The hypervisor layer's error tree.

Every error a driver raises is a :class:`HypervisorError`. The transport
re-raises the same classes on the engine side, with ``node`` set to the node
that raised them, so callers can catch by class no matter where the driver ran.
"""

from __future__ import annotations


class HypervisorError(Exception):
    """Root of every error raised by a hypervisor driver."""

    def __init__(self, message: str = "", *, node: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node = node

    def __str__(self) -> str:
        if self.node:
            return f"[node {self.node}] {self.message}"
        return self.message


class HotplugError(HypervisorError):
    """Hotplug is not supported, or a hotplug action failed."""


class ParameterError(HypervisorError):
    """A hypervisor parameter failed a syntax or validity check."""


class ParameterValueError(ParameterError, ValueError):
    """A parameter value out of its range, raised while an object is built.

    Also a ValueError, so that msgspec reports it (with the field's path) as a
    ValidationError when the object is decoded from a dict or JSON.
    """


class ParseError(HypervisorError, ValueError):
    """A CPU mask (or similar compact notation) could not be parsed."""


class HypervisorTimeout(HypervisorError, TimeoutError):
    """A driver call that waits ran out of its own deadline."""


class InstanceNotFound(HypervisorError):
    """The named instance does not exist (is not running) on this node."""


class MigrationError(HypervisorError):
    """A migration step failed (the instance keeps running on the source)."""


class InjectedFault(HypervisorError):
    """An error raised on purpose by fault injection (tests, chaos)."""


#: Every class above by name, so the transport can rebuild them from the wire.
ERROR_CLASSES: dict[str, type[HypervisorError]] = {
    cls.__name__: cls
    for cls in (
        HypervisorError,
        HotplugError,
        ParameterError,
        ParameterValueError,
        ParseError,
        HypervisorTimeout,
        InstanceNotFound,
        MigrationError,
        InjectedFault,
    )
}
