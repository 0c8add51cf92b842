"""The Date of an answer written from a prepared refusal (`_Connection._send_now`) is told from
the caller's `time.perf_counter()` reading (`http1._date_at`): the second it was written in,
across second boundaries, as `_date_bytes` (which reads the wall clock) would give it."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from proxy.http import http1


def _second(date: bytes) -> int:
    assert date.startswith(b"Date: ") and date.endswith(b" GMT\r\n")
    return int(parsedate_to_datetime(date[6:-2].decode()).timestamp())


def test_each_date_is_the_second_it_was_taken_in_across_second_boundaries() -> None:
    deadline = time.monotonic() + 2.3  # (two second boundaries crossed)
    seconds: set[int] = set()
    n = 0
    while time.monotonic() < deadline and n < 200_000:
        before = int(time.time())
        date = http1._date_at(time.perf_counter())
        after = int(time.time())
        assert before <= _second(date) <= after, (date, before, after)
        seconds.add(_second(date))
        n += 1
        if n % 50 == 0:
            time.sleep(0.0005)
    assert len(seconds) >= 2  # the Date moved on with the clock


def test_a_date_made_by_another_way_in_between_is_not_taken_for_a_later_second() -> None:
    # `_date_bytes` (the `Request` way) and `_date_at` share the formatted Date: whichever makes
    # it, `_date_at` gives the second it is asked in.
    http1._date_at(time.perf_counter())
    time.sleep(1.05 - time.time() % 1)  # into the next second
    http1._date_bytes()
    assert _second(http1._date_at(time.perf_counter())) == int(time.time())


def test_the_date_is_rfc_9110_imf_fixdate_as_the_standard_library_writes_it() -> None:
    """http1 writes the Date itself (importing `email` cost ~0.5 MiB a process): the same
    text as `email.utils.formatdate(usegmt=True)` for every second tried, whatever the locale."""
    import random
    from email.utils import formatdate

    rng = random.Random(9110)
    seconds = [0, 784_111_777, 951_782_400, 2**31 - 1, 2**31, 4_102_444_800, 253_402_300_799]
    seconds += [rng.randrange(0, 253_402_300_800) for _ in range(20_000)]
    for second in seconds:
        assert http1._imf_fixdate(second) == formatdate(second, usegmt=True), second
    assert http1._imf_fixdate(784_111_777) == "Sun, 06 Nov 1994 08:49:37 GMT"  # RFC 9110 §5.6.7's example


def test_the_date_is_written_as_the_email_package_writes_it() -> None:
    from email.utils import formatdate

    # Every weekday and month, a leap day, single-digit days and hours, the epoch.
    instants = [0, 951782400, 1709164800, 1796393576, *(1700000000 + 86400 * 9 * n + 3601 * n for n in range(60))]
    for seconds in instants:
        assert http1._imf_fixdate(seconds) == formatdate(seconds, usegmt=True)
