"""Process logs through structlog: JSON lines when stderr goes to a file or a log collector, readable
colourless-or-coloured lines when a person watches a terminal. Stdlib `logging` records (ours, Celery's,
MLflow's) go through the same processors, so every line on stderr has one shape, and whatever is bound
with `structlog.contextvars` (a running job's `job_id` and `attempt`) lands on every line.

A job's own log (the job_log table) is a separate handler with its own plain-text formatter.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import IO

import structlog

# Run on structlog's events and on stdlib records alike.
SHARED_PROCESSORS: list = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def structured_formatter(stream: IO | None = None, *, as_json: bool | None = None) -> logging.Formatter:
    """A formatter for a handler writing to `stream`: JSON unless the stream is a terminal."""
    if as_json is None:
        as_json = not _is_terminal(stream if stream is not None else sys.stderr)
    if as_json:
        renderer = [structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(serializer=functools.partial(json.dumps, ensure_ascii=False,
                                                                                   default=str))]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=_is_terminal(stream if stream is not None else sys.stderr))]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED_PROCESSORS,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )


def configure_structlog() -> None:
    """Send structlog's own loggers through stdlib logging, so both meet the same handlers."""
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *SHARED_PROCESSORS,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def structure_handlers(logger: logging.Logger) -> None:
    """Give every stream handler of `logger` the structured formatter (Celery made them; we format them)."""
    configure_structlog()
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setFormatter(structured_formatter(handler.stream))


def configure_logging(level: int | str = logging.INFO, stream: IO | None = None) -> None:
    """For a process without Celery's logging (the reconciler, the web): one structured handler on root."""
    configure_structlog()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(structured_formatter(handler.stream))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)


def _is_terminal(stream: IO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
