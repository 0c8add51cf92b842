"""Request paths: normalised once, then matched against the ordered route table.

Owns: RFC 3986 path normalisation (unreserved percent-escapes decoded, dot segments removed,
repeated slashes merged), the refusals that keep the router and the upstream from ever
disagreeing about a path (`%2F`, `%5C`, NUL, `\\`, `..;`, climbing above the root), and
`target` (split and normalise in one call, the normal form of a short path memoised), and
first-match routing (its answer for a short path memoised per router) (prefixes on whole segments, `ignore_case` folding the path for matching
only, as Java's and .NET's case-insensitive comparisons fold it: `_fold`). The normalised path is what the upstream receives. Does not own:
tokens, headers or the query string (kept exactly as sent).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

from ..base.errors import BadRequest, Reason
from ..base.memo import Memo
from .settings import Route

__all__ = ["Router", "normalize", "split_target", "target"]

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)
# Escapes that would let the upstream see a different path than the router did: an
# encoded slash or backslash is a separator to some servers and not to others.
_FORBIDDEN_BYTES = {0x2F: "%2F (an encoded /)", 0x5C: "%5C (an encoded \\)", 0x00: "%00 (NUL)"}
# Anything that could need work; a plain path like /api/v1/orders skips all of it.
_NEEDS_WORK = re.compile(r"[%;\\\x00-\x20\x7f]|//|/\.|\.$")


# The letters outside ASCII that case-insensitive upstreams fold onto ASCII ones: Java's
# equalsIgnoreCase (Spring) and .NET's OrdinalIgnoreCase (IIS) compare a character's upper
# and lower case, so İ (U+0130) and ı (U+0131) are i, ſ (U+017F) is s, the Kelvin sign
# (U+212A) is k, raw or (once the upstream decodes the path) percent-encoded in UTF-8.
# str.lower() leaves ı and ſ alone and makes İ two characters: `/adm%C4%B1n` would miss an
# ignore_case `/admin` route and reach the upstream's admin pages by a weaker route.
_RAW_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
_ESCAPED_FOLD = (("%c4%b0", "i"), ("%c4%b1", "i"), ("%c5%bf", "s"), ("%e2%84%aa", "k"))


def _fold(path: str) -> str:
    """A path as a case-insensitive upstream compares it, for ignore_case matching only."""
    folded = path.lower() if path.isascii() else path.translate(_RAW_FOLD).lower()
    if "%" in folded:
        for escaped, letter in _ESCAPED_FOLD:
            folded = folded.replace(escaped, letter)
    return folded


def _bad(detail: str) -> BadRequest:
    return BadRequest(Reason.BAD_PATH, detail)


def split_target(raw_target: str) -> tuple[str, str]:
    """(path, query) of an origin-form request target, the query exactly as sent.

    A `#` is refused outright: a request target has no fragment (RFC 9112 §3.2), and a client
    library would drop everything after it, so the upstream would see a shorter path than
    the router matched (`/admin#` routed as not-`/admin`, sent as `/admin`).
    """
    if "#" in raw_target:
        raise _bad("the request target holds a # (a fragment is never sent to a server)")
    path, _, query = raw_target.partition("?")
    return path, query


def target(raw_target: str) -> tuple[str, str]:
    """(normalised path, query as sent) of an origin-form request target: `split_target`, then
    `normalize`, in one call, with the normal form of a short path remembered (`_NORMAL`)."""
    if "#" in raw_target:
        raise _bad("the request target holds a # (a fragment is never sent to a server)")
    raw_path, _, query = raw_target.partition("?")
    path = _NORMAL.get(raw_path)
    if path is None:
        path = normalize(raw_path)  # raises for a path refused: nothing is remembered then
        if len(raw_path) <= _NORMAL_LONGEST:
            _NORMAL.remember(raw_path, path)
    return path, query


_NORMAL: Memo[str, str] = Memo(512)
"""`normalize`'s answer by raw path, for the paths requested lately (the same few come again and
again): a lookup costs a fraction of the check (bench/FIGURES.md, "The request side"). Paths are
the client's choice, hence the bound and the length limit: at most ~150 KB."""
_NORMAL_LONGEST = 128


