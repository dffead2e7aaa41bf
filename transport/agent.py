"""``python -m transport.agent`` / ``herd-agent``: serve one node on stdin/stdout.

The agent itself lives in :mod:`transport._agent` (imported by the package,
e.g. for :class:`~transport.LocalTransport`); this module is its entry point.
"""

from __future__ import annotations

import sys

from ._agent import Agent, FdReader, FdWriter, build_driver, main, parse_hv_options, run_stdio

__all__ = ["Agent", "FdReader", "FdWriter", "build_driver", "main", "parse_hv_options", "run_stdio"]

if __name__ == "__main__":
    sys.exit(main())
