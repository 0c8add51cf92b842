"""ops/workers.py forks the workers of `workers: N` only from a process that has one thread and
no signal wakeup descriptor (no event loop has run): a fork copies a held lock or a loop's
descriptors into every worker, so a start that got the order wrong must stop, not fork."""

from __future__ import annotations

import signal
import socket
import threading

import pytest

from proxy.ops import workers


def test_no_fork_while_another_thread_runs() -> None:
    done = threading.Event()
    thread = threading.Thread(target=done.wait)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="before any thread"):
            workers._before_fork()
    finally:
        done.set()
        thread.join()


@pytest.mark.skipif(threading.active_count() != 1, reason="the test process runs other threads")
def test_no_fork_once_a_signal_wakeup_descriptor_is_set() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    previous = signal.set_wakeup_fd(ours.fileno())
    try:
        with pytest.raises(RuntimeError, match="before any signal wakeup descriptor"):
            workers._before_fork()
        assert signal.set_wakeup_fd(-1) == ours.fileno(), "left as it was"
    finally:
        signal.set_wakeup_fd(previous)
        ours.close()
        theirs.close()
