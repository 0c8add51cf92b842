"""An answer's head taken again without llhttp (`upstream._Head`, `_Connection._again`), against
llhttp itself: every read, valid or not, must leave the connection exactly as llhttp's callbacks
would have, whatever head its origin holds.

Each case is fed twice to a connection fresh for a request: once with no head kept for its
origin (llhttp alone: the reference), once with the origin holding a head the case starts like
(the common answer it was made from), so that a read which is that answer again takes the
quick way and every other read must be told from it. Both must give the same outcome: the
answer's status, reason, fields, framing, body, whether the connection is kept, the error, a
stray byte's distrust. No sockets: the reads go straight into the protocol.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy.http.flow import Deadlines
from proxy.http.upstream import Pool, _Connection, _Head

# Common answers: what the quick way is for (nginx's, and others of the same kind).
BASES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\ncontent-length: 5\r\nX-A: a: b\r\n\r\nbusy!",
    b"HTTP/1.1 201 Created\r\nLocation: /x\r\nSet-Cookie: a=b; Path=/\r\nSet-Cookie: c=d\r\nContent-Length: 4\r\n\r\nmade",
    b"HTTP/1.1 299 \r\nContent-Length: 1\r\n\r\nx",
]

# Answers that are not common, or not valid: each is told from the common one it resembles.
HAND_PICKED = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",  # a second answer
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokX",  # a stray byte
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no",  # the body cut short (more to come)
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n folded\r\n\r\nok",  # obs-fold
    b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, close\r\n\r\nok",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX\x00: y\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: \x7f\r\n\r\nok",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b" HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
    b"",
]
# Valid, kept alive and so kept as a head, though not the usual spelling: llhttp reads the
# length as 2, takes obs-text in a value, skips a blank line before the status line, and
# ignores Upgrade on an answer that is not a 101.
ODD_BUT_COMMON = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 02\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: \xff\r\n\r\nok",
    b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\nok",
]


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False
        self.paused = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(bytes(data))

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _pool(loop: asyncio.AbstractEventLoop) -> Pool:
    pool = Pool(probation=0)
    pool._loop = loop
    pool._deadlines = Deadlines(loop)
    return pool


def _outcome(pool: Pool, reads: list[bytes], *, head: _Head | None, is_head: bool = False) -> tuple[object, ...]:
    """Feed `reads` to a new connection of a new origin holding `head`: what the connection then says."""
    origin = pool._origin("http", f"h{len(pool._origins)}", 80)
    origin.head = head
    conn = _Connection(pool, origin)
    transport = _Transport()
    conn.connection_made(transport)
    conn._begin(is_head)
    for read in reads:
        if transport.aborted:
            break
        conn.data_received(read)
    error = conn._error
    return (
        None if error is None else (type(error), error.args),
        conn._got_bytes,
        conn._head_done,
        conn._done,
        conn._status if conn._head_done else None,
        conn._reason if conn._head_done else None,
        list(conn._names) if conn._head_done else None,
        list(conn._values) if conn._head_done else None,
        conn._length if conn._head_done else None,
        conn._chunked,
        conn._keep_alive,
        b"".join(conn._chunks),
        conn._buffered,
        conn._head_bytes,
        transport.aborted,
        transport.paused,
        origin.distrusted_until > 0,
    )


def _head_of(pool: Pool, answer: bytes) -> _Head:
    """The `_Head` llhttp's parse of `answer` leaves its origin with."""
    origin = pool._origin("http", f"h{len(pool._origins)}", 80)
    conn = _Connection(pool, origin)
    conn.connection_made(_Transport())
    conn._begin(False)
    conn.data_received(answer)
    assert origin.head is not None, answer
    return origin.head


def _mutants(base: bytes, rng: random.Random) -> list[bytes]:
    end = base.index(b"\r\n\r\n") + 4
    found = [base[:cut] for cut in range(len(base))]  # every read cut short
    found += [base + b"x", base + base, base[:end] + base[end:] + b"\r\n", base[:-1] if base[end:] else base]
    found += [base[:end] + b"y" * n for n in range(8)]  # bodies of other lengths
    for _ in range(150):
        chars = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            spot = rng.randrange(len(chars))
            kind = rng.randrange(4)
            if kind == 0:
                chars[spot] = rng.choice(b"\x00\t\r\n :;,\x7f\x80\xffA0z-")
            elif kind == 1:
                chars.insert(spot, rng.choice(b"\x00\t\r\n :;,\x7f\xffA0"))
            elif kind == 2:
                del chars[spot]
            else:
                chars[spot:spot] = rng.choice(
                    [b"\r\n", b"\r\nContent-Length: 3", b"\r\nTransfer-Encoding: chunked", b" ", b"\r\n\r\n"]
                )
        found.append(bytes(chars))
    return found


@pytest.fixture
def pool() -> Pool:
    loop = asyncio.new_event_loop()
    yield _pool(loop)
    loop.close()


@pytest.mark.parametrize("base", BASES + ODD_BUT_COMMON)
def test_the_same_answer_again_is_taken_as_llhttp_took_it(pool: Pool, base: bytes) -> None:
    head = _head_of(pool, base)
    reference = _outcome(pool, [base], head=None)
    assert reference[3] and reference[10], "a whole answer, kept alive"
    assert _outcome(pool, [base], head=head) == reference
    assert head.hits == 1, "taken the quick way"


@pytest.mark.parametrize("base", BASES)
def test_every_other_read_is_what_llhttp_makes_of_it(pool: Pool, base: bytes) -> None:
    head = _head_of(pool, base)
    rng = random.Random(base)
    for read in _mutants(base, rng) + HAND_PICKED + ODD_BUT_COMMON:
        for reads in ([read], [read[: len(read) // 2], read[len(read) // 2 :]]):
            reads = [r for r in reads if r]
            assert _outcome(pool, reads, head=head) == _outcome(pool, reads, head=None), reads
            assert _outcome(pool, reads, head=head, is_head=True) == _outcome(pool, reads, head=None, is_head=True)


@pytest.mark.parametrize("read", HAND_PICKED)
def test_an_uncommon_answer_is_never_kept_as_a_head(pool: Pool, read: bytes) -> None:
    origin = pool._origin("http", "uncommon", 80)
    conn = _Connection(pool, origin)
    conn.connection_made(_Transport())
    conn._begin(False)
    conn.data_received(read)
    assert origin.head is None


def test_a_head_to_a_head_request_is_not_kept(pool: Pool) -> None:
    origin = pool._origin("http", "head", 80)
    conn = _Connection(pool, origin)
    conn.connection_made(_Transport())
    conn._begin(True)
    conn.data_received(BASES[1])
    assert origin.head is None


def test_an_origin_whose_heads_never_repeat_gets_a_new_one_only_every_16th_answer(pool: Pool) -> None:
    origin = pool._origin("http", "varies", 80)
    kept = []
    for n in range(40):
        conn = _Connection(pool, origin)
        conn.connection_made(_Transport())
        conn._begin(False)
        body = b"x" * (n + 1)
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        assert conn._done and b"".join(conn._chunks) == body
        kept.append(origin.head)
    assert len({id(head) for head in kept}) == 3  # the first, the 17th, the 33rd
