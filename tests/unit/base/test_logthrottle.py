"""logthrottle.RepeatFilter on a real logging handler, with the clock in the test's hands."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from proxy.base.logthrottle import RepeatFilter
from proxy.ops import server
from tests.conftest import FakeClock


class Logs:
    """A handler with the filter, writing `levelname name: message` lines to a buffer."""

    def __init__(self, clock: FakeClock, **kwargs: float) -> None:
        self.out = io.StringIO()
        self.handler = logging.StreamHandler(self.out)
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.handler.addFilter(RepeatFilter(clock=clock, **kwargs))  # type: ignore[arg-type]

    def logger(self, name: str) -> logging.Logger:
        log = logging.getLogger(f"test_logthrottle.{name}")
        log.handlers[:] = [self.handler]
        log.propagate = False
        log.setLevel(logging.DEBUG)
        return log

    def lines(self) -> list[str]:
        lines = self.out.getvalue().splitlines()
        self.out.seek(0)
        self.out.truncate()
        return lines


@pytest.fixture
def logs(clock: FakeClock) -> Iterator[Logs]:
    found = Logs(clock)
    yield found
    found.handler.close()


def test_one_line_per_kind_per_second_and_the_next_one_says_how_many_were_left_out(
    logs: Logs, clock: FakeClock
) -> None:
    log = logs.logger("keys")
    for i in range(5000):
        log.warning("request %s refused: %s", f"id-{i}", "no_keys")
    assert logs.lines() == ["WARNING test_logthrottle.keys: request id-0 refused: no_keys"]
    clock.advance(0.999)
    log.warning("request %s refused: %s", "late", "no_keys")
    assert logs.lines() == []
    clock.advance(0.001)
    log.warning("request %s refused: %s", "next", "no_keys")
    assert logs.lines() == ["WARNING test_logthrottle.keys: request next refused: no_keys (5,000 similar suppressed)"]
    clock.advance(5)
    log.warning("request %s refused: %s", "alone", "no_keys")
    assert logs.lines() == ["WARNING test_logthrottle.keys: request alone refused: no_keys"]


def test_a_kind_is_logger_level_and_template(logs: Logs, clock: FakeClock) -> None:
    a, b = logs.logger("a"), logs.logger("b")
    for _ in range(3):
        a.warning("fetch failed: %s", "x")
        a.error("fetch failed: %s", "x")  # another level
        a.warning("upstream %s broke off", "y")  # another template
        b.warning("fetch failed: %s", "x")  # another logger
    assert len(logs.lines()) == 4
    clock.advance(1)
    a.warning("fetch failed: %s", "x")
    assert logs.lines() == ["WARNING test_logthrottle.a: fetch failed: x (2 similar suppressed)"]


def test_messages_formatted_before_logging_are_one_kind_whatever_numbers_they_hold(
    logs: Logs, clock: FakeClock
) -> None:
    log = logs.logger("asyncio")
    for i in range(100):  # what asyncio's exception handler logs: text built per task
        log.error(f"Task exception was never retrieved\nfuture: <Task finished name='Task-{i}' at 0x{7 * i + 4096:x}>")
    log.error("Error handling request from 127.0.0.1:%d" % 40000)  # noqa: UP031 - formatted on purpose
    log.error("Unclosed connection")
    assert len(logs.lines()) == 2 + 1 + 1  # the first task message (two lines), the address, unclosed
    clock.advance(1)
    log.error("Task exception was never retrieved\nfuture: <Task finished name='Task-101' at 0xabc>")
    assert logs.lines() == [
        "ERROR test_logthrottle.asyncio: Task exception was never retrieved",
        "future: <Task finished name='Task-101' at 0xabc> (99 similar suppressed)",
    ]


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.ERROR, logging.CRITICAL])
def test_every_level_is_limited(logs: Logs, clock: FakeClock, level: int) -> None:
    log = logs.logger("levels")
    for _ in range(10):
        log.log(level, "the same %d", 1)
    clock.advance(1)
    log.log(level, "the same %d", 1)
    assert [line.split(": ", 1)[1] for line in logs.lines()] == ["the same 1", "the same 1 (9 similar suppressed)"]


def test_tracebacks_are_limited_too_and_keep_theirs(logs: Logs, clock: FakeClock) -> None:
    log = logs.logger("exc")
    for _ in range(50):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("request %s failed unexpectedly", "r")
    clock.advance(1)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("request %s failed unexpectedly", "r")
    text = "\n".join(logs.lines())
    assert text.count("Traceback") == 2
    assert "request r failed unexpectedly (49 similar suppressed)\nTraceback" in text


def test_a_message_with_percent_signs_and_no_arguments(logs: Logs, clock: FakeClock) -> None:
    log = logs.logger("pct")
    log.warning("100% of %s")  # no args: the text is taken as it is
    log.warning("100% of %s")
    clock.advance(1)
    log.warning("100% of %s")
    log.warning(RuntimeError("not a str message"))
    assert logs.lines() == [
        "WARNING test_logthrottle.pct: 100% of %s",
        "WARNING test_logthrottle.pct: 100% of %s (1 similar suppressed)",
        "WARNING test_logthrottle.pct: not a str message",
    ]


def test_kinds_are_bounded_the_longest_unwritten_forgotten_first(clock: FakeClock) -> None:
    logs = Logs(clock, max_kinds=3)
    log = logs.logger("bounded")
    for name in ("a", "b", "c", "a", "d"):  # d pushes out a (written first), though a repeated since
        log.warning(f"kind {name}")
    assert logs.lines() == [
        "WARNING test_logthrottle.bounded: kind a",
        "WARNING test_logthrottle.bounded: kind b",
        "WARNING test_logthrottle.bounded: kind c",
        "WARNING test_logthrottle.bounded: kind d",
    ]
    log.warning("kind a")  # forgotten, so written again, without its lost count
    log.warning("kind d")  # remembered: held back
    assert logs.lines() == ["WARNING test_logthrottle.bounded: kind a"]
    logs.handler.close()


def test_configure_logging_limits_the_operator_log(monkeypatch: pytest.MonkeyPatch) -> None:
    root, aiohttp_server = logging.getLogger(), logging.getLogger("aiohttp.server")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(aiohttp_server, "filters", list(aiohttp_server.filters))
    server.configure_logging("INFO")
    assert [type(f) for h in root.handlers for f in h.filters] == [RepeatFilter]
    for handler in root.handlers:
        handler.close()
