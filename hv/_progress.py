"""Progress reports from inside a driver call.

A driver calls :func:`report_progress` during a long call; whoever runs the
call (the node agent, a test) decides where reports go by setting a sink for
the current context. With no sink, reports are dropped: drivers never depend
on anyone listening.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

ProgressSink = Callable[[dict[str, Any]], None]

_sink: ContextVar[ProgressSink | None] = ContextVar("herd_progress_sink", default=None)


def report_progress(**fields: Any) -> None:
    """Send one progress report (JSON-able fields) to the current sink."""
    sink = _sink.get()
    if sink is not None:
        sink(fields)


@contextlib.contextmanager
def progress_sink(sink: ProgressSink | None) -> Iterator[None]:
    """Route :func:`report_progress` calls made in this context to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
