"""accesslog.py: one JSON line per request, batched per event-loop turn, never fatal."""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import time
from datetime import datetime

from proxy.telemetry.accesslog import AccessLog


async def test_lines_are_written_together_as_json_within_the_interval() -> None:
    stream = io.BytesIO()
    log = AccessLog(stream, interval=0.05)
    log.write(route="api", status=200, subject="alice")
    log.write(route="api", status=401, subject=None)
    await asyncio.sleep(0)
    assert stream.getvalue() == b"", "nothing is written before the interval ends"
    await asyncio.sleep(0.1)
    lines = stream.getvalue().decode().splitlines()
    assert [json.loads(line)["status"] for line in lines] == [200, 401]
    first = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first == {"time": first["time"], "route": "api", "status": 200, "subject": "alice"}


async def test_a_full_batch_is_written_at_once() -> None:
    stream = io.BytesIO()
    log = AccessLog(stream, interval=60)
    for status in range(256):
        log.write(status=status)
    assert len(stream.getvalue().splitlines()) == 256, "256 waiting lines are written without waiting for the timer"
    log.write(status=1)
    log.flush()
    assert len(stream.getvalue().splitlines()) == 257


async def test_a_broken_stream_never_raises() -> None:
    stream = io.BytesIO()
    stream.close()
    log = AccessLog(stream)
    log.write(route="api")
    await asyncio.sleep(0)
    log.flush()


def test_without_a_loop_a_line_is_written_at_once() -> None:
    stream = io.BytesIO()
    AccessLog(stream).write(path='/x\n"y')
    assert json.loads(stream.getvalue())["path"] == '/x\n"y'


async def test_the_request_line_is_the_json_of_its_fields_whatever_they_hold() -> None:
    # `request` builds the line by hand for speed; it must parse to exactly these fields,
    # in this order, with quotes, backslashes, control characters and non-ASCII escaped.
    stream = io.BytesIO()
    log = AccessLog(stream, interval=0.01)
    awkward = 'a"b\\c\nd\te\x00f\u00e9\U0001f600 \u2028'
    cases = [
        {
            "request_id": "0123abcd",
            "client": "127.0.0.1",
            "method": "GET",
            "path": "/x",
            "route": "api",
            "provider": "main",
            "status": 200,
            "decision": "allowed",
            "reason": "",
            "subject": "user-42",
            "latency_ms": 0.123,
        },
        {
            "request_id": "r",
            "client": None,
            "method": "PROPFIND",
            "path": awkward,
            "route": awkward,
            "provider": awkward,
            "status": 401,
            "decision": "denied",
            "reason": "token_missing",
            "subject": None,
            "latency_ms": 12345.678,
        },
        {
            "request_id": "r",
            "client": "::1",
            "method": "POST",
            "path": "/",
            "route": "(none)",
            "provider": None,
            "status": 404,
            "decision": "rejected",
            "reason": "no_route",
            "subject": awkward,
            "latency_ms": 0.0,
        },
    ]
    for fields in cases:
        log.request(**fields)
    await asyncio.sleep(0.05)
    # One line each, split on "\n" only: U+2028 inside a string is not a line end to a log shipper.
    lines = stream.getvalue().decode().split("\n")[:-1]
    assert len(lines) == len(cases)
    for line, fields in zip(lines, cases, strict=True):
        parsed = json.loads(line)
        assert list(parsed) == ["time", *fields], "field order as in the README"
        assert {k: v for k, v in parsed.items() if k != "time"} == fields
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", parsed["time"])


async def test_a_lone_surrogate_costs_no_line_and_stays_valid_json() -> None:
    # A token's `sub` of "\ud800" (JSON escape) is a str with no UTF-8 form; a path byte
    # kept by surrogateescape is another. Strict encoding raised in flush and the whole
    # batch, every other request's line with it, was lost.
    stream = io.BytesIO()
    log = AccessLog(stream, interval=60)
    log.write(status=200, subject="alice")
    log.request(
        request_id="r1",
        client="127.0.0.1",
        method="GET",
        path="/x\udc80",
        route="api",
        status=401,
        decision="denied",
        reason="unsafe_claim",
        subject="a\ud800b",
        latency_ms=1.0,
    )
    log.write(status=200, subject="bob")
    log.flush()
    lines = [json.loads(line) for line in stream.getvalue().decode("utf-8").splitlines()]
    assert [line["status"] for line in lines] == [200, 401, 200]
    assert lines[1]["subject"] == "a\ud800b" and lines[1]["path"] == "/x\udc80"


