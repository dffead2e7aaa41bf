"""structlog set-up: JSON lines when stderr is not a terminal, pretty otherwise.

Every engine log line carries ``job_id``, ``op``, ``step`` and ``node`` when
they apply (bound on the job's and the step's logger). Configuration is
done once, and only if the embedding program has not configured structlog.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_configured = False


def configure_logging(*, json: bool | None = None, level: int | str = logging.INFO, force: bool = False) -> None:
    """Configure structlog for herd (``json=None``: JSON unless stderr is a tty)."""
    global _configured
    if (_configured or structlog.is_configured()) and not force:
        return
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError(f"unknown log level {level!r}")
    if json is None:
        json = not sys.stderr.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # sys.stderr looked up per logger, not captured once (it may be replaced).
        logger_factory=lambda *_args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(**bound: Any) -> Any:
    """The engine's logger with ``bound`` fields on every line."""
    return structlog.get_logger("herd.engine").bind(**bound)
