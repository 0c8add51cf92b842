"""The operator log's shape: its events, their levels, and its two formats (text and JSON lines).

Owns: `EVENTS`, the closed set of things the operator log reports (a short snake_case name
each, the levels it is logged at, and what it means; README's "Operator log" table is
checked against it); `event()`, how the package logs one of them with its fields (bounded; the record itself is
http/log.py's, so the HTTP layer can log one without importing this module); the
formatters (`text`: `time LEVEL logger: message`, as before; `json`: one object per line
with `time` (RFC 3339, UTC), `level`, `logger`, `event`, `message` and the event's fields
as members of their own, plus `suppressed` when logthrottle.py held lines back and
`traceback` when there is one); `auto` (json when stderr is not a terminal); and
`configure`, which server.configure_logging calls to put one handler on the root logger (on the
process's own stderr, a handler that hands each line to base/outlet.py's stderr `Outlet`: once
serving, a stderr nobody reads holds lines up to a bound and then drops them, counted, and
never blocks the event loop or the thread that logs).
Does not own: throttling (logthrottle.py's `RepeatFilter`, on the same handler), what is
logged where (each module calls `event`), or the access log (accesslog.py, stdout).

A record from a library (aiohttp, asyncio) has no event of ours: it is `library_message`.
Fields are chosen by our code and never hold a token, a secret or a request's content; their
values may still hold what a peer chose (a kid, a JWKS server's kids, a route name), so every
field is bounded (`event`) and both formats escape what would end a line or drive a terminal
(safetext.py), for the package's records and libraries' alike; Python's handler of last
resort (a command that logs without `configure`) writes one escaped line too.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

from ..http.log import event as record_event
from .logthrottle import RepeatFilter, suppressed_suffix
from .outlet import Outlet
from .outlet import stderr as stderr_outlet
from .safetext import LINE_LIMIT, bounded, cut, json_line, one_line

__all__ = ["EVENTS", "FORMATS", "LEVELS", "JsonFormatter", "TextFormatter", "configure", "event", "resolve_format"]

FORMATS = ("text", "json", "auto")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LIBRARY = "library_message"

_D, _I, _W, _E = "DEBUG", "INFO", "WARNING", "ERROR"

EVENTS: Mapping[str, tuple[frozenset[str], str]] = {
    # start and stop
    "fd_limit": (frozenset({_I}), "the open-file limit and the client connections it allows"),
    "fd_limit_low": (frozenset({_W}), "the open-file limit could not be raised, or max_connections leaves too few"),
    "listening": (frozenset({_I}), "the proxy and admin listeners are open"),
    "draining": (frozenset({_I}), "SIGTERM or SIGINT: readiness is false, in-flight requests are finishing"),
    "stopped": (frozenset({_I}), "the drain is over; the process exits"),
    "start_abandoned": (frozenset({_I}), "SIGTERM or SIGINT while the first keys loaded: nothing was served"),
    "startup_failed": (
        frozenset({_E}),
        "a start the operator must fix (a port in use, a file that cannot be "
        "read): the one line, in JSON when the log is JSON; exit status 1",
    ),
    "accept_failed": (frozenset({_W}), "the listener cannot accept connections (out of descriptors)"),
    # keys
    "keys_loaded": (
        frozenset({_D, _I}),
        "a provider's key set loaded: INFO the first time and when its kids change, DEBUG when a "
        "refresh brings the same kids",
    ),
    "keys_skipped": (frozenset({_D, _I}), "keys in a set that cannot verify (INFO when it changes, else DEBUG)"),
    "key_fetch_failed": (frozenset({_W}), "a JWKS or discovery fetch failed: peer, cause, and which keys serve"),
    "key_refresh_crashed": (frozenset({_E}), "a key refresh raised something unexpected (with a traceback)"),
    "key_source_fallback": (
        frozenset({_W}),
        "after a reload, a provider's new key source has no keys yet: the old keys serve",
    ),
    "key_source_replaced": (frozenset({_I}), "the new key source has keys; the old one is closed"),
    "no_usable_key": (frozenset({_E}), "a static key file or secret holds no key usable with the algorithms"),
    "provider_ready": (frozenset({_I}), "a provider holds usable keys for the first time"),
    "provider_unready": (frozenset({_W}), "a provider holds no usable key: its routes answer 503"),
    # config
    "config_warning": (frozenset({_W}), "a route-table warning of a config that loaded anyway"),
    "reload_applied": (frozenset({_I}), "a reload took effect: routes, providers and settings added, removed, changed"),
    "reload_refused": (
        frozenset({_E}),
        "a reload was refused (the config's problems, with their lines); the previous config keeps serving",
    ),
    "reload_crashed": (frozenset({_E}), "a reload raised something unexpected; the previous config keeps serving"),
    "config_missing": (frozenset({_W}), "the config file disappeared; the last good config keeps serving"),
    "config_back": (frozenset({_I}), "the config file is there again (it is reloaded)"),
    # requests
    "request_refused": (
        frozenset({_D, _W}),
        "a refused request: DEBUG for the client's mistakes and key outages (the access log "
        "has them), WARNING for upstream failures",
    ),
    "request_crashed": (frozenset({_E}), "a request failed on a bug of ours: 500, with a traceback"),
    "upstream_broke_off": (frozenset({_W}), "the upstream's answer stopped midway; the client's connection is cut"),
    "upstream_distrusted": (
        frozenset({_W}),
        "the upstream sent bytes no request asked for; its connections are not reused for a while",
    ),
    "websocket_closed": (frozenset({_D}), "a WebSocket tunnel closed, and why"),
    "handler_crashed": (frozenset({_E}), "the HTTP connection handler hit a bug of ours (with a traceback)"),
    # the logs themselves
    "log_lines_dropped": (
        frozenset({_W}),
        "stdout is not being read (a stalled log collector or pager): access-log lines beyond "
        "the 4 MiB held were dropped (log_lines_dropped_total)",
    ),
    # metrics and workers
    "metrics_failed": (frozenset({_D, _W, _E}), "collecting or publishing metrics failed"),
    "workers_started": (frozenset({_I}), "worker 0 of `workers: N` serves, with the workers it forked"),
    "worker_restarted": (frozenset({_I}), "a worker that died was started again"),
    "worker_died": (frozenset({_E}), "a worker exited unexpectedly (restarted, or the set stops)"),
    "worker_failed": (frozenset({_E}), "a forked worker failed on a bug of ours (with a traceback) and exits 1"),
    "worker_orphaned": (frozenset({_E}), "worker 0 has gone: this worker drains and exits"),
    "readiness_unknown": (frozenset({_W}), "worker 0 could not read the workers' readiness"),
    # revocation
    "revocation_loaded": (
        frozenset({_D, _I}),
        "the revocation list was (re)loaded: rules in force (DEBUG for a periodic re-sync that changed nothing)",
    ),
    "revocation_refused": (
        frozenset({_E}),
        "the revocation file has mistakes (with their lines); the last good list keeps serving",
    ),
    "revocation_file_missing": (frozenset({_W}), "the revocation file does not exist: no rules in force until it does"),
    "revocation_store_unreachable": (
        frozenset({_W}),
        "Redis cannot be reached or the connection broke; the last list keeps serving, reconnecting",
    ),
    "revocation_store_connected": (
        frozenset({_I}),
        "connected (again) to Redis: the whole list loaded, changes followed",
    ),
    "revocation_stale": (
        frozenset({_W, _E}),
        "the revocation list is older than max_staleness: WARNING with fail: open (it keeps serving), "
        "ERROR with fail: closed (not ready)",
    ),
    "revocation_fresh": (frozenset({_I}), "the revocation list is current again"),
    "revocation_rule_skipped": (frozenset({_W}), "an entry in Redis that is not a rule was skipped"),
    "revocation_follow_crashed": (
        frozenset({_E}),
        "following Redis raised something unexpected (with a traceback); it reconnects",
    ),
    # report mode
    "request_would_deny": (
        frozenset({_I}),
        "a route in report mode let through a request enforce mode would refuse (its reason and "
        "detail), without identity headers",
    ),
}

_RESERVED = frozenset({"time", "level", "logger", "event", "message", "worker", "suppressed", "traceback"})


def event(
    logger: logging.Logger, level: int, name: str, message: str, /, *, exc_info: Any = None, **fields: Any
) -> None:
    """Log the event `name` at `level`; `message` is a %-template over `fields` (`%(provider)s`).

    In text, the line is the message; in JSON, the message and each field as a member.
    The record is http/log.py's (the HTTP layer logs through that one directly).
    """
    if not logger.isEnabledFor(level):
        return
    # A field may hold what a peer chose (a token's kid, a JWKS server's kids, a path): a
    # 64 KiB kid is not written whole. Escaping is the formatters' (they see every record).
    record_event(
        logger, level, name, message, exc_info=exc_info, **{key: bounded(value) for key, value in fields.items()}
    )


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, as the operator log has always been, on one line.

    The message (ours with its fields filled in, or a library's) has its control, bidi and
    line-breaking characters escaped (safetext.one_line): no field can start a forged line
    or drive the terminal. A traceback follows on lines of its own, each escaped and
    indented with `  | `, so none of them can pass for a record.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return one_line(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return "\n".join("  | " + one_line(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return "\n".join("  | " + one_line(line) for line in stack_info.splitlines())


_ABOUT_A_WORKER = frozenset({"worker_died", "worker_restarted", "worker_failed"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a string member, not more lines).

    `worker`: the index of this process among `workers: N` (a member of every line, after
    `message`), None in a single process. A line about one worker of the set (`_ABOUT_A_WORKER`,
    written by worker 0, which supervises the set) has that worker's index there instead.
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            message = message.removesuffix(suppressed_suffix(suppressed))
        message = cut(message, LINE_LIMIT)  # a library's message has no bound of its own
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", LIBRARY),
            "message": message,
        }
        if self._worker is not None:
            line["worker"] = self._worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            # A line about one worker (which died or restarted): its `worker` field is that
            # member, not `field_worker`; elsewhere `worker` is the process's own index.
            about = self._worker is None or getattr(record, "event", None) in _ABOUT_A_WORKER
            reserved = _RESERVED - {"worker"} if about else _RESERVED
            for key, value in fields.items():
                line[key if key not in reserved else f"field_{key}"] = value
        if suppressed:
            line["suppressed"] = suppressed
        if record.exc_info and record.exc_info[1] is not None:
            # Its end says what failed; an exception's message can hold a peer's long text.
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            line["traceback"] = (
                text
                if len(text) <= 4 * LINE_LIMIT
                else (f"...({len(text) - 4 * LINE_LIMIT:,} characters before)" + text[-4 * LINE_LIMIT :])
            )
        elif record.exc_text:
            line["traceback"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        # ensure_ascii=False keeps names readable; json_line then escapes what the encoder
        # leaves raw (C1 controls, DEL, bidi and zero-width characters, U+2028).
        return json_line(json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":")))


class _LastResort(logging.Formatter):
    """A record logged before (or without) `configure`, as Python writes it (the message
    alone), on one escaped line: `token explain` and `check-config` log key fetch failures
    this way, and a JWKS or discovery server chooses part of their text."""

    def format(self, record: logging.LogRecord) -> str:
        text = one_line(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            text += "".join("\n  | " + one_line(line) for line in self.formatException(record.exc_info).splitlines())
        return text


# Python's handler of last resort writes to stderr when no handler is configured.
if logging.lastResort is not None:
    logging.lastResort.setFormatter(_LastResort())


def _own_stderr(stream: TextIO) -> bool:
    """Whether `stream` is this process's own stderr, file descriptor 2 (not a test's capture)."""
    if stream is not sys.__stderr__:
        return False
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def writes_json() -> bool:
    """Whether the operator log is set up (`configure`) to write JSON lines."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def resolve_format(name: str, stream: TextIO | None = None) -> str:
    """`text` or `json`: `auto` is json unless `stream` (default stderr) is a terminal."""
    if name != "auto":
        return name
    stream = stream or sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


