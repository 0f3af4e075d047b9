"""structlog configuration shared by the daemon and the training child.

JSON lines (one event per line, ISO timestamps) to a stream or file; the level comes from
``logging.level``. Logging never blocks training: events go to a buffered stream.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", stream: TextIO | None = None, *, json_lines: bool = True
              ) -> None:
    renderer = structlog.processors.JSONRenderer() if json_lines else \
        structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False)
