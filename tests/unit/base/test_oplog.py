"""oplog: the JSON and text formats of the operator log, its events, and README's list of them.

The in-process tests write through the handler `server.configure_logging` installs (root
logger swapped out for the test); the README and source checks keep the list of events, the
code that logs them, and the README's table the same set.
"""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.base import oplog
from proxy.base.logthrottle import RepeatFilter
from proxy.config import builder as config
from proxy.ops import server
from proxy.tools.cli import build_parser
from tests.conftest import FakeClock

REPO = Path(__file__).parents[3]
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Captured:
    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def lines(self) -> list[str]:
        lines = self.stream.getvalue().splitlines()
        self.stream.seek(0)
        self.stream.truncate()
        return lines

    def json(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[callable]:  # type: ignore[valid-type]
    """`configure(format, level)`: server.configure_logging onto a fresh root, stderr captured."""
    root, aiohttp_server = logging.getLogger(), logging.getLogger("aiohttp.server")
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(aiohttp_server, "filters", list(aiohttp_server.filters))
    stream = io.StringIO()

    def configure(log_format: str, level: str = "DEBUG") -> Captured:
        # Here, not above: pytest puts its capturing handlers on the root, and its own
        # stderr in place, after fixtures run.
        monkeypatch.setattr(root, "handlers", [])
        monkeypatch.setattr("sys.stderr", stream)
        server.configure_logging(level, log_format)
        return Captured(stream)

    yield configure
    for handler in root.handlers:
        handler.close()


def test_json_lines_carry_time_level_logger_event_message_and_the_fields(configured) -> None:  # type: ignore[no-untyped-def]
    logs = configured("json")
    oplog.event(
        logging.getLogger("jwt_sidecar.keys"),
        logging.INFO,
        "keys_loaded",
        "provider %(provider)s: %(keys)d key(s)",
        provider="main",
        keys=2,
        kids_added=["k2"],
        duration_ms=12.5,
        url="https://issuer.example/jwks.json",
    )
    [line] = logs.json()
    assert list(line)[:5] == ["time", "level", "logger", "event", "message"]
    assert RFC3339_UTC.fullmatch(str(line["time"]))
    assert line == {
        "time": line["time"],
        "level": "INFO",
        "logger": "jwt_sidecar.keys",
        "event": "keys_loaded",
        "message": "provider main: 2 key(s)",
        "provider": "main",
        "keys": 2,
        "kids_added": ["k2"],
        "duration_ms": 12.5,
        "url": "https://issuer.example/jwks.json",
    }


def test_text_stays_the_sentence_the_log_has_always_had(configured) -> None:  # type: ignore[no-untyped-def]
    logs = configured("text")
    oplog.event(
        logging.getLogger("jwt_sidecar.keys"),
        logging.WARNING,
        "key_fetch_failed",
        "provider %(provider)s: key fetch failed: %(cause)s",
        provider="main",
        cause="connection refused",
    )
    [line] = logs.lines()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING jwt_sidecar.keys: "
        r"provider main: key fetch failed: connection refused",
        line,
    ), line


