"""splice.py on real socket pairs: the pipe pool's cap and sizes, a body moved exactly (never a byte
past `left`: what follows stays in the client's socket), every end closing its dups and pipe (no fd
left: /proc/self/fd), and a closed socket never kept open by a dup (its peer sees the end)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator

import pytest

from proxy.http import splice

KiB = 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pipes(monkeypatch: pytest.MonkeyPatch) -> Iterator[splice.Pipes]:
    pool = splice.Pipes(cap=2)
    monkeypatch.setattr(splice, "PIPES", pool)
    yield pool
    while pool._free:
        pool.give(pool._free.pop(), False)


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_the_pool_is_capped_and_keeps_only_empty_pipes(pipes: splice.Pipes) -> None:
    before = open_fds()
    first, second = pipes.take(), pipes.take()
    assert first is not None and second is not None
    assert pipes.take() is None  # the cap: this body is copied
    import fcntl

    assert fcntl.fcntl(first[1], fcntl.F_GETPIPE_SZ) >= splice.PIPE_SIZE
    pipes.give(first, True)
    assert pipes.take() == first  # empty: reused
    pipes.give(first, False)  # not empty: closed, never another body's
    with pytest.raises(OSError):
        os.fstat(first[0])
    pipes.give(second, False)
    assert pipes.open == 0
    assert open_fds() == before


def test_a_pipe_the_kernel_will_not_size_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = splice.Pipes(cap=4, size=1 << 40)  # past pipe-max-size: refused
    before = open_fds()
    assert pool.take() is None
    assert pool.open == 0
    assert open_fds() == before


async def run(client: socket.socket, upstream: socket.socket, left: int) -> tuple[str, int, int]:
    loop = asyncio.get_running_loop()
    pipe = splice.PIPES.take()
    assert pipe is not None
    ended: asyncio.Future[str] = loop.create_future()
    took: list[int] = []
    gave: list[int] = []
    s = splice.Splice(
        loop,
        client.fileno(),
        upstream.fileno(),
        left,
        pipe,
        took.append,
        lambda n: gave.append(n) is not None,
        lambda: None,
        lambda how: ended.set_result(how),
    )
    s.step()
    how = await asyncio.wait_for(ended, 5)
    assert not s.active
    return how, sum(took), sum(gave)


async def drain_into(sock: socket.socket, into: bytearray, until: int) -> None:
    loop = asyncio.get_running_loop()
    while len(into) < until:
        data = await loop.sock_recv(sock, 1 << 20)
        if not data:
            return
        into += data


@pytest.mark.parametrize("size", [1, 1000, 256 * KiB, 256 * KiB + 1, 3 * 1024 * KiB + 17])
async def test_exactly_the_body_moves_and_what_follows_stays(pipes: splice.Pipes, size: int) -> None:
    before = open_fds()
    peer, client = pair()  # peer: the client's end; client: the proxy's socket
    upstream, server = pair()  # upstream: the proxy's socket; server: the upstream's end
    body = os.urandom(size)
    loop = asyncio.get_running_loop()
    sending = loop.create_task(loop.sock_sendall(peer, body + b"NEXT REQUEST"))
    got = bytearray()
    receiving = loop.create_task(drain_into(server, got, size))
    how, took, gave = await run(client, upstream, size)
    await sending
    await asyncio.wait_for(receiving, 5)
    assert (how, took, gave) == ("done", size, size)
    assert bytes(got) == body
    assert client.recv(100) == b"NEXT REQUEST"  # never spliced: past the body
    for sock in (peer, client, upstream, server):
        sock.close()
    assert open_fds() == before + 2 * len(pipes._free)


async def test_a_client_gone_mid_body_ends_the_splice_and_its_fds(pipes: splice.Pipes) -> None:
    before = open_fds()
    peer, client = pair()
    upstream, server = pair()
    peer.sendall(b"x" * 1000)
    peer.close()  # 1000 of 5000 bytes, then the end
    got = bytearray()
    receiving = asyncio.get_running_loop().create_task(drain_into(server, got, 1000))
    how, took, gave = await run(client, upstream, 5000)
    await asyncio.wait_for(receiving, 5)
    assert (how, took, gave, len(got)) == ("source", 1000, 1000, 1000)
    for sock in (client, upstream, server):
        sock.close()
    assert open_fds() == before + 2 * len(pipes._free)


async def test_an_upstream_gone_mid_body_ends_the_splice(pipes: splice.Pipes) -> None:
    peer, client = pair()
    upstream, server = pair()
    server.close()
    peer.sendall(b"y" * 5000)
    how, took, _ = await run(client, upstream, 5000)
    assert (how, took) == ("sink", 5000)
    assert pipes.open == len(pipes._free)  # the pipe that held bytes was closed, not kept
    for sock in (peer, client, upstream):
        sock.close()


async def test_closing_a_splice_leaves_no_dup_keeping_a_socket_open(pipes: splice.Pipes) -> None:
    before = open_fds()
    peer, client = pair()
    upstream, server = pair()
    loop = asyncio.get_running_loop()
    pipe = pipes.take()
    assert pipe is not None
    s = splice.Splice(
        loop, client.fileno(), upstream.fileno(), 10_000, pipe, lambda n: None, lambda n: False, lambda: None, print
    )
    s.step()  # waits for the client: its dup registered with the loop
    assert s.active
    client.close()
    upstream.close()
    peer.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.recv(1)  # the dup still holds the client's socket: no end seen yet
    s.close()
    s.close()  # (idempotent)
    assert peer.recv(1) == b""  # closed: the peer sees the end
    server.settimeout(1)
    assert server.recv(1) == b""
    peer.close()
    server.close()
    assert open_fds() == before + 2 * len(pipes._free)


def test_a_forked_child_shares_no_pipe_with_its_parent() -> None:
    pipe = splice.PIPES.take()
    assert pipe is not None
    splice.PIPES.give(pipe, True)  # free in the parent's pool
    pid = os.fork()
    if pid == 0:  # the child: a pool of its own, the parent's free pipe closed
        ok = not splice.PIPES._free and splice.PIPES.open == 0
        try:
            os.fstat(pipe[0])
            ok = False
        except OSError:
            pass
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert splice.PIPES.take() == pipe  # the parent's pool as it was
    splice.PIPES.give(pipe, True)


def tcp_pair(rcvbuf: int = 0) -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection (what the proxy splices: not a socketpair), both ends non-blocking."""
    listener = socket.socket()
    if rcvbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # inherited by the accepted end
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
    return a, b


