"""http1's `query_pairs` and `Headers` answer as yarl's `URL.query` and multidict's `CIMultiDict`.

The proxy decoded a request's query with yarl and looked its decoded header fields up in a
`CIMultiDict` (aiohttp's, from when it ran on aiohttp); http1.py now does both itself, to keep
the two libraries out of every process (0.6 MiB of resident memory, bench/FIGURES.md).
Where a query token is found (auth/extract.py) and what the router and the upstream see depend
on the decoding, so it is held to yarl's on thousands of generated query strings made of the
tricky pieces (escapes valid, invalid, truncated, of bytes that are not UTF-8, of separators;
'+', ';', '=', '&', empty names and values, repeats, characters outside ASCII, lone
surrogates as surrogateescape decodes bytes that are not UTF-8) and on hand-picked ones; the
header lookup to `CIMultiDict`'s on generated field sets whose names differ by case, ASCII or
not (KELVIN SIGN, dotted and dotless i, long s, sharp s). yarl and multidict stay installed
for the tests, as aiohttp's dependencies. The counts are bounded, the seeds fixed.
"""

from __future__ import annotations

import random

import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.auth.extract import query_values, without_query_param
from proxy.http.http1 import Headers, query_pairs

# Pieces a query string is made of: every kind of escape, the separators, the characters
# that decode differently in some parser.
PIECES = [
    *"%+=&;#?/ aZ09~._-!$'()*,:@",
    *("%2", "%25", "%2B", "%2b", "%3D", "%26", "%3B", "%20", "%00", "%7F", "%5F", "%5f", "%61"),
    *("%80", "%ff", "%FF", "%c3", "%C3%A9", "%c3%28", "%e2%82", "%e2%82%ac", "%ed%a0%80", "%ed%9f%bf"),
    *("%f0%9f%98", "%f0%9f%98%80", "%f4%90%80%80", "%F5", "%c0%af", "%e0%80%80", "%zz", "%4", "%%", "%g0"),
    *("\udcff", "\udc80", "é", "€", "\x00", "\x7f", "\u212a", "\ufffd", "😀"),
    *("access_token", "ACCESS_TOKEN", "access%5Ftoken", "access.token", "access+token", "access_token;x"),
]
HAND_PICKED = [
    "",
    "&",
    "&&",
    "=",
    "==",
    "a",
    "a=",
    "=a",
    "a=b=c",
    "a=1&a=2&a=",
    "a=1;b=2",
    "a=1&;b=2",
    "access_token=x;access_token=y",
    "+",
    "a+b=c+d",
    "a%2Bb=c%2bd",
    "%",
    "%2",
    "%zz=%zz",
    "a=%",
    "%25=%2525",
    "%C3%A9=%c3%a9",
    "%c3=%a9",
    "%ff%fe=%80",
    "%ed%a0%80=%f4%90%80%80",
    "%00=%00",
    "a=%26b%3Dc",
    "access%5Ftoken=T",
    "%61ccess_token=T",
    "access_token=T&ACCESS_TOKEN=U",
    "é=€",
    "\udcff=\udc80",
    "%\udcff=%",
    "a=1&&b=2&",
]


def yarl_pairs(query: str) -> list[tuple[str, str]]:
    """What the proxy decoded before: http1's `URL.build(query_string=q, encoded=True).query`."""
    return list(URL.build(query_string=query, encoded=True).query.items())


def generated(seed: int, count: int, pieces: list[str], longest: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, longest))) for _ in range(count)]