def test_a_line_from_a_prepared_constant_is_the_line_byte_for_byte() -> None:
    # `constant` + `line_from` (app.py's prepared 401) against `line`, whatever the fields hold:
    # only the time may differ (both lines are made within one millisecond or not).
    awkward = 'a"b\\c\nd\x7f\u0085\u202e\u00e9\U0001f600 \u2028'
    for method, path, route, provider, subject, client in [
        ("GET", "/api/orders", "api", "main", None, "127.0.0.1"),
        ("HEAD", "/" + awkward, awkward, None, awkward, None),
        (awkward, "/x", "r", awkward, "alice", "::1"),
        ("GET", "/x", "r", None, None, "fe80::1%\u00e9th0"),
    ]:
        stream = io.BytesIO()
        log = AccessLog(stream)
        log.line("rid-1", client, method, path, route, provider, 401, "denied", "token_missing", subject, 1.25)
        constant = log.constant(method, path, route, provider, 401, "denied", "token_missing", subject)
        log.line_from("rid-1", client, constant, 1.25, time.perf_counter())
        first, second = (re.sub(rb'"time":"[^"]*"', b'"time":""', line) for line in stream.getvalue().splitlines())
        assert first == second
        assert json.loads(first.decode())["subject"] == subject


def test_a_line_from_a_prepared_middle_is_the_line_byte_for_byte() -> None:
    # `around` + `middle` + `line_middle` (app.py's forwarded answers) against `line`, whatever
    # the fields hold: only the time may differ.
    awkward = 'a"b\\c\nd\x7f\u0085\u202e\u00e9\U0001f600 \u2028'
    for method, path, route, provider, subject, client, decision, reason in [
        ("GET", "/api/orders", "api", "main", "alice", "127.0.0.1", "allowed", ""),
        ("HEAD", "/" + awkward, awkward, None, awkward, None, "would_deny", "expired"),
        (awkward, "/x", "r", awkward, None, "::1", "allowed", ""),
        ("GET", "/x" + awkward, "r", None, "bob", "fe80::1%\u00e9th0", "allowed", ""),
    ]:
        stream = io.BytesIO()
        log = AccessLog(stream)
        log.line("rid-1", client, method, path, route, provider, 200, decision, reason, subject, 1.25)
        before, after = log.around(method, route, provider, 200, decision, reason)
        log.line_middle("rid-1", client, log.middle(before, path, after), subject, 1.25, time.perf_counter())
        first, second = (re.sub(rb'"time":"[^"]*"', b'"time":""', line) for line in stream.getvalue().splitlines())
        assert first == second
        assert json.loads(first.decode())["subject"] == subject


def test_the_latency_is_written_with_three_decimals_as_format_would() -> None:
    # `line` writes the latency from an int of microseconds (no float formatting): the same
    # text as f"{latency_ms:.3f}" (seeded: the same 20,000 values every run).
    numbers = random.Random(14)
    values = [0.0, 0.0005, 0.0015, 0.9994, 999.9995, 12345.6789, 1e-9, 86_400_000.25]
    values += [numbers.choice((10, 1000, 0.01, 100_000)) * numbers.random() for _ in range(20_000)]
    stream = io.BytesIO()
    log = AccessLog(stream)
    before, after = log.around("GET", "r", None, 200, "allowed", "")
    for value in values:
        log.line("rid", None, "GET", "/", "r", None, 200, "allowed", "", None, value)
        log.line_from(
            "rid", None, log.constant("GET", "/", "r", None, 200, "allowed", "", None), value, time.perf_counter()
        )
        log.line_middle("rid", "::1", log.middle(before, "/", after), None, value, time.perf_counter())
    written = [line.rsplit(b'"latency_ms":', 1)[1][:-1].decode() for line in stream.getvalue().splitlines()]
    assert written == [f"{value:.3f}" for value in values for _ in range(3)]


def test_each_line_is_stamped_with_the_millisecond_it_was_written_in() -> None:
    # Lines within one millisecond share a stamp, kept until the wall clock's millisecond is
    # over (told by `perf_counter`): every way of writing a line gets the millisecond between
    # the wall-clock readings around it, across second boundaries and ~0.3 ms apart.
    stream = io.BytesIO()
    log = AccessLog(stream)
    constant = log.constant("GET", "/", "r", None, 401, "denied", "token_missing", None)
    before, after = log.around("GET", "r", None, 200, "allowed", "")
    bounds: list[tuple[int, int]] = []
    deadline = time.monotonic() + 1.2  # (a second boundary is crossed)
    n = 0
    while time.monotonic() < deadline and n < 20_000:
        start = int(time.time() * 1000)
        which = n % 3
        if which == 0:
            log.line("rid", None, "GET", "/", "r", None, 200, "allowed", "", None, 1.0)
        elif which == 1:
            log.line_from("rid", None, constant, 1.0, time.perf_counter())
        else:
            log.line_middle("rid", None, log.middle(before, "/", after), None, 1.0, time.perf_counter())
        bounds.append((start, int(time.time() * 1000)))
        n += 1
        if n % 7 == 0:
            time.sleep(0.0003)
    stamps = [json.loads(line)["time"] for line in stream.getvalue().splitlines()]
    assert len(stamps) == len(bounds) > 100
    for stamp, (start, end) in zip(stamps, bounds, strict=True):
        written = int(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() * 1000 + 0.5)
        assert start <= written <= end, (stamp, start, end)
    assert len(set(stamps)) > 100  # the stamp moves on with the clock
