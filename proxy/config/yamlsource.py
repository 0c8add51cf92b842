"""YAML read with line numbers, refusing duplicate keys, and a reader that reports every mistake.

Owns: turning YAML text into plain dicts and lists that remember the line of each value, and
`Section`, the typed getter that `config/builder.py` walks with: each getter records the dotted path,
so every problem becomes a `ConfigIssue` naming file, line, path, bad value and what was
expected. Unknown keys are found by `Section.done()` (the keys nobody asked for), with the key
each most likely meant; an "is required" error that a misspelt key explains is taken back, so
one mistake is one error. A scalar where a list belongs is refused (`Section.string_list`).
Does not own: what the keys mean (config/builder.py does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import yaml

from ..base.errors import ConfigError, ConfigIssue

__all__ = [
    "Issues",
    "Section",
    "closest",
    "describe",
    "did_you_mean",
    "list_example",
    "load_yaml",
    "parse_duration",
    "parse_size",
]

T = TypeVar("T")
_MISSING: Any = object()


class _Map(dict[Any, Any]):
    """A YAML mapping that remembers its own line and each value's line."""

    __slots__ = ("line", "lines")
    line: int
    lines: dict[Any, int]


class _Seq(list[Any]):
    __slots__ = ("line", "lines")
    line: int
    lines: list[int]


class _Loader(yaml.SafeLoader):
    """SafeLoader (no arbitrary objects) that keeps line numbers and refuses duplicate keys."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    mapping = _Map()
    mapping.line = node.start_mark.line + 1
    mapping.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain scalar", key_node.start_mark
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        # The key's line: for a nested block the value starts a line later, but users look
        # for the key.
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    seq = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    seq.line = node.start_mark.line + 1
    seq.lines = [child.start_mark.line + 1 for child in node.value]
    return seq


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(text: str, file: str) -> Any:
    """Parse YAML text; a syntax error or duplicate key raises `ConfigError` with its line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        message = " ".join(str(p) for p in (error.context, error.problem) if p)
        hint = _syntax_hint(text, error.problem_mark)
        raise ConfigError([ConfigIssue(file, line, "", f"invalid YAML: {message}{hint}")]) from None
    except yaml.YAMLError as error:
        raise ConfigError([ConfigIssue(file, None, "", f"invalid YAML: {error}")]) from None


def _syntax_hint(text: str, mark: Any) -> str:
    """The fix for two puzzling syntax errors: a tab in the indentation, and a `${VAR}` unquoted
    inside `{ }` or `[ ]` (YAML reads its `{` as the start of a mapping)."""
    if mark is None:
        return ""
    lines = text.splitlines()
    if mark.line >= len(lines):
        return ""
    if lines[mark.line][mark.column : mark.column + 1] == "\t":
        return "; indent with spaces: YAML does not allow tabs"
    found = _ENV.match(lines[mark.line], max(mark.column - 1, 0))
    if found is None:
        return ""
    return f'; inside {{ }} or [ ], a value holding {found.group()} must be quoted, e.g. "{found.group()}"'


class Issues:
    """Collects every problem found in one file, so a user fixes them all in one pass."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[ConfigIssue] = []

    def add(self, line: int | None, path: str, message: str) -> ConfigIssue:
        issue = ConfigIssue(self.file, line, path, message)
        self.items.append(issue)
        return issue

    def retract(self, issue: ConfigIssue) -> None:
        """Take back an issue that a clearer one explains (a required key that is only misspelt)."""
        if issue in self.items:
            self.items.remove(issue)

    def raise_if_any(self) -> None:
        if self.items:
            # In file order, so the list reads top to bottom like the file (sort is stable).
            raise ConfigError(sorted(self.items, key=lambda issue: issue.line or 0))


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_duration(value: Any) -> float:
    """`30s`, `5m`, `1h30m`, `250ms`, or a plain number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        parts = list(_DURATION_PART.finditer(text))
        if parts and "".join(p.group(0) for p in parts) == text:
            return sum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)
    raise ValueError


