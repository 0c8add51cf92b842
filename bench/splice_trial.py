"""A trial: would relaying a request body with splice(2) (from the client's socket through a
pipe to the upstream's, the bytes never copied into user space) cut what a 1 MiB upload costs
the relay, below what a recv into a buffer and a send out of it cost?

Three processes on 127.0.0.1 (port 0): the client (this process) sends N `POST`s with a
Content-Length body on each connection, each after the answer to the one before (a kept-alive
connection); the relay takes the head, forwards it and exactly Content-Length bytes of body to
the sink, and relays the sink's answer back; the sink reads each body whole (checking its
length and its first and last byte), discards it and answers 200. The relay's CPU is measured
(`getrusage(RUSAGE_SELF)` in its process, all its threads, from its accepted connections to
the last answer), user and system µs per MiB, and the three processes' together (on loopback
the kernel charges much of one side's TCP receive work to the other side's send, so the sum
is the steadier figure). User and system are split by the scheduler tick (250 Hz here): their
sum is exact, the split only sampled. All sockets have TCP_NODELAY, as uvloop's transports do
(without it the plain ways cost ~60 µs/MiB more). `--calls`: one more short run per way, the
relay's system calls counted by `perf stat` (tracepoints on its pid); `--profile DIR`: one
more run per way under `perf record -g` (DIR/WAY.data kept), its top symbols printed.

The ways (the head is read the same way by all: a 32 KiB `recv_into`, as `http1` reads a head,
and the body bytes that came with it are sent on with the head):

- `uvloop`: the sidecar's way in spirit: uvloop, a `BufferedProtocol` reading the body into a
  256 KiB buffer (`http1._BIG_READ`), each read written to the upstream socket at once when its
  transport holds nothing (`flow.send`), the rest handed to the transport as bytes; reading
  paused while the upstream transport is over its high-water mark.
- `selector`: the floor: non-blocking sockets, `recv_into` a 256 KiB buffer and `send` it all,
  a `poll` of the one socket that would block (one system call per wait, as an `epoll_wait`).
- `splice`: non-blocking `os.splice` client -> pipe -> upstream (`SPLICE_F_MOVE |
  SPLICE_F_NONBLOCK`, the pipe sized to 1 MiB by `F_SETPIPE_SZ`, capped by
  /proc/sys/fs/pipe-max-size), never more than the body's remaining length, a `poll` when
  neither side can move.
- `splice-thread`: a worker thread splices each body blocking (handed the length by the thread
  that read the head, which waits for it: a GIL hand-over each way per body).
- `uvloop-splice`: what an integration in the sidecar would be: uvloop transports for the heads
  and the answers; for the body the client transport's reading is paused and the body spliced
  from loop callbacks on `os.dup`s of the two sockets (uvloop refuses `add_reader` on a
  transport's own fd: "File descriptor N is used by transport"), then reading resumed; only
  when the upstream transport holds nothing (else that body is copied, as by `uvloop`).

    .venv/bin/python bench/splice_trial.py [--bodies 200] [--rounds 5] [--ways ...] [--calls]
    .venv/bin/python bench/splice_trial.py --connections 8 --bodies 40 \
        --ways uvloop,uvloop-splice:1048576,uvloop-splice:65536     # WAY:PIPE_SIZE

The machine is shared: each way runs `--rounds` times, interleaved, and the medians and the
spread are printed with the load average. The figures are in bench/FIGURES.md ("splice(2) for
uploads: a trial").
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import multiprocessing as mp
import os
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
HEAD_READ = 32 * 1024  # http1._READ_SIZE
BODY_READ = 256 * 1024  # http1._BIG_READ
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
WAYS = ("uvloop", "selector", "splice", "splice-thread", "uvloop-splice")
MARKS = 4  # bodies of 4 kinds (each byte i % 4), so the sink can tell them apart
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
CALLS = (
    "recvfrom",
    "sendto",
    "read",
    "write",
    "splice",
    "poll",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "futex",
    "dup",
)


def head_of(size: int) -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: relay\r\nContent-Length: %d\r\n\r\n" % size


def content_length(head: bytes) -> int:
    at = head.index(b"Content-Length: ") + 16
    return int(head[at : head.index(b"\r\n", at)])


# ---------------------------------------------------------------- the sink


def sink(listener: socket.socket, bodies: int, report: Any, connections: int = 1) -> None:
    """Reads `bodies` requests on each of `connections` (a thread each), each body whole into a
    1 MiB buffer (discarded; its first and last bytes checked), answering each; reports its own
    CPU seconds."""
    conns = [listener.accept()[0] for _ in range(connections)]
    start = resource.getrusage(resource.RUSAGE_SELF)
    threads = [threading.Thread(target=_sink_one, args=(conn, bodies)) for conn in conns]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = resource.getrusage(resource.RUSAGE_SELF)
    report.send(end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime)


def _sink_one(conn: socket.socket, bodies: int) -> None:
    buf = bytearray(MIB)
    view = memoryview(buf)
    pending = b""
    for i in range(bodies):
        while b"\r\n\r\n" not in pending:
            data = conn.recv(65536)
            if not data:
                raise SystemExit(f"sink: closed before request {i}")
            pending += data
        end = pending.index(b"\r\n\r\n") + 4
        length = content_length(pending[:end])
        got = pending[end : end + length]
        first = got[0] if got else None
        have = len(got)
        pending = pending[end + length :]
        last = got[-1] if have else None
        while have < length:
            k = conn.recv_into(view, min(len(view), length - have))
            if not k:
                raise SystemExit(f"sink: closed in body {i}")
            if first is None:
                first = buf[0]
            last = buf[k - 1]
            have += k
        mark = i % MARKS
        if first != mark or last != mark or pending:
            raise SystemExit(f"sink: body {i} wrong (first {first}, last {last}, extra {len(pending)})")
        conn.sendall(ANSWER)
    conn.close()


# ---------------------------------------------------------------- blocking-style ways


def _read_head(conn: socket.socket, view: memoryview, wait: Any) -> tuple[bytes, int]:
    """The head and the body bytes read with it (one or more 32 KiB reads), and the body's length."""
    got = b""
    while b"\r\n\r\n" not in got:
        try:
            k = conn.recv_into(view, HEAD_READ)
        except BlockingIOError:
            wait()
            continue
        if not k:
            raise EOFError
        got += view[:k]
    end = got.index(b"\r\n\r\n") + 4
    return got, content_length(got[:end]) - (len(got) - end)


