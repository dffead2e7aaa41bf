"""The fake driver's call journal: every driver call is recorded and meets its faults first."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._objects import Instance
from ..errors import HypervisorError

if TYPE_CHECKING:
    from ._core import FakeCore

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _instance_of(sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The instance a call is about, for the journal."""
    try:
        bound = sig.bind_partial(None, *args, **kwargs).arguments
    except TypeError:
        return None
    for key in ("name", "instance", "instance_name"):
        value = bound.get(key)
        if value is not None:
            return value.name if isinstance(value, Instance) else str(value)
    return None


def journaled(fn: F) -> F:
    """Journal the call (start/end/error/cancelled) and apply faults first."""
    method = fn.__name__
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    async def wrapper(self: FakeCore, *args: Any, **kwargs: Any) -> Any:
        instance = _instance_of(sig, args, kwargs)
        self._event("start", method=method, instance=instance)
        try:
            try:
                self._settings = self._config.read()
            except HypervisorError:
                if method != "verify":  # verify reports a broken config instead of failing
                    raise
            await self.faults.hit(method, node=self.node)
            await self._file_fault(method)
            result = await fn(self, *args, **kwargs)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                self._event("cancelled", method=method, instance=instance)
            raise
        except BaseException as err:
            self._event("error", method=method, instance=instance, error=type(err).__name__, message=str(err))
            raise
        self._event("end", method=method, instance=instance)
        return result

    return wrapper  # type: ignore[return-value]
