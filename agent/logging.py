"""structlog set-up, done once at the entry point.

Services log JSON lines (one event per line, UTC timestamps); a terminal gets readable, coloured
lines. Context (unit, run, phase, device) is bound per task with ``structlog.contextvars``.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog


def configure_logging(
    fmt: Literal["json", "console", "auto"] = "auto",
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and the stdlib loggers of the libraries) for this process.

    ``auto`` picks console on a terminal and JSON otherwise. Logs go to stderr so that commands
    printing JSON lines on stdout stay machine-readable.
    """
    out: TextIO = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=getattr(out, "isatty", lambda: False)())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # libraries (asyncua, pymodbus, uvicorn) log through the stdlib: keep them quiet but visible
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=out, format="%(name)s %(levelname)s %(message)s"
    )
    # their own reports of faults we handle (dropped sessions, retries) would read as errors;
    # our drivers log those events once, with context. --log-level debug shows everything.
    for noisy in ("asyncua", "pymodbus"):
        logging.getLogger(noisy).setLevel(numeric if numeric <= logging.DEBUG else logging.CRITICAL)