async def test_a_pipe_full_of_small_fragments_does_not_spin_while_the_upstream_reads_nothing(
    pipes: splice.Pipes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pipe holds 64 buffers (256 KiB / 4 KiB), one per fragment of the socket's skbs, however
    # few bytes each holds. From a real network every packet's payload is a fragment of its own
    # (~1448 bytes, a page-pool slice), so a 256 KiB pipe is full at ~90 KiB: the client's splice
    # then says EAGAIN with the byte count (`_in_pipe`) far from `size`. Here the client's writes
    # are interleaved with another socket's, so its fragments are not contiguous and loopback cannot
    # coalesce them (as it does for one sender's consecutive writes). The upstream reads nothing:
    # the splice must wait for it, not keep the client's (readable) dup registered and spin.
    peer, client = tcp_pair()
    upstream, server = tcp_pair(rcvbuf=4096)  # the upstream reads nothing and buffers little
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    other, other_end = tcp_pair()
    piece = b"x" * 1000
    for _ in range(200):  # 200 KB: more than the upstream's buffers and the pipe's 64 fragments hold
        peer.send(piece)
        other.send(piece)
    loop = asyncio.get_running_loop()
    steps = 0
    step = splice.Splice.step

    def counting(self: splice.Splice, *args: bool) -> None:
        nonlocal steps
        steps += 1
        step(self, *args)

    monkeypatch.setattr(splice.Splice, "step", counting)
    pipe = pipes.take()
    assert pipe is not None
    ended: asyncio.Future[str] = loop.create_future()
    size = 200 * len(piece)
    s = splice.Splice(
        loop,
        client.fileno(),
        upstream.fileno(),
        size,
        pipe,
        lambda n: None,
        lambda n: False,
        lambda: None,
        ended.set_result,
    )
    s.step()
    await asyncio.sleep(0.2)  # the upstream's buffers and the pipe fill
    steps = 0
    cpu = time.process_time()
    await asyncio.sleep(0.5)
    spun, cpu = steps, time.process_time() - cpu
    got = bytearray()
    await drain_into(server, got, size)  # the upstream reads: the body goes on to its end
    how = await asyncio.wait_for(ended, 5)
    s.close()
    for sock in (peer, client, upstream, server, other, other_end):
        sock.close()
    assert spun < 50 and cpu < 0.2, f"{spun} steps, {cpu:.2f}s CPU in 0.5 s with nothing moving"
    assert (how, bytes(got)) == ("done", piece * 200)


async def test_urgent_data_in_the_body_does_not_stall_the_splice_nor_spin(
    pipes: splice.Pipes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # splice(2) from a TCP socket stops at the urgent mark (tcp_read_sock: "Stop reading if we
    # hit a patch of urgent data") and says EAGAIN, while the socket stays readable (the bytes
    # after the mark): a client that sends one byte with MSG_OOB in its body stalls the splice
    # with its dup polled readable, a busy loop until the body's timeout. recv(2) (the copy
    # path) skips the urgent byte (SO_OOBINLINE off) and reads on.
    peer, client = tcp_pair()
    upstream, server = tcp_pair()
    peer.setblocking(True)
    peer.sendall(b"a" * 1000)
    peer.send(b"!", socket.MSG_OOB)
    peer.sendall(b"b" * 1000)
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    steps = 0
    step = splice.Splice.step

    def counting(self: splice.Splice, *args: bool) -> None:
        nonlocal steps
        steps += 1
        step(self, *args)

    monkeypatch.setattr(splice.Splice, "step", counting)
    pipe = pipes.take()
    assert pipe is not None
    ended: asyncio.Future[str] = loop.create_future()
    took: list[int] = []
    s = splice.Splice(
        loop,
        client.fileno(),
        upstream.fileno(),
        5000,
        pipe,
        took.append,
        lambda n: False,
        lambda: None,
        ended.set_result,
    )
    s.step()
    got = bytearray()
    receiving = loop.create_task(drain_into(server, got, 1000))
    cpu = time.process_time()
    _done, _ = await asyncio.wait([ended], timeout=0.5)
    spun, cpu = steps, time.process_time() - cpu
    s.close()
    receiving.cancel()
    for sock in (peer, client, upstream, server):
        sock.close()
    # The splice hands the rest to the transport's reads ("source": they meet what comes).
    assert spun < 50 and cpu < 0.2, f"{spun} steps, {cpu:.2f}s CPU in 0.5 s stuck at the urgent mark"
    assert ended.done() and ended.result() == "source" and sum(took) == 1000