def parse_size(value: Any) -> int:
    """`10MB`, `512KiB`, or a plain number of bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()]
    raise ValueError


def describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"  # as the user wrote it, not Python's True
    return repr(value)


def _quoted_hint(value: Any, convert: Callable[[Any], Any]) -> str:
    """`"8080"` or `"true"` in quotes is text: say so when the unquoted value would do."""
    if not isinstance(value, str):
        return ""
    try:
        unquoted = yaml.safe_load(value)
        if isinstance(unquoted, str):
            return ""
        convert(unquoted)
    except (ValueError, TypeError, RecursionError, yaml.YAMLError):
        return ""
    return " (it is in quotes, so it is text: write it without quotes)"


_DURATION_WORDS = re.compile(
    r"(\d+(?:\.\d+)?)\s*(milliseconds?|millis|msecs?|ms|seconds?|secs?|minutes?|mins?|hours?|hrs?|days?|[smhd])",
    re.IGNORECASE,
)


def _unit(word: str) -> str:
    word = word.lower()
    return "ms" if word.startswith(("mil", "ms")) else word[0]


def _duration_hint(value: Any) -> str:
    """`5 min`, `30 seconds`: suggest the spelling that is understood (5m, 30s)."""
    if not isinstance(value, str):
        return ""
    parts = list(_DURATION_WORDS.finditer(value))
    if not parts or "".join(p.group(0) for p in parts).replace(" ", "") != value.replace(" ", ""):
        return ""
    return f"; write {''.join(p.group(1) + _unit(p.group(2)) for p in parts)}"


def list_example(value: Any, fallback: str) -> str:
    """A YAML flow list of the words given where a list belongs: `admin ops` → [admin, ops]."""
    items = value if isinstance(value, list) else [value]
    if all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
        words = [w for v in items for w in re.split(r"[\s,]+", str(v)) if w]
        if words:
            return yaml.safe_dump(words, default_flow_style=True, width=1 << 16).strip()
    return fallback


class Section:
    """One YAML mapping being read; getters mark keys as known and report problems."""

    def __init__(self, issues: Issues, data: Any, path: str, line: int | None = None) -> None:
        self.issues = issues
        self.path = path
        self.line = line if line is not None else getattr(data, "line", None)
        self.data: dict[Any, Any] = data if isinstance(data, dict) else {}
        self._lines: dict[Any, int] = getattr(data, "lines", {})
        self._known: list[str] = []
        # Errors for a missing required key, taken back by `done()` when the key is only
        # misspelt: "audience: unknown key; did you mean audiences?" says it all, once.
        self._missing: dict[str, ConfigIssue] = {}

    # -- where things are ---------------------------------------------------------------
    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def line_of(self, key: str) -> int | None:
        return self._lines.get(key, self.line)

    def error(self, key: str | None, message: str) -> None:
        if key is None:
            self.issues.add(self.line, self.path, message)
        else:
            self.issues.add(self.line_of(key), self.at(key), message)

    def missing(self, keys: str | tuple[str, ...], message: str, *, at: str | None = None) -> None:
        """Report that a required key (or one of `keys`) is absent; `at` names the key in the path."""
        issue = (
            self.issues.add(self.line_of(at), self.at(at), message)
            if at is not None
            else self.issues.add(self.line, self.path, message)
        )
        for key in (keys,) if isinstance(keys, str) else keys:
            self._missing[key] = issue

    def has(self, key: str) -> bool:
        return key in self.data

    def keys(self) -> Iterator[str]:
        return iter(self.data)

    # -- getters ------------------------------------------------------------------------
    def raw(self, key: str, default: Any = None) -> Any:
        self._known.append(key)
        return self.data.get(key, default)

    def _typed(self, key: str, default: Any, required: bool, convert: Callable[[Any], T], expected: str) -> T | Any:
        self._known.append(key)
        if key not in self.data or self.data[key] is None:
            if required:
                self.missing(key, f"is required: {expected}", at=key)
            return default
        value = self.data[key]
        try:
            return convert(value)
        except _MissingEnv as missing:
            for name in missing.names:  # one error per variable, none after it for the same value
                self.error(key, f"environment variable {name} is not set")
            return default
        except ValueError as problem:
            # A converter may say exactly what is wrong; else the form.
            self.error(key, str(problem) or f"{describe(value)} is not {expected}{_quoted_hint(value, convert)}")
            return default

    def string(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        return self._typed(key, default, required, self._expand, "a string")

    def strings(self, key: str, default: tuple[str, ...] = (), *, required: bool = False) -> tuple[str, ...]:
        """A string or a list of strings, as a tuple (only where one value is the usual case: `issuer`)."""

        def convert(value: Any) -> tuple[str, ...]:
            items = value if isinstance(value, list) else [value]
            return tuple(self._expand(item) for item in items)

        result = self._typed(key, default, required, convert, "a string or a list of strings")
        if required and self.data.get(key) == []:
            self.error(key, "must not be empty")
        return result

    def string_list(
        self, key: str, noun: str, example: str, default: tuple[str, ...] = (), *, required: bool = False
    ) -> tuple[str, ...]:
        """A YAML list of strings, as a tuple. A scalar is refused, naming the list it was meant as.

        `methods: GET POST` or `all_of: admin ops` is one string that no request or token could
        ever carry; read as one item, it would silently never match, so it is an error.
        `noun` and `example` make the message: "must be a list of scopes, e.g. [admin, ops]".
        """
        self._known.append(key)
        value = self.data.get(key)
        if value is None:
            if required:
                self.missing(key, f"is required: a list of {noun}, e.g. {example}", at=key)
            return default
        if not isinstance(value, list):
            self.error(key, f"must be a list of {noun}, e.g. {list_example(value, example)}")
            return default
        if required and not value:
            self.error(key, f"must not be empty: a list of {noun}, e.g. {example}")
            return default
        lines = getattr(value, "lines", [self.line_of(key)] * len(value))
        found: list[str] = []
        for i, item in enumerate(value):
            try:
                found.append(self._expand(item))
            except _MissingEnv as missing:
                for name in missing.names:
                    self.issues.add(lines[i], f"{self.at(key)}[{i}]", f"environment variable {name} is not set")
            except ValueError:
                self.issues.add(
                    lines[i],
                    f"{self.at(key)}[{i}]",
                    f"{describe(item)} cannot be an item here: each item is one value, e.g. {example}",
                )
        return tuple(found) if len(found) == len(value) else default

    def boolean(self, key: str, default: bool, *, required: bool = False) -> bool:
        def convert(value: Any) -> bool:
            if not isinstance(value, bool):
                raise ValueError
            return value

        return self._typed(key, default, required, convert, "true or false")

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        def convert(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError
            return value

        return self._typed(key, default, False, convert, f"a whole number ≥ {minimum}")

    def duration(self, key: str, default: Any, *, required: bool = False) -> Any:
        def convert(value: Any) -> float:
            seconds = parse_duration(value)
            if seconds < 0:
                raise ValueError
            return seconds

        expected = "a duration like 30s, 5m, 1h or 250ms" + _duration_hint(self.data.get(key))
        return self._typed(key, default, required, convert, expected)

    def size(self, key: str, default: int) -> int:
        return self._typed(key, default, False, parse_size, "a size like 10MB, 512KiB or 1024")

    def section(
        self, key: str, *, required: bool = False, example: str = "", meant: Callable[[Any], str] | None = None
    ) -> Section | None:
        """A nested mapping; `example` (like `{path_prefix: /}`) is shown when it is missing or not one.

        `meant` turns a value given in place of the mapping into the mapping it was likely
        meant as (`upstream: http://u` → `{url: http://u}`), or "" when there is none.
        """
        self._known.append(key)
        value = self.data.get(key)
        e_g = f", e.g. {example}" if example else ""
        if value is None:
            if required:
                self.missing(key, f"is required: a mapping{e_g}", at=key)
            return None
        if not isinstance(value, dict):
            guess = meant(value) if meant is not None else ""
            fix = f": write {key}: {guess}" if guess else (e_g or " of keys and values")
            self.error(key, f"{describe(value)} is not a mapping{fix}")
            return None
        return Section(self.issues, value, self.at(key), self.line_of(key))

    def items(self, key: str, noun: str = "items", example: str = "") -> list[tuple[int, Any, str, int | None]]:
        """The entries of a list: (index, value, dotted path, line)."""
        self._known.append(key)
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            e_g = f", e.g. {example}" if example else ""
            self.error(key, f"must be a list of {noun}{e_g}; found {describe(value)}")
            return []
        lines = getattr(value, "lines", [self.line_of(key)] * len(value))
        return [(i, item, f"{self.at(key)}[{i}]", lines[i]) for i, item in enumerate(value)]

    def done(self) -> None:
        """Report every key nobody asked for, naming the ones that are allowed.

        A misspelt key gets "did you mean …?"; when it is the spelling of a required key that is
        missing, the "is required" error is taken back: one mistake, one error.
        """
        allowed = sorted(set(self._known) | set(self._missing))
        for key in self.data:
            if key in self._known:
                continue
            # A key YAML read as a boolean or number (`yes:`, `on:`, `1:`) is shown as written.
            spelled = str(key) if isinstance(key, str) else describe(key).strip("'")
            guess = closest(spelled, allowed) if isinstance(key, str) else None
            if guess is not None and guess in self._missing:
                self.issues.retract(self._missing[guess])
            self.issues.add(
                self._lines.get(key, self.line),
                self.at(spelled),
                f"unknown key; {did_you_mean(guess)}allowed here: {', '.join(allowed)}",
            )

    def _expand(self, value: Any) -> str:
        """A scalar as a string, with `${VAR}` replaced from the environment."""
        if isinstance(value, (dict, list)) or value is None or isinstance(value, bool):
            raise ValueError
        text = str(value)

        unset = [name for name in dict.fromkeys(_ENV.findall(text)) if name not in os.environ]
        if unset:
            raise _MissingEnv(unset)
        return _ENV.sub(lambda match: os.environ[match.group(1)], text)


class _MissingEnv(ValueError):
    """Every unset variable of one value, so each gets its own error."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names


def closest(key: str, allowed: Iterable[str]) -> str | None:
    """The allowed name a misspelt one most likely meant (case, - for _, a letter or two, two swapped)."""
    folded = {a.lower().replace("-", "_"): a for a in allowed}
    plain = key.lower().replace("-", "_")
    if plain in folded:
        return folded[plain]
    import difflib  # (here: only a config with a mistake needs it; ~0.2 MiB of every running process)

    close = difflib.get_close_matches(plain, list(folded), n=1, cutoff=0.75)
    if close:
        return folded[close[0]]
    # Short names swap letters (`evn`, `kdi`) far below any useful ratio: same letters, reordered.
    swapped = [a for f, a in folded.items() if len(plain) >= 3 and sorted(f) == sorted(plain)]
    return swapped[0] if len(swapped) == 1 else None


def did_you_mean(guess: str | None) -> str:
    """The words that offer `guess` (from `closest`) before the rest of a message; none without one."""
    return f"did you mean {guess}? " if guess is not None else ""