def escapes(seed: int, count: int) -> list[str]:
    """Strings of %-escapes of any byte (either case), separators and any character."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 16)):
            r = rng.random()
            if r < 0.45:
                parts.append(rng.choice(("%%%02x", "%%%02X")) % rng.randrange(256))
            elif r < 0.7:
                parts.append(rng.choice("%+=&; "))
            elif r < 0.9:
                parts.append(chr(rng.randrange(0x20, 0x7F)))
            else:
                parts.append(chr(rng.choice((rng.randrange(0x80, 0x800), rng.randrange(0xDC80, 0xDD00), 0x10FFFF))))
        out.append("".join(parts))
    return out


@pytest.mark.parametrize("query", HAND_PICKED)
def test_hand_picked_queries_decode_as_yarl_decodes_them(query: str) -> None:
    assert query_pairs(query) == yarl_pairs(query)


@pytest.mark.parametrize("seed", range(4))
def test_generated_queries_decode_as_yarl_decodes_them(seed: int) -> None:
    queries = generated(seed, 5_000, PIECES, 14) + escapes(seed, 2_500)
    differ = [q for q in queries if query_pairs(q) != yarl_pairs(q)]
    assert differ == []


@pytest.mark.parametrize("seed", range(2))
def test_a_query_token_is_found_and_removed_as_before(seed: int) -> None:
    """auth/extract.py's reading of the pairs: the same values under `access_token` (or the
    same 400 for one after a ';'), and the raw query without it the same."""

    def found(pairs: list[tuple[str, str]]) -> object:
        try:
            return query_values(pairs, "access_token")
        except Exception as error:
            return type(error), str(error)

    rng = random.Random(seed)
    names = ["access_token", "ACCESS_token", "access%5Ftoken", "access.token", "access+token", "%61ccess_token", "a"]
    for query in generated(seed, 2_000, PIECES, 8):
        query = f"{query}&{rng.choice(names)}={rng.choice(PIECES)}"
        assert found(query_pairs(query)) == found(yarl_pairs(query)), query
        without = without_query_param(query, "access_token")
        rest = found(query_pairs(without))
        assert rest == found(yarl_pairs(without)), query
        assert rest == [] or isinstance(rest, tuple), query  # none left under that name (or a 400 for a ';')


# Names that differ by case only, in ASCII and outside it: full Unicode lower case (what
# CIMultiDict compares) makes KELVIN SIGN `k` and LATIN CAPITAL I WITH DOT `i̇` (two characters).
NAME_PIECES = [*"kKsSiIaA-_", "\u212a", "ſ", "ß", "ẞ", "ı", "İ", "i\u0307", "\udcff", "é", "É", "Connection", "UPGRADE"]
LOOKUPS = [
    "k",
    "K",
    "\u212a",
    "s",
    "S",
    "ſ",
    "ss",
    "SS",
    "ß",
    "ẞ",
    "i",
    "I",
    "ı",
    "İ",
    "i\u0307",
    "connection",
    "upgrade",
]


def generated_fields(seed: int, count: int) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    sets = []
    for _ in range(count):
        names = ["".join(rng.choice(NAME_PIECES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 8))]
        sets.append([(name, f"v{i}") for i, name in enumerate(names)])
    return sets


def answers(headers: Headers | CIMultiDict[str], name: str) -> tuple[object, ...]:
    try:
        strict: object = headers.getall(name)
    except KeyError:
        strict = KeyError
    try:
        item: object = headers[name]
    except KeyError:
        item = KeyError
    return (strict, headers.getall(name, None), headers.get(name), headers.get(name, "-"), item, name in headers)


@pytest.mark.parametrize("seed", range(3))
def test_header_lookups_answer_as_cimultidict_does(seed: int) -> None:
    rng = random.Random(seed)
    for pairs in generated_fields(seed, 2_000):
        ours, theirs = Headers(list(pairs)), CIMultiDict(pairs)
        names = (
            LOOKUPS
            + [name for name, _ in pairs]
            + [rng.choice((str.upper, str.lower, str.swapcase))(name) for name, _ in pairs]
        )
        for name in names:
            assert answers(ours, name) == answers(theirs, name), (pairs, name)
        assert ours.items() == list(theirs.items()) and len(ours) == len(theirs)


def test_a_kelvin_sign_is_a_k_to_both() -> None:
    """The one way a name outside ASCII can equal an ASCII one under `str.lower()`; llhttp lets
    no such name in (tchar only), and both would match it alike."""
    pairs = [("Connection", "a"), ("\u212aeep-Alive", "b")]
    assert Headers(pairs).getall("keep-alive") == CIMultiDict(pairs).getall("keep-alive") == ["b"]