class OutletHandler(logging.StreamHandler[TextIO]):
    """A record as one line handed to an `Outlet` (the process's stderr), never waited for.
    A StreamHandler still (its `stream` is stderr, for what asks which stream the log is on)."""

    def __init__(self, outlet: Outlet, stream: TextIO) -> None:
        super().__init__(stream)
        self.outlet = outlet

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            self.outlet.send(line.encode("utf-8", "backslashreplace"), 1)
        except Exception:  # noqa: BLE001 - logging's own way: a failing record is reported, not raised
            self.handleError(record)

    def flush(self) -> None:
        """Nothing is buffered here: the outlet writes (or holds) every line it is handed."""


def configure(
    level: str = "INFO", log_format: str = "text", stream: TextIO | None = None, *, worker: int | None = None
) -> logging.Handler:
    """One handler on the root logger writing to `stream` (stderr), throttled, in `log_format`;
    `worker`: this process's index among `workers: N` (JSON lines say it). On the process's own
    stderr the lines go through its `Outlet` (never waited for once serving)."""
    stream = stream or sys.stderr
    handler: logging.StreamHandler[TextIO] = (
        OutletHandler(stderr_outlet(), stream) if _own_stderr(stream) else logging.StreamHandler(stream)
    )
    handler.addFilter(RepeatFilter())
    handler.setFormatter(JsonFormatter(worker) if resolve_format(log_format, stream) == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=False)
    # A library's DeprecationWarning and the like go through the same handler (as
    # `py.warnings` lines), not straight to stderr where they would break the JSON lines.
    logging.captureWarnings(True)
    return handler
