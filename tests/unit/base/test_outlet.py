"""base/outlet.py on real pipes: a reader that stops reading costs held bytes up to a bound,
then dropped lines (counted, told once per batch), never a blocked sender; what is held is
written in order when the reader reads again; lines reach a pipe whole."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from proxy.base import oplog
from proxy.base import outlet as outlet_module
from proxy.base.outlet import Outlet
from proxy.telemetry.accesslog import AccessLog
from proxy.telemetry.metrics import Metrics

F_SETPIPE_SZ = 1031


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    """Every outlet made here ends its thread (after the test closed its pipes): a thread left
    running would make the fork guard's tests (tests/unit/ops) refuse for the wrong reason."""
    before, threads = set(outlet_module._OUTLETS), threading.active_count()
    yield
    for made in set(outlet_module._OUTLETS) - before:
        made.close()
    assert threading.active_count() == threads


@contextlib.contextmanager
def pipe(size: int = 4096) -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    fcntl.fcntl(write, F_SETPIPE_SZ, size)
    try:
        yield read, write
    finally:
        for fd in (read, write):
            with contextlib.suppress(OSError):
                os.close(fd)


def read_all(fd: int, until: int, timeout: float = 10.0) -> bytes:
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < until and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            data += os.read(fd, 65536)
    return bytes(data)


def test_a_reader_that_does_not_read_costs_held_bytes_then_dropped_lines_never_a_wait() -> None:
    with pipe() as (read, write):
        outlet = Outlet(write, limit=64 * 1024)
        told: list[int] = []
        outlet.on_drop = told.append
        outlet.detach()
        line = b"x" * 99 + b"\n"  # 100 bytes
        started = time.monotonic()
        results = [outlet.send(line * 10, 10) for _ in range(200)]  # 200 KB into a 4 KiB pipe
        assert time.monotonic() - started < 1.0, "send never waits for the reader"
        time.sleep(0.2)
        kept = results.count(True)
        # The pipe took 4 KiB and the thread holds one batch in its write: ~68 KiB in all.
        assert 64 <= kept <= 72 and not all(results)
        assert outlet.dropped == 10 * results.count(False) == sum(told)
        assert outlet.lost() == outlet.dropped
        # Read again: everything kept arrives, whole and in order, and the bound frees up.
        data = read_all(read, kept * 1000)
        assert data == line * 10 * kept
        assert outlet.drain(5) == 0 and outlet.held == 0
        assert outlet.send(line, 1)


def test_drain_waits_a_bounded_time_for_a_reader_that_never_comes() -> None:
    with pipe() as (_read, write):
        outlet = Outlet(write)
        outlet.detach()
        for _ in range(10):
            outlet.send(b"y" * 1023 + b"\n", 1)
        started = time.monotonic()
        assert outlet.drain(0.3) > 0
        assert 0.25 < time.monotonic() - started < 2


def test_before_detach_a_send_is_written_at_once_with_no_thread() -> None:
    # Worker 0 forks only with one thread: until the process serves, nothing starts one.
    with pipe(65536) as (read, write):
        outlet = Outlet(write)
        before = threading.active_count()
        assert outlet.send(b"line\n", 1)
        assert threading.active_count() == before
        assert os.read(read, 100) == b"line\n"


def test_a_forked_child_starts_its_outlets_afresh_and_detaches_them_itself() -> None:
    # The operator log's handler holds one Outlet object: after worker 0 forks, the worker's
    # copy must be its own (not detached, nothing held, no parent's thread) until it serves.
    with pipe(65536) as (read, write):
        outlet = Outlet(write)
        outlet.detach()
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only if it starts afresh and then works
            ok = not outlet._detached and outlet.held == 0 and outlet.dropped == 0
            outlet.detach()
            ok = ok and outlet.send(b"child\n", 1) and outlet.drain(5) == 0
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.read(read, 100) == b"child\n"


def test_pieces_to_a_pipe_end_lines_so_other_writers_never_land_inside_one() -> None:
    # Two outlets (two workers) on one full pipe: every line read is one of theirs, whole.
    with pipe() as (read, write):
        outlets = [Outlet(write), Outlet(write)]
        sent = 0
        for batch in range(20):
            for index, outlet in enumerate(outlets):
                outlet.detach()
                lines = [json.dumps({"w": index, "b": batch, "n": n, "pad": "p" * 90}) for n in range(50)]
                data = ("\n".join(lines) + "\n").encode()
                sent += len(data)
                outlet.send(data, 50)
        data = read_all(read, sent)
        parsed = [json.loads(line) for line in data.decode().splitlines()]
        assert len(parsed) == 2000
        for index in (0, 1):
            mine = [(p["b"], p["n"]) for p in parsed if p["w"] == index]
            assert mine == sorted(mine) and len(mine) == 1000


def test_a_broken_pipe_loses_its_lines_counted_and_raises_nothing() -> None:
    read, write = os.pipe()
    os.close(read)
    try:
        outlet = Outlet(write)
        outlet.detach()
        assert outlet.send(b"a\nb\n", 2)
        assert outlet.drain(5) == 0
        assert outlet.lost() == 2 and outlet.dropped == 0
    finally:
        os.close(write)


def test_the_access_log_says_once_a_second_that_it_drops_and_the_metric_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pipe() as (_read, write):
        outlet = Outlet(write, limit=8192)
        outlet.detach()
        log = AccessLog(outlet)
        with caplog.at_level(logging.WARNING, logger="jwt_sidecar.accesslog"):
            for n in range(2000):
                log.write(n=n, pad="p" * 100)
                if n % 100 == 99:
                    log.flush()
        assert outlet.dropped > 1000
        events = [r for r in caplog.records if getattr(r, "event", None) == "log_lines_dropped"]
        assert events and all(r.levelno == logging.WARNING for r in events)
        assert "stdout is not being read" in events[0].getMessage()
        assert "log_lines_dropped" in oplog.EVENTS


def test_the_dropped_lines_are_a_counter_by_log_from_the_start() -> None:
    text = Metrics().render()[0].decode()
    assert 'jwt_sidecar_log_lines_dropped_total{log="access"}' in text
    assert 'jwt_sidecar_log_lines_dropped_total{log="operator"}' in text


def test_a_stream_that_is_not_an_outlet_is_written_as_before() -> None:
    stream = io.BytesIO()
    log = AccessLog(stream)
    log.write(a=1)
    log.flush()
    assert json.loads(stream.getvalue())["a"] == 1