def test_the_suppressed_count_is_a_field_and_not_in_the_json_message(configured, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    logs = configured("json")
    [handler] = logging.getLogger().handlers
    [repeat] = [f for f in handler.filters if isinstance(f, RepeatFilter)]
    handler.removeFilter(repeat)
    handler.addFilter(RepeatFilter(clock=clock))  # the same filter, on the test's clock
    log = logging.getLogger("jwt_sidecar.test")
    for _ in range(5):
        oplog.event(log, logging.WARNING, "key_fetch_failed", "provider %(provider)s down", provider="main")
    clock.advance(1)
    oplog.event(log, logging.WARNING, "key_fetch_failed", "provider %(provider)s down", provider="main")
    first, counted = logs.json()
    assert "suppressed" not in first
    assert counted["suppressed"] == 4 and counted["message"] == "provider main down"
    assert counted["provider"] == "main" and counted["event"] == "key_fetch_failed"


def test_each_provider_is_throttled_on_its_own(configured, clock: FakeClock) -> None:  # type: ignore[no-untyped-def]
    # Six providers down at once: six lines a second, not the first provider's alone.
    logs = configured("json")
    [handler] = logging.getLogger().handlers
    handler.filters[:] = [RepeatFilter(clock=clock)]
    log = logging.getLogger("jwt_sidecar.test")
    for _ in range(3):
        for name in ("a", "b", "c"):
            oplog.event(log, logging.WARNING, "key_fetch_failed", "provider %(provider)s down", provider=name)
    assert [line["provider"] for line in logs.json()] == ["a", "b", "c"]


def test_a_traceback_stays_inside_its_one_line(configured) -> None:  # type: ignore[no-untyped-def]
    logs = configured("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        oplog.event(
            logging.getLogger("jwt_sidecar"),
            logging.ERROR,
            "request_crashed",
            "request %(request_id)s failed unexpectedly",
            request_id="r1",
            exc_info=True,
        )
    [text] = logs.lines()
    line = json.loads(text)
    assert line["message"] == "request r1 failed unexpectedly"
    assert line["traceback"].startswith("Traceback") and line["traceback"].endswith("RuntimeError: boom")


def test_a_library_line_is_json_too_with_a_library_event(configured) -> None:  # type: ignore[no-untyped-def]
    logs = configured("json")
    logging.getLogger("asyncio").error("Task exception was never retrieved: %s", "x")
    [line] = logs.json()
    assert line["event"] == "library_message" and line["logger"] == "asyncio"
    assert line["message"] == "Task exception was never retrieved: x"


def test_a_field_never_replaces_a_member_of_the_line(configured) -> None:  # type: ignore[no-untyped-def]
    logs = configured("json")
    oplog.event(logging.getLogger("jwt_sidecar"), logging.INFO, "stopped", "stopped", level="oops", time="t")
    [line] = logs.json()
    assert line["level"] == "INFO" and line["field_level"] == "oops" and line["field_time"] == "t"


def test_the_level_filters(configured) -> None:  # type: ignore[no-untyped-def]
    logs = configured("json", "WARNING")
    log = logging.getLogger("jwt_sidecar")
    oplog.event(log, logging.INFO, "stopped", "stopped")
    oplog.event(log, logging.WARNING, "config_missing", "gone %(file)s", file="c.yaml")
    assert [line["event"] for line in logs.json()] == ["config_missing"]


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            assert oplog.resolve_format("auto", terminal) == "text"
    finally:
        os.close(leader)
        os.close(follower)
    assert oplog.resolve_format("auto", io.StringIO()) == "json"
    assert oplog.resolve_format("text", io.StringIO()) == "text"
    assert oplog.resolve_format("json", io.StringIO()) == "json"


# -- the settings -----------------------------------------------------------------------------

BASE = """
providers:
  main: {issuer: https://issuer.test, audiences: [api], jwks: {url: https://issuer.test/jwks.json}}
routes:
  - {match: {path_prefix: /}, auth: {provider: main}}
"""


def test_log_format_and_log_level_default_to_text_and_info() -> None:
    settings = config.parse(BASE)
    assert (settings.log_format, settings.log_level) == ("text", "INFO")
    settings = config.parse(BASE + "log_format: json\nlog_level: debug\n")
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    settings = config.parse(BASE + "log_format: JSON\nlog_level: Warning\n")
    assert (settings.log_format, settings.log_level) == ("json", "WARNING")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("log_format: yaml", "log_format: 'yaml' is not one of text, json, auto"),
        ("log_format: jsonl", "log_format: 'jsonl' is not one of text, json, auto"),
        ("log_level: verbose", "log_level: 'verbose' is not one of DEBUG, INFO, WARNING, ERROR"),
        ("log_level: [INFO]", "log_level: "),
    ],
)
def test_a_wrong_log_setting_names_its_line(line: str, problem: str) -> None:
    with pytest.raises(config.ConfigError) as refused:
        config.parse(BASE + line + "\n", file="c.yaml")
    [issue] = refused.value.issues
    assert str(issue).startswith(f"c.yaml:{BASE.count(chr(10)) + 1}: {problem}"), str(issue)


def test_run_takes_log_format_and_log_level_options() -> None:
    args = build_parser().parse_args(["run", "--log-format", "json", "--log-level", "debug"])
    assert (args.log_format, args.log_level) == ("json", "DEBUG")
    args = build_parser().parse_args(["run"])
    assert (args.log_format, args.log_level) == (None, None)  # then the config's


# -- README and code agree --------------------------------------------------------------------


