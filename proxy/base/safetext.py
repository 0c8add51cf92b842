"""Text from outside, made safe to write on one log line or a terminal: the one escaping helper.

Owns: `UNSAFE`, the characters no log line and no printed report may hold raw: C0 and C1
controls and DEL (a newline starts a forged record; ESC and CSI, U+009B, drive a
terminal), Unicode format characters (bidi overrides such as U+202E reorder what a reader
sees; zero-width characters hide text), the line and paragraph separators U+2028/U+2029
(line breaks to many viewers and to `str.splitlines`), and lone surrogates; `one_line`, a
text with those escaped (`\\n`, `\\x1b`, `\\u202e`) and shortened to a bound; `json_line`,
a JSON-encoded line with those escaped as `\\uXXXX` (the JSON encoder leaves C1 controls,
DEL and format characters raw); `bounded`, a log field's value shortened (a 64 KiB kid, a
JWK Set of ten thousand kids) before it is logged.
Does not own: what is logged or printed (each module), nor the log formats (oplog.py,
accesslog.py), which apply these to everything they write: a token's header and claims, a
request's path and method, a JWKS or discovery server's content, an upstream's error text
and a config's values can all reach a log line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["FIELD_LIMIT", "ITEMS_LIMIT", "LINE_LIMIT", "UNSAFE", "bounded", "cut", "json_line", "one_line"]

# C0, DEL, C1; the format characters (Cf) a text can carry: soft hyphen, Arabic and Syriac
# marks, Mongolian vowel separator, zero-width and bidi controls (LRM/RLM, LRE..RLO,
# LRI..PDI), word joiner and invisible operators, BOM, interlinear annotation, tag
# characters; the line and paragraph separators; and surrogates (never text on their own).
UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]"
)

FIELD_LIMIT = 512
"""The longest string a log field holds (a longer one is cut, and says how much was cut)."""
ITEMS_LIMIT = 64
"""The most items a list (or members a mapping) a log field holds."""
LINE_LIMIT = 16384
"""The longest message a log line holds, whatever wrote it (a library's message included)."""

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def cut(text: str, limit: int) -> str:
    """`text`, or its first `limit` characters and how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit:,} more characters)"


def one_line(text: str, limit: int = LINE_LIMIT) -> str:
    """`text` on one line, every `UNSAFE` character escaped, at most `limit` characters of it kept."""
    text = cut(text, limit)
    return UNSAFE.sub(_escape, text) if UNSAFE.search(text) else text


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code >= 0x10000:  # a JSON escape is UTF-16: a surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def json_line(encoded: str) -> str:
    """A JSON text (`json.dumps(..., ensure_ascii=False)`) with every `UNSAFE` character escaped.

    Outside its strings a JSON text is ASCII punctuation, digits and words, so every such
    character is inside a string, where `\\uXXXX` is the same character: still valid JSON,
    and it decodes to the same value.
    """
    if encoded.isascii() and "\x7f" not in encoded:
        # The common line, in tens of nanoseconds (the access log writes one per request):
        # in ASCII the encoder's output can only hold DEL raw, as it escapes C0 controls.
        return encoded
    return UNSAFE.sub(_json_escape, encoded) if UNSAFE.search(encoded) else encoded


def bounded(value: Any, limit: int = FIELD_LIMIT, items: int = ITEMS_LIMIT) -> Any:
    """`value` (a log field) with its strings cut to `limit` characters and its lists and
    mappings to `items` entries (a cut list ends with a string saying how many were left
    out); numbers, booleans and None as they are."""
    if isinstance(value, str):
        return cut(value, limit)
    if isinstance(value, Mapping):
        kept = {str(k)[:limit]: bounded(v, limit, items) for k, v in list(value.items())[:items]}
        if len(value) > items:
            kept["..."] = f"{len(value) - items:,} more"
        return kept
    if isinstance(value, (list, tuple, set, frozenset)):
        listed = list(value)
        kept_items = [bounded(v, limit, items) for v in listed[:items]]
        if len(listed) > items:
            kept_items.append(f"...({len(listed) - items:,} more)")
        return kept_items
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return cut(str(value), limit)