def normalize(raw_path: str) -> str:
    """The canonical form of a raw (still percent-encoded) request path, or `BadRequest`."""
    if not raw_path.startswith("/"):
        raise _bad("the request target must be a path starting with /")
    if _NEEDS_WORK.search(raw_path) is None:
        return raw_path
    if any(ch in raw_path for ch in "\\\x00") or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in raw_path):
        raise _bad("the path holds a backslash, a space or a control character")
    path = _decode_unreserved(raw_path) if "%" in raw_path else raw_path
    segments = path.split("/")[1:]
    kept: list[str] = []
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if not kept:
                raise _bad("a dot segment climbs above the root")
            kept.pop()
            continue
        if ";" in seg:
            # Path parameters: `/admin;x/users` passes an `/admin/` prefix here, but Tomcat
            # and Spring read it as `/admin/users`, and `..;/` as `..`. Refuse, don't guess.
            raise _bad("a path segment holds ; (path parameters are refused)")
        kept.append(seg)
    result = "/" + "/".join(kept)
    # RFC 3986 §5.2.4: "/a/b/" stays a directory, and so does "/a/b/.." → "/a/".
    if kept and segments[-1] in ("", ".", ".."):
        result += "/"
    return result


def _decode_unreserved(path: str) -> str:
    """Decode escapes of unreserved characters (RFC 3986 §6.2.2.2), upper-case the rest."""
    out: list[str] = []
    i = 0
    while i < len(path):
        ch = path[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        digits = path[i + 1 : i + 3]
        if len(digits) != 2 or not _HEX.issuperset(digits):
            raise _bad("a malformed percent-escape")
        byte = int(digits, 16)
        if byte in _FORBIDDEN_BYTES:
            raise _bad(f"the path holds {_FORBIDDEN_BYTES[byte]}")
        decoded = chr(byte)
        out.append(decoded if decoded in _UNRESERVED else "%" + digits.upper())
        i += 3
    return "".join(out)


class Router:
    """The ordered route table: the first route whose path and method match wins.

    `path_prefix` matches whole segments, as Envoy's `path_separated_prefix`: `/admin` and
    `/admin/` both cover `/admin` and `/admin/...`, never `/administrator` (a prefix that
    stops mid-segment let `/admin` fall through to a weaker route). `/` covers every path.
    `ignore_case` folds the path for matching only; the upstream still gets it as sent.
    """

    __slots__ = ("_fold", "_matched", "_table", "routes")

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        # Per route, what `match` compares, worked out once: (kind, methods, value, value + "/"
        # or a pattern, fold, route). Kinds: 0 every path, 1 segment prefix, 2 exact, 3 regex.
        # `value` is a str for kinds 0-2 and a compiled pattern for kind 3 (Any: `match` tells
        # them apart by kind, which costs nothing, where a cast or an isinstance would).
        table: list[tuple[int, frozenset[str] | None, Any, str, bool, Route]] = []
        for route in self.routes:
            m = route.match
            fold = m.ignore_case
            if m.path_prefix is not None:
                base = m.path_prefix.rstrip("/")
                base = base.lower() if fold else base
                table.append(
                    (1, m.methods, base, base + "/", fold, route) if base else (0, m.methods, "", "", False, route)
                )
            elif m.path_exact is not None:
                table.append((2, m.methods, m.path_exact.lower() if fold else m.path_exact, "", fold, route))
            elif m.path_regex is not None:
                pattern = m.path_regex
                if fold and not pattern.flags & re.IGNORECASE:
                    pattern = re.compile(pattern.pattern, pattern.flags | re.IGNORECASE)
                # The regex sees the folded path (escaped ı, ſ... as their ASCII letters),
                # IGNORECASE doing the rest of the folding; without ignore_case, the path.
                table.append((3, m.methods, pattern, "", fold, route))
        self._table = tuple(table)
        self._fold = any(entry[4] for entry in table)
        self._matched: Memo[tuple[str, str], Route] = Memo(512)
        """`match`'s route by (method, path), for the paths of at most 128 characters requested
        lately (as `_NORMAL`: the client's choice, hence the bound): a lookup instead of a walk
        of the table (bench/FIGURES.md, "The 401 from the head"). A 404 is not remembered."""

    def match(self, method: str, path: str) -> Route | None:
        """The route for a normalised path, or None (a 404)."""
        key = (method, path)
        route = self._matched.get(key)
        if route is None:
            route = self._walk(method, path)
            if route is not None and len(path) <= _NORMAL_LONGEST:
                self._matched.remember(key, route)
        return route

    def _walk(self, method: str, path: str) -> Route | None:
        folded = _fold(path) if self._fold else path
        for kind, methods, value, below, fold, route in self._table:
            if methods is not None and method not in methods:
                continue
            if kind == 1:
                p = folded if fold else path
                if p == value or p.startswith(below):
                    return route
            elif kind == 0:
                return route
            elif kind == 2:
                if (folded if fold else path) == value:
                    return route
            elif value.search(folded if fold else path) is not None:
                return route
        return None
