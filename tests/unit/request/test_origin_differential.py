"""runtime's `Origin.parse` reads an upstream URL as yarl's `URL` did, and common ones without yarl.

Where requests go (host, port) and the path they are forwarded under come from it. A plain
URL is read by a regular expression (no yarl: with multidict, 0.6 MiB of every process, bench/FIGURES.md); any
other goes to yarl as before. Held to yarl's reading on generated URLs of both kinds (hosts
and paths of the characters that change under yarl's quoting, IDNA and IP rules, dot
segments, ports out of range), counts bounded, seeds fixed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
from yarl import URL

from proxy.request.runtime import _PLAIN_URL, Origin
from tests.support.process import REPO

HOST_PIECES = [*"aB09-._%@:", "xn--", "127.0.0.1", "1.2.3.4", "00", "localhost", "Ex", "é", "\u212a", "[::1]", "u:p@"]
HOST_PLAIN = [*"aBzZ09-.", "127.0.0.1", "1.2.3.4", "00", "xn--", "x" * 64]
PATH_PIECES = [*"/aB.+&=;:@~!$'()*,-_ \\|^`{\"<[?#", "..", "%", "%2F", "%2f", "%41", "%zz", "%25", "é"]
PATH_PLAIN = [*"/aB0.+&=;:@~!$'()*,-_", ".."]
PORTS = ["", "", ":8080", ":0", ":80", ":443", ":00081", ":65535", ":65536", ":99999", ":"]


def read_by_yarl(url: str) -> object:
    try:
        parts = URL(url)
        return parts.scheme, parts.host or "", parts.port or 80, parts.raw_path.rstrip("/")
    except Exception as error:
        return type(error)


def read_here(url: str) -> object:
    try:
        origin = Origin.parse(url)
        return origin.scheme, origin.host, origin.port, origin.base_path
    except Exception as error:
        return type(error)


def urls(seed: int, count: int, hosts: list[str], paths: list[str], schemes: tuple[str, ...]) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        host = "".join(rng.choice(hosts) for _ in range(rng.randint(1, 5)))
        path = "".join(rng.choice(paths) for _ in range(rng.randint(0, 9)))
        path = path if not path or path.startswith("/") else "/" + path
        out.append(f"{rng.choice(schemes)}://{host}{rng.choice(PORTS)}{path}")
    return out


COMMON = [
    "http://127.0.0.1:8000",
    "http://localhost:8080",
    "http://app",
    "https://backend.default.svc.cluster.local",
    "https://API.Example.com:8443/v1.2/base",
    "http://10.0.0.7:9000/api;v=1/",
    "http://h:0",
]


@pytest.mark.parametrize("url", COMMON)
def test_common_upstream_urls_are_read_as_yarl_reads_them_without_it(url: str) -> None:
    assert _PLAIN_URL.fullmatch(url) is not None
    assert read_here(url) == read_by_yarl(url)


def test_reading_common_urls_imports_no_yarl() -> None:
    code = f"import sys; from proxy.request.runtime import Origin; [Origin.parse(u) for u in {COMMON!r}]; print('yarl' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("seed", range(3))
def test_generated_upstream_urls_are_read_as_yarl_reads_them(seed: int) -> None:
    plain = urls(seed, 4_000, HOST_PLAIN, PATH_PLAIN, ("http", "https"))
    other = urls(seed, 4_000, HOST_PIECES, PATH_PIECES, ("http", "https", "HTTP", "Https"))
    assert sum(_PLAIN_URL.fullmatch(url) is not None for url in plain) > 2_000  # both ways are taken
    differ = [url for url in plain + other if read_here(url) != read_by_yarl(url)]
    assert differ == []
