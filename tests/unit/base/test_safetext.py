"""safetext and the log formats that use it: nothing from outside ends a line, drives a terminal
or grows a line without bound; and the throttle cannot be used to hide an operator's event.

In-process through the handler `server.configure_logging` installs (the `configured`
fixture of test_oplog.py), and the escaping helper against this Python's Unicode database.
"""

from __future__ import annotations

import json
import logging
import sys
import unicodedata

import pytest

from proxy.base import oplog, safetext
from proxy.base.logthrottle import RepeatFilter
from proxy.telemetry.accesslog import AccessLog
from tests.conftest import FakeClock
from tests.unit.base.test_oplog import configured  # noqa: F401 - a fixture

UNSAFE_CATEGORIES = ("Cc", "Cf", "Zl", "Zp", "Cs")
EVIL = (
    "kid\n2026-01-01 00:00:00,000 ERROR jwt_sidecar: forged\r\x1b[2J\x9b31m\x85\u202egnp\u2028\u2029"
    '\x00\x7f\u200b\U000e0041","level":"FORGED"'
)


def raw_unsafe(text: str) -> list[str]:
    return [f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in UNSAFE_CATEGORIES]


def test_every_control_format_and_separator_character_is_escaped() -> None:
    # Checked against the Unicode database, not against the helper's own list.
    unsafe = "".join(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in UNSAFE_CATEGORIES)
    assert raw_unsafe(safetext.one_line(unsafe, limit=len(unsafe))) == []
    encoded = safetext.json_line(json.dumps(unsafe, ensure_ascii=False))
    assert raw_unsafe(encoded) == []
    # The same text, escaped (lone surrogates aside: JSON reads two escapes in a row as a pair).
    characters = "".join(c for c in unsafe if unicodedata.category(c) != "Cs")
    assert json.loads(safetext.json_line(json.dumps(characters, ensure_ascii=False))) == characters


def test_one_line_names_what_it_escaped_and_keeps_the_rest() -> None:
    assert safetext.one_line("a\nb\x1b[0m\u202ec é ✓") == "a\\nb\\x1b[0m\\u202ec é ✓"
    assert safetext.one_line("plain text") == "plain text"


def test_long_values_are_cut_and_say_how_much() -> None:
    assert safetext.bounded("k" * 65536) == "k" * 512 + "...(65,024 more characters)"
    kids = safetext.bounded([f"kid-{i}" for i in range(10_000)])
    assert len(kids) == 65 and kids[-1] == "...(9,936 more)"
    assert safetext.bounded({"n": 1, "ok": True, "none": None, "x": 1.5}) == {
        "n": 1,
        "ok": True,
        "none": None,
        "x": 1.5,
    }


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_field_from_outside_stays_on_its_line_and_is_bounded(configured, log_format: str) -> None:  # noqa: F811
    logs = configured(log_format)
    oplog.event(
        logging.getLogger("jwt_sidecar.keys"),
        logging.INFO,
        "keys_loaded",
        "provider %(provider)s: kids added %(kids_added)s from %(source)s",
        provider="main",
        kids_added=[EVIL, "K" * 65536, *(f"k{i}" for i in range(500))],
        source=EVIL,
        keys=502,
    )
    [line] = logs.lines()
    assert raw_unsafe(line) == [] and len(line) < 40_000
    if log_format == "json":
        record = json.loads(line)
        assert record["level"] == "INFO" and record["source"] == EVIL and record["keys"] == 502
        assert record["kids_added"][0] == EVIL and record["kids_added"][-1] == "...(438 more)"
    else:
        assert "forged" in line and "FORGED" in line  # there, escaped, on the one line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_traceback_with_text_from_outside_forges_no_line(configured, log_format: str) -> None:  # noqa: F811
    logs = configured(log_format)
    try:
        raise ValueError(EVIL)
    except ValueError:
        oplog.event(
            logging.getLogger("jwt_sidecar"),
            logging.ERROR,
            "request_crashed",
            "request %(request_id)s failed unexpectedly",
            request_id="r1",
            exc_info=True,
        )
    lines = logs.lines()
    assert all(raw_unsafe(line) == [] for line in lines), lines
    if log_format == "json":
        [line] = lines
        assert json.loads(line)["traceback"].endswith("ValueError: " + EVIL)
    else:
        # The record's line, then the traceback's, each marked as one: none passes for a record.
        assert lines[0].endswith("request r1 failed unexpectedly")
        assert len(lines) > 2 and all(line.startswith("  | ") for line in lines[1:]), lines


def test_a_library_message_is_one_bounded_line(configured) -> None:  # noqa: F811
    logs = configured("text")
    logging.getLogger("asyncio").error("peer said: " + EVIL + "x" * 100_000)
    [line] = logs.lines()
    assert raw_unsafe(line) == [] and len(line) < safetext.LINE_LIMIT + 500


def test_the_access_log_escapes_what_the_json_encoder_leaves_raw() -> None:
    written: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            written.append(data)

        def flush(self) -> None:
            pass

    log = AccessLog(Sink())  # type: ignore[arg-type]
    log.request(
        request_id="r1",
        client="127.0.0.1",
        method="GET",
        path="/a\u202e\x85\u2028",
        route=EVIL,
        status=200,
        decision="allowed",
        reason="",
        subject="\u202euser\x9b",
        latency_ms=1.0,
        provider="main",
    )
    log.request(
        request_id="r2",
        client=None,
        method="GET",
        path="/ascii\x7f",
        route="api",
        status=404,
        decision="rejected",
        reason="no_route",
        subject=None,
        latency_ms=1.0,
    )
    log.write(event="x", detail=EVIL)
    lines = b"".join(written).decode().splitlines()
    assert len(lines) == 3 and all(raw_unsafe(line) == [] for line in lines)
    record = json.loads(lines[0])
    assert (record["path"], record["route"], record["subject"]) == ("/a\u202e\x85\u2028", EVIL, "\u202euser\x9b")
    assert json.loads(lines[1])["path"] == "/ascii\x7f"
    assert json.loads(lines[2])["detail"] == EVIL