def _send_all(sock: socket.socket, data: bytes | memoryview, wait: Any) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            wait()


def _answer(upstream: socket.socket, client: socket.socket, wait_up: Any, wait_client_out: Any) -> None:
    got = b""
    while len(got) < len(ANSWER):
        try:
            data = upstream.recv(4096)
        except BlockingIOError:
            wait_up()
            continue
        if not data:
            raise EOFError
        got += data
    _send_all(client, got, wait_client_out)


def _poller(sock: socket.socket, event: int) -> Any:
    p = select.poll()
    p.register(sock, event)
    return p.poll


PIPE_SIZE = [MIB, MIB]  # this run's, --pipe's


def _pipe() -> tuple[int, int, int]:
    r, w = os.pipe()
    try:
        size = min(PIPE_SIZE[0], int(Path("/proc/sys/fs/pipe-max-size").read_text()))
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        pass
    return r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)


def serve_plain(way: str, client: socket.socket, upstream: socket.socket, bodies: int) -> None:
    blocking = way == "splice-thread"
    for sock in (client, upstream):  # as uvloop sets on its TCP transports
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.setblocking(blocking)
    upstream.setblocking(blocking)
    c_in, c_out = _poller(client, select.POLLIN), _poller(client, select.POLLOUT)
    u_in, u_out = _poller(upstream, select.POLLIN), _poller(upstream, select.POLLOUT)
    head_buf = memoryview(bytearray(HEAD_READ))
    body_buf = memoryview(bytearray(BODY_READ))
    cfd, ufd = client.fileno(), upstream.fileno()
    r, w, pipe_size = _pipe()
    both = select.poll()
    jobs: Any = None
    if blocking:
        import queue

        jobs, done = queue.SimpleQueue(), queue.SimpleQueue[bool]()

        def worker() -> None:
            while (remaining := jobs.get()) is not None:
                while remaining:
                    k = os.splice(cfd, w, min(remaining, pipe_size), flags=os.SPLICE_F_MOVE)
                    if not k:
                        raise EOFError
                    remaining -= k
                    while k:
                        k -= os.splice(r, ufd, k, flags=os.SPLICE_F_MOVE)
                done.put(True)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
    for _ in range(bodies):
        got, remaining = _read_head(client, head_buf, c_in)
        _send_all(upstream, got, u_out)
        if way == "selector":
            while remaining:
                try:
                    k = client.recv_into(body_buf, min(remaining, BODY_READ))
                except BlockingIOError:
                    c_in()
                    continue
                if not k:
                    raise EOFError
                remaining -= k
                _send_all(upstream, body_buf[:k], u_out)
        elif way == "splice":
            in_pipe = 0
            while remaining or in_pipe:
                moved = False
                if remaining and in_pipe < pipe_size:
                    try:
                        k = os.splice(cfd, w, min(remaining, pipe_size - in_pipe), flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        pass
                    else:
                        if not k:
                            raise EOFError
                        remaining -= k
                        in_pipe += k
                        moved = True
                if in_pipe:
                    try:
                        k = os.splice(r, ufd, in_pipe, flags=SPLICE_FLAGS)
                    except BlockingIOError:
                        pass
                    else:
                        in_pipe -= k
                        moved = True
                if not moved:
                    for fd in (cfd, ufd):
                        try:
                            both.unregister(fd)
                        except KeyError:
                            pass
                    if remaining and in_pipe < pipe_size:
                        both.register(cfd, select.POLLIN)
                    if in_pipe:
                        both.register(ufd, select.POLLOUT)
                    both.poll()
        elif remaining:  # splice-thread
            jobs.put(remaining)
            done.get()
        _answer(upstream, client, u_in, c_out)
    if jobs is not None:
        jobs.put(None)
    os.close(r)
    os.close(w)


# ---------------------------------------------------------------- uvloop ways


class _Upstream(asyncio.Protocol):
    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.got = b""

    def data_received(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= len(ANSWER):
            got, self.got = self.got, b""
            self.relay.answered(got)

    def pause_writing(self) -> None:
        self.relay.upstream_paused = True
        self.relay.client.pause_reading()

    def resume_writing(self) -> None:
        self.relay.upstream_paused = False
        if not self.relay.splicing:
            self.relay.client.resume_reading()


def _write(transport: Any, fd: int, data: bytes | memoryview) -> None:
    """flow.send: to the socket at once when the transport holds nothing, the rest as bytes."""
    if not transport.get_write_buffer_size():
        try:
            sent = os.write(fd, data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(bytes(data))


class _Relay(asyncio.BufferedProtocol):
    told = False  # uvloop's refusal printed (once a process)

    def __init__(self, way: str, upstream_port: int, bodies: int, finished: asyncio.Future[None]) -> None:
        self.way = way
        self.upstream_port = upstream_port
        self.bodies = bodies
        self.finished = finished
        self.head_buf = memoryview(bytearray(HEAD_READ))
        self.body_buf = memoryview(bytearray(BODY_READ))
        self.got = b""
        self.remaining = 0
        self.upstream_paused = False
        self.splicing = False
        self.client: Any = None
        self.upstream: Any = None

    async def connect(self) -> None:
        """The upstream connection, made before the client's transport exists."""
        loop = asyncio.get_running_loop()
        self.upstream, _ = await loop.create_connection(lambda: _Upstream(self), "127.0.0.1", self.upstream_port)
        self.ufd = self.upstream.get_extra_info("socket").fileno()
        if self.way == "uvloop-splice":
            self.r, self.w, self.pipe_size = _pipe()
            self.udup = os.dup(self.ufd)
        self.reading = self.writing = False  # the dups registered with the loop

    def connection_made(self, transport: Any) -> None:
        self.client = transport
        self.cfd = transport.get_extra_info("socket").fileno()
        if self.way == "uvloop-splice":
            self.cdup = os.dup(self.cfd)
            try:
                asyncio.get_running_loop().add_reader(self.cfd, lambda: None)
            except RuntimeError as e:
                if not _Relay.told:
                    print(f"  (uvloop: add_reader on the transport's own fd: {e})", flush=True)
                _Relay.told = True
            else:
                asyncio.get_running_loop().remove_reader(self.cfd)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.body_buf if self.remaining else self.head_buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.remaining:
            take = min(nbytes, self.remaining)
            self.remaining -= take
            _write(self.upstream, self.ufd, self.body_buf[:take])
            return
        self.got += self.head_buf[:nbytes]
        if b"\r\n\r\n" not in self.got:
            return
        end = self.got.index(b"\r\n\r\n") + 4
        self.remaining = content_length(self.got[:end]) - (len(self.got) - end)
        _write(self.upstream, self.ufd, self.got)
        self.got = b""
        # (Only when the upstream transport holds nothing: what it holds must leave first, and a
        # splice past it would put body bytes before it. Otherwise this body is copied.)
        if self.remaining and self.way == "uvloop-splice" and not self.upstream.get_write_buffer_size():
            self.client.pause_reading()
            self.splicing = True
            self.in_pipe = 0
            self._splice()

    def _splice(self) -> None:
        """Move what can move without blocking; then wait for the side that would block."""
        loop = asyncio.get_running_loop()
        while self.remaining or self.in_pipe:
            moved = False
            if self.remaining and self.in_pipe < self.pipe_size:
                try:
                    k = os.splice(
                        self.cfd, self.w, min(self.remaining, self.pipe_size - self.in_pipe), flags=SPLICE_FLAGS
                    )
                except BlockingIOError:
                    pass
                else:
                    if not k:
                        raise EOFError
                    self.remaining -= k
                    self.in_pipe += k
                    moved = True
            if self.in_pipe:
                try:
                    k = os.splice(self.r, self.ufd, self.in_pipe, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    pass
                else:
                    self.in_pipe -= k
                    moved = True
            if not moved:
                break
        reading = bool(self.remaining) and self.in_pipe < self.pipe_size
        writing = bool(self.in_pipe)
        if reading != self.reading:
            self.reading = reading
            loop.add_reader(self.cdup, self._splice) if reading else loop.remove_reader(self.cdup)
        if writing != self.writing:
            self.writing = writing
            loop.add_writer(self.udup, self._splice) if writing else loop.remove_writer(self.udup)
        if reading or writing:
            return
        self.splicing = False
        if not self.upstream_paused:
            self.client.resume_reading()

    def answered(self, answer: bytes) -> None:
        _write(self.client, self.cfd, answer)
        self.bodies -= 1
        if not self.bodies and not self.finished.done():
            self.finished.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc or EOFError())


def serve_uvloop(
    way: str, listener: socket.socket, upstream_port: int, bodies: int, connections: int = 1
) -> tuple[float, float]:
    import uvloop

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        conns = [(await loop.sock_accept(listener))[0] for _ in range(connections)]
        start = resource.getrusage(resource.RUSAGE_SELF)
        waits = []
        for conn in conns:
            finished: asyncio.Future[None] = loop.create_future()
            protocol = _Relay(way, upstream_port, bodies, finished)
            await protocol.connect()
            await loop.connect_accepted_socket(lambda p=protocol: p, conn)  # type: ignore[misc]
            waits.append(finished)
        await asyncio.gather(*waits)
        end = resource.getrusage(resource.RUSAGE_SELF)
        return end.ru_utime - start.ru_utime, end.ru_stime - start.ru_stime

    listener.setblocking(False)
    return uvloop.run(main())


# ---------------------------------------------------------------- the relay process


def relay(way: str, listener: socket.socket, upstream_port: int, bodies: int, report: Any, connections: int) -> None:
    if way.startswith("uvloop"):
        report.send(serve_uvloop(way, listener, upstream_port, bodies, connections))
        return
    if connections != 1:
        raise SystemExit(f"{way}: one connection only")
    client, _ = listener.accept()
    start = resource.getrusage(resource.RUSAGE_SELF)
    upstream = socket.create_connection(("127.0.0.1", upstream_port))
    serve_plain(way, client, upstream, bodies)
    end = resource.getrusage(resource.RUSAGE_SELF)
    report.send((end.ru_utime - start.ru_utime, end.ru_stime - start.ru_stime))


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def run(
    way: str, bodies: int, size: int, count_calls: bool = False, profile: str = "", connections: int = 1
) -> dict[str, Any]:
    """One run: `bodies` requests on each of `connections`; the relay's CPU per MiB (and the
    three processes'), the rate, and (`count_calls`) its system calls per MiB."""
    if ":" in way:  # a way with its own pipe size ("uvloop-splice:262144"), else --pipe's
        way, pipe = way.split(":")
        PIPE_SIZE[0] = int(pipe)
    else:
        PIPE_SIZE[0] = PIPE_SIZE[1]  # the relay is forked with it
    ctx = mp.get_context("fork")
    sink_listener, relay_listener = listening(), listening()
    ours, theirs = ctx.Pipe()
    sink_ours, sink_theirs = ctx.Pipe()
    sink_proc = ctx.Process(target=sink, args=(sink_listener, bodies, sink_theirs, connections))
    relay_proc = ctx.Process(
        target=relay, args=(way, relay_listener, sink_listener.getsockname()[1], bodies, theirs, connections)
    )
    sink_proc.start()
    relay_proc.start()
    perf: subprocess.Popen[Any] | None = None
    if count_calls:
        events = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{name}" for name in CALLS]
        perf = subprocess.Popen(
            [shutil.which("perf") or "perf", "stat", "-x", ",", "-e", ",".join(events), "-p", str(relay_proc.pid)],
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)
    elif profile:
        perf = subprocess.Popen(
            [
                shutil.which("perf") or "perf",
                "record",
                "-q",
                "-g",
                "-e",
                "cpu-clock",
                "-F",
                "4000",
                "-p",
                str(relay_proc.pid),
                "-o",
                profile,
            ],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
    bodies_bytes = [head_of(size) + bytes([i]) * size for i in range(MARKS)]
    clients = [socket.create_connection(relay_listener.getsockname()) for _ in range(connections)]

    def send(client: socket.socket) -> None:
        for i in range(bodies):
            client.sendall(bodies_bytes[i % MARKS])
            got = b""
            while len(got) < len(ANSWER):
                data = client.recv(4096)
                if not data:
                    raise SystemExit(f"client: closed at request {i} ({way})")
                got += data
        client.close()

    t0 = time.perf_counter()
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    if connections == 1:
        send(clients[0])
    else:
        threads = [threading.Thread(target=send, args=(client,)) for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    user, system = ours.recv()
    others = sink_ours.recv() + c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    relay_proc.join(10)
    sink_proc.join(10)
    calls: dict[str, int] = {}
    if perf is not None and profile:
        perf.send_signal(signal.SIGINT)
        perf.wait(30)
    elif perf is not None:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=30)
        for line in err.splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[0].strip().isdigit():
                name = parts[2].rsplit("sys_enter_", 1)[-1] if "sys_enter_" in parts[2] else "all"
                calls[name] = int(parts[0])
    for sock in (sink_listener, relay_listener):
        sock.close()
    mib = connections * bodies * size / MIB
    return {
        "user": user * 1e6 / mib,
        "sys": system * 1e6 / mib,
        "rate": connections * bodies / wall,
        "all": (user + system + others) * 1e6 / mib,
        "calls": {k: v / mib for k, v in calls.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bodies", type=int, default=200, help="requests per connection")
    parser.add_argument("--connections", type=int, default=1, help="more than 1: the uvloop ways only")
    parser.add_argument("--size", type=int, default=MIB)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--pipe", type=int, default=MIB, help="the pipe's size (F_SETPIPE_SZ; the default is 64 KiB)")
    parser.add_argument("--calls", action="store_true", help="one more run per way, its system calls counted")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="one more run per way under `perf record -g`, DIR/WAY.data kept; its top symbols",
    )
    args = parser.parse_args()
    ways = args.ways.split(",")
    PIPE_SIZE[1] = args.pipe
    results: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    loads = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for way in ways:
            results[way].append(run(way, args.bodies, args.size, connections=args.connections))
        loads.append(os.getloadavg()[0])
    calls = (
        {way: run(way, min(args.bodies, 100), args.size, True, connections=args.connections)["calls"] for way in ways}
        if args.calls
        else {}
    )
    if args.profile:
        for way in ways:
            if True:
                data = os.path.join(args.profile, f"{way}.data")
                run(way, min(args.bodies, 200), args.size, profile=data, connections=args.connections)
                out = subprocess.run(
                    [
                        shutil.which("perf") or "perf",
                        "report",
                        "-i",
                        data,
                        "--stdio",
                        "--sort",
                        "sym",
                        "--percent-limit",
                        "3",
                        "--no-children",
                        "-g",
                        "none",
                    ],
                    capture_output=True,
                    text=True,
                ).stdout
                top = [line.strip() for line in out.splitlines() if line.strip() and not line.startswith("#")]
                print(f"{way}: " + "; ".join(" ".join(line.split()) for line in top[:8]))
    if not args.rounds:
        return
    print(
        f"{args.rounds} rounds of {args.bodies} bodies of {args.size} bytes on {args.connections} connection(s), "
        f"interleaved, pipes of {args.pipe} bytes; "
        f"load average (1 min) {min(loads):.2f}-{max(loads):.2f}; {os.cpu_count()} CPUs"
    )
    print(
        "way                   user µs/MiB (spread)  sys µs/MiB (spread)   total µs/MiB (spread)"
        "  3 processes µs/MiB   bodies/s  calls/MiB"
    )
    for way in ways:
        runs = results[way]
        cols = []
        for key in ("user", "sys", None):
            values = [r["user"] + r["sys"] if key is None else r[key] for r in runs]
            cols.append(f"{statistics.median(values):6.0f} ({min(values):.0f}-{max(values):.0f})")
        rate = statistics.median(r["rate"] for r in runs)
        every = [r["all"] for r in runs]
        cols.append(f"{statistics.median(every):6.0f} ({min(every):.0f}-{max(every):.0f})")
        c = calls.get(way, {})
        detail = " ".join(f"{k} {v:.1f}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        print(f"{way:21} {cols[0]:22} {cols[1]:21} {cols[2]:22} {cols[3]:20} {rate:8.0f}  {detail}")


if __name__ == "__main__":
    main()
