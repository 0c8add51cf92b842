"""How the wire library marks a log record as an operator-log event, without importing the log.

Owns: `event(logger, level, name, message, **fields)`: one record carrying `event` (the
name), `fields` and `subject` (the first of provider, worker or peer among the fields) as
attributes, which base/oplog.py's formatters and base/logthrottle.py's `RepeatFilter` read.
base/oplog.py's `event` is this one after bounding each field, and every other module logs
through that. Does not own: the events' names and levels (base/oplog.py's `EVENTS`), the
formats, or bounding and escaping what a peer chose (oplog.py and its formatters).

It lives here so the HTTP layer imports nothing else of the package; the fields the HTTP
layer passes are its own (a configured upstream's host:port, a literal, a number).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["event"]

_SUBJECTS = ("provider", "worker", "peer")


def event(
    logger: logging.Logger, level: int, name: str, message: str, /, *, exc_info: Any = None, **fields: Any
) -> None:
    """Log the event `name` at `level`; `message` is a %-template over `fields` (`%(provider)s`).

    In text, the line is the message; in JSON, the message and each field as a member.
    """
    if not logger.isEnabledFor(level):
        return
    # The subject makes each provider's (worker's, peer's) lines a kind of their own for
    # the RepeatFilter: one provider failing every second must not hide another's failures.
    subject = next((str(fields[key]) for key in _SUBJECTS if fields.get(key) is not None), None)
    extra = {"event": name, "fields": fields, "subject": subject}
    if fields:
        logger.log(level, message, fields, extra=extra, exc_info=exc_info)
    else:
        logger.log(level, message, extra=extra, exc_info=exc_info)