def readme_events() -> dict[str, frozenset[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Operator log\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([A-Z, ]+) \| .+ \|$", section, re.MULTILINE)
    return {name: frozenset(level.strip() for level in levels.split(",")) for name, levels in rows}


def test_the_readme_lists_every_event_at_its_levels() -> None:
    assert readme_events() == {name: levels for name, (levels, _) in oplog.EVENTS.items()}


def event_calls() -> list[tuple[str, int, str, str | None]]:
    """(file, line, event name, level name or None when computed) of every `event(...)` in proxy/."""
    found = []
    for path in sorted((REPO / "proxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name != "event" or len(node.args) < 4 or path.name == "oplog.py":
                continue
            level, event = node.args[1], node.args[2]
            assert isinstance(event, ast.Constant), f"{path.name}:{node.lineno}: the event name must be literal"
            level_name = level.attr if isinstance(level, ast.Attribute) else None
            found.append((path.name, node.lineno, event.value, level_name))
    return found


def test_every_event_logged_is_listed_at_the_level_it_is_logged_at() -> None:
    calls = event_calls()
    assert len(calls) > 30
    for file, line, name, level in calls:
        assert name in oplog.EVENTS, f"{file}:{line}: {name} is not in oplog.EVENTS"
        if level is not None:
            assert level in oplog.EVENTS[name][0], f"{file}:{line}: {name} at {level}"
    assert {name for _, _, name, _ in calls} == set(oplog.EVENTS), "an event listed that nothing logs"


def test_the_package_logs_only_through_events() -> None:
    # A bare `log.warning(...)` would be a JSON line without an event of its own.
    bare = []
    for path in sorted((REPO / "proxy").rglob("*.py")):
        if path.name == "oplog.py" or path.relative_to(REPO).as_posix() == "proxy/http/log.py":
            continue  # the two places that call the logger itself (oplog.event through http/log.py)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("debug", "info", "warning", "error", "exception", "critical", "log")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("log", "_log", "logger")
            ):
                bare.append(f"{path.name}:{node.lineno}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("debug", "info", "warning", "error", "exception", "critical")
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr == "_log"
            ):
                bare.append(f"{path.name}:{node.lineno}")
    assert bare == [], "log through oplog.event"


def test_the_readme_example_line_has_the_members_the_code_writes() -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("\n### Operator log\n", 1)[1].split("\n#", 1)[0]
    example = json.loads(section.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert list(example)[:5] == ["time", "level", "logger", "event", "message"]
    assert RFC3339_UTC.fullmatch(example["time"])
    name = example["event"]
    assert example["level"] in oplog.EVENTS[name][0]
    written = set()
    for path in sorted((REPO / "proxy").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and len(node.args) >= 4
                and isinstance(node.args[2], ast.Constant)
                and node.args[2].value == name
            ):
                written |= {keyword.arg for keyword in node.keywords if keyword.arg != "exc_info"}
    assert set(list(example)[5:]) == written


def test_values_from_the_network_stay_inside_their_member(configured) -> None:  # type: ignore[no-untyped-def]
    # A kid is the token's to choose: newlines, quotes, percent signs and a lone surrogate
    # must neither start a line of their own nor break the JSON or the %-formatting.
    logs = configured("json")
    awkward = 'k"1\n{"level":"ERROR"}%s %(x)s\ud800'
    oplog.event(
        logging.getLogger("jwt_sidecar"),
        logging.DEBUG,
        "request_refused",
        "request %(request_id)s refused: %(reason)s: %(detail)s",
        request_id="r",
        reason="unknown_kid",
        detail=f"no key with kid {awkward!r}",
        kid=awkward,
    )
    [text] = logs.lines()
    line = json.loads(text)
    assert line["kid"] == awkward and line["detail"] == f"no key with kid {awkward!r}"
    logs = configured("text")
    oplog.event(
        logging.getLogger("jwt_sidecar"),
        logging.DEBUG,
        "request_refused",
        "request %(request_id)s refused: %(reason)s: %(detail)s",
        request_id="r",
        reason="unknown_kid",
        detail=f"no key with kid {awkward!r}",
    )
    assert len(logs.lines()) == 1


def test_a_python_warning_is_a_json_line_too(configured) -> None:  # type: ignore[no-untyped-def]
    import warnings

    logging.captureWarnings(False)  # an earlier configure_logging in this process may have left it on
    logs = configured("json")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("an old API", DeprecationWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    [line] = logs.json()
    assert line["logger"] == "py.warnings" and line["event"] == "library_message" and "an old API" in line["message"]


def test_every_placeholder_of_an_event_message_is_one_of_its_fields() -> None:
    # A placeholder without its field is a "--- Logging error ---" traceback on stderr at
    # run time, in the middle of the JSON lines, and the event itself is lost.
    for path in sorted((REPO / "proxy").rglob("*.py")):
        if path.name == "oplog.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and len(node.args) >= 4
                and isinstance(node.args[2], ast.Constant)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "event"
            ):
                continue
            texts = [
                n.value for n in ast.walk(node.args[3]) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            ]
            placeholders = {name for text in texts for name in re.findall(r"%\((\w+)\)", text)}
            fields = {keyword.arg for keyword in node.keywords}
            if None in fields:  # **fields: checked where the dict is built
                continue
            assert placeholders <= fields, f"{path.name}:{node.lineno}: {placeholders - fields} have no field"
            bare = [text for text in texts if re.search(r"%[^(%]", text)]
            assert not bare, f"{path.name}:{node.lineno}: a %-placeholder without a name: {bare}"