def test_a_flood_of_refusals_hides_no_key_or_provider_event(configured, clock: FakeClock) -> None:  # noqa: F811
    # An attacker's bad tokens (DEBUG) and an upstream outage (WARNING) for provider main, a
    # thousand a second: the key events for the same provider, at the same moment, are written.
    logs = configured("json")
    [handler] = logging.getLogger().handlers
    handler.filters[:] = [RepeatFilter(clock=clock)]
    app, keys = logging.getLogger("jwt_sidecar"), logging.getLogger("proxy.keys")
    for i in range(1000):
        for level in (logging.DEBUG, logging.WARNING):
            oplog.event(
                app,
                level,
                "request_refused",
                "request %(request_id)s refused: %(reason)s: %(detail)s",
                request_id=f"r{i}",
                reason="unknown_kid",
                detail=f"no key with kid 'k{i}'",
                status=401,
                route="api",
                provider="main",
            )
    oplog.event(
        keys,
        logging.WARNING,
        "key_fetch_failed",
        "provider %(provider)s: key fetch failed: %(what)s",
        provider="main",
        what="JWKS: HTTP 500",
        peer="127.0.0.1:1",
    )
    oplog.event(
        keys,
        logging.WARNING,
        "provider_unready",
        "provider %(provider)s is not ready",
        provider="main",
        peer="127.0.0.1:1",
    )
    oplog.event(
        keys,
        logging.WARNING,
        "key_fetch_failed",
        "provider %(provider)s: key fetch failed: %(what)s",
        provider="other",
        what="JWKS: HTTP 500",
        peer="127.0.0.1:1",
    )
    events = [(line["event"], line.get("provider"), line["level"]) for line in logs.json()]
    assert events == [
        ("request_refused", "main", "DEBUG"),
        ("request_refused", "main", "WARNING"),
        ("key_fetch_failed", "main", "WARNING"),
        ("provider_unready", "main", "WARNING"),
        ("key_fetch_failed", "other", "WARNING"),
    ]
    clock.advance(1.5)
    oplog.event(
        app,
        logging.DEBUG,
        "request_refused",
        "request %(request_id)s refused: %(reason)s: %(detail)s",
        request_id="r",
        reason="expired",
        detail="expired",
        status=401,
        route="api",
        provider="main",
    )
    [line] = logs.json()
    assert line["suppressed"] == 999  # the flood is counted, on its own kind's next line


def test_the_readme_states_the_bounds_the_code_applies() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[3] / "README.md").read_text()
    section = readme[readme.index("### Operator log") :]
    found = re.search(
        r"at most (\d+) characters of a string and (\d+) items of a list.*?message at\s+most (\d+) "
        r"characters",
        section,
        re.DOTALL,
    )
    assert found, "README's Operator log section no longer states the bounds"
    assert tuple(map(int, found.groups())) == (safetext.FIELD_LIMIT, safetext.ITEMS_LIMIT, safetext.LINE_LIMIT)


def test_a_traceback_holding_a_huge_message_keeps_its_end_within_bounds(configured) -> None:  # noqa: F811
    logs = configured("json")
    try:
        raise ValueError("k" * 1_000_000 + " the end")
    except ValueError:
        oplog.event(
            logging.getLogger("jwt_sidecar"),
            logging.ERROR,
            "request_crashed",
            "request %(request_id)s failed unexpectedly",
            request_id="r1",
            exc_info=True,
        )
    [line] = logs.lines()
    traceback = json.loads(line)["traceback"]
    assert len(line) < 5 * safetext.LINE_LIMIT and traceback.endswith("k the end")
    assert traceback.startswith("...(") and "characters before)" in traceback


def test_the_supervisors_worker_events_name_the_worker_as_worker(configured) -> None:  # noqa: F811
    # Which worker died or restarted is `worker`, in a process without an index of its own...
    logs = configured("json")
    oplog.event(
        logging.getLogger("jwt_sidecar.workers"),
        logging.INFO,
        "worker_restarted",
        "worker %(worker)d started again (pid %(pid)d)",
        worker=1,
        pid=4242,
    )
    [line] = logs.json()
    assert line["worker"] == 1 and "field_worker" not in line
    # ... and in worker 0, which supervises the set (rewritten for the set without a
    # supervisor process of its own: ops/workers.py).
    record = logging.LogRecord("jwt_sidecar.workers", logging.ERROR, __file__, 1, "x", None, None)
    record.event, record.fields = "worker_died", {"worker": 1, "pid": 4242}
    line = json.loads(oplog.JsonFormatter(worker=0).format(record))
    assert line["worker"] == 1 and "field_worker" not in line
    # In a worker, `worker` is the process's own index; a field of that name stays apart.
    record = logging.LogRecord("jwt_sidecar", logging.INFO, __file__, 1, "x", None, None)
    record.fields = {"worker": 5}
    assert json.loads(oplog.JsonFormatter(worker=0).format(record))["field_worker"] == 5
