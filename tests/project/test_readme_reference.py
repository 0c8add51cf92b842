"""README.md's commands, options and config tables, compared with the code so they cannot drift.

- Every `jwt-sidecar …` command line in the README's shell blocks and `$ jwt-sidecar` examples
  parses with the real parser (its options exist, their values are accepted).
- Each command has its README section, and every option of a command is named there; the
  value lists the README gives (`--alg` of `keys generate`, `--secret-encoding`, log formats
  and levels) are the code's.
- Every key the config accepts (read from the config's own "unknown key; allowed here: …"
  error, so nothing is listed twice) is documented in "Configuration", every key a config
  table names exists, and every single-valued default in those tables is the code's default:
  a config that sets the key to the README's default loads to the same settings as one that
  leaves it out.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from proxy.base import oplog
from proxy.base.errors import ConfigError
from proxy.config import builder as config
from proxy.tools.cli import build_parser
from proxy.tools.keygen import GENERATE_ALGORITHMS, SECRET_ENCODINGS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def section(heading: str) -> str:
    """From `heading` (a whole line) to the next heading of the same or a higher level (a
    `# comment` line inside a code block is no heading)."""
    lines = README.splitlines(keepends=True)
    start = lines.index(heading + "\n")
    level = len(heading.split(" ", 1)[0])
    fenced = False
    for end in range(start + 1, len(lines)):
        fenced ^= lines[end].startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[end]):
            return "".join(lines[start:end])
    return "".join(lines[start:])


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    return dict(found[0].choices) if found else {}


def commands(parser: argparse.ArgumentParser | None = None, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command: {"run": parser, "keys generate": parser, ...}."""
    parser = parser or build_parser()
    leaves: dict[str, argparse.ArgumentParser] = {}
    for name, sub in subparsers(parser).items():
        full = f"{prefix}{name}"
        leaves.update(commands(sub, full + " ") if subparsers(sub) else {full: sub})
    return leaves


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}  # noqa: SLF001


# -- command lines ------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block, fences paired in order."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(body)))
                language = None
        elif language is not None:
            body.append(line)
    return blocks


def prose(text: str) -> str:
    """`text` without its fenced code blocks."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)


def readme_command_lines() -> list[str]:
    """Each `jwt-sidecar …` invocation in a shell block, or after a `$ ` prompt in any block,
    continuation lines joined, up to a comment or the `)` that closes `$(...)`."""
    found = []
    for language, body in fenced_blocks(README):
        for line in body.replace("\\\n", " ").splitlines():
            start = line.find("jwt-sidecar ")
            before = line[:start].strip()
            if start < 0 or not (
                before == "$"
                or (
                    language == "sh"
                    and (before in ("", "TOKEN=$(") or before.endswith(("&&", "/.venv/bin/", ".venv/bin/")))
                )
            ):
                continue
            command = re.split(r"\s#\s|\s{3,}#", line[start:])[0]
            depth = 0
            for i, char in enumerate(command):  # drop the `)` closing `TOKEN=$(`
                depth += {"(": 1, ")": -1}.get(char, 0)
                if depth < 0:
                    command = command[:i]
                    break
            found.append(command.strip())
    return found


def test_the_readme_shows_a_command_line_for_every_command() -> None:
    lines = readme_command_lines()
    shown = {
        name
        for name in commands()
        if any(line.startswith(f"jwt-sidecar {name} ") or line == f"jwt-sidecar {name}" for line in lines)
    }
    assert shown == set(commands())


@pytest.mark.parametrize("line", readme_command_lines())
def test_every_readme_command_line_parses(line: str) -> None:
    # argparse runs each option's type (a duration, a port, a time) too; an error is raised.
    build_parser().parse_args(shlex.split(line)[1:])


# -- each command, its section, its options ------------------------------------------------

# Where the README documents each command.
SECTIONS = {
    "run": ("## Running it", "### Operator log"),
    "demo": ("## The two commands",),
    "check-config": ("### `jwt-sidecar check-config [FILE]`",),
    "keys generate": ("### `jwt-sidecar keys generate`",),
    "token mint": ("### `jwt-sidecar token mint`",),
    "token explain": ("### `jwt-sidecar token explain TOKEN [--config FILE] [--provider NAME | --route NAME]`",),
    "revoke": ("### `jwt-sidecar revoke [--jti ID | --sub SUB | --before TIME | --list] --config FILE`",),
}


def test_every_command_has_its_readme_section() -> None:
    assert set(SECTIONS) == set(commands())
    tools = section("## Operator tools")
    headings = {
        re.match(r"### `jwt-sidecar ([a-z -]+?)(?: [A-Z\[]|`)", h).group(1)  # type: ignore[union-attr]
        for h in re.findall(r"^### `jwt-sidecar .*$", tools, re.MULTILINE)
    }
    assert headings == set(commands()) - {"run", "demo"}


@pytest.mark.parametrize("name", list(SECTIONS))
def test_every_option_of_a_command_is_named_in_its_section(name: str) -> None:
    text = "".join(section(heading) for heading in SECTIONS[name])
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", text))
    missing = options(commands()[name]) - named
    assert not missing, f"`jwt-sidecar {name}` options the README does not name: {missing}"


def backticked_list(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def test_the_value_lists_the_readme_gives_are_the_codes() -> None:
    keys = section("### `jwt-sidecar keys generate`")
    algs = re.search(r"`--alg` is one of ((?:`[^`]+`(?:, | or )?)+)", keys)
    assert algs and backticked_list(algs.group(1)) == list(GENERATE_ALGORITHMS)
    mint = section("### `jwt-sidecar token mint`")
    row = re.search(r"^\| `--secret-encoding ENC` \| (.*?) \|", mint, re.MULTILINE)
    assert row and backticked_list(row.group(1).split(":")[0]) == list(SECRET_ENCODINGS)
    table = section("### Listener, upstream and what the upstream receives")
    log_format = re.search(r"^\| `log_format` \| `(\w+)` \| the operator log on stderr: (.*?) \|", table, re.MULTILINE)
    assert log_format and [v for v in backticked_list(log_format.group(2)) if v.isalpha()] == list(oplog.FORMATS)
    log_level = re.search(r"^\| `log_level` \| `(\w+)` \| the operator log's least level: (.*?);", table, re.MULTILINE)
    assert log_level and backticked_list(log_level.group(2)) == list(oplog.LEVELS)
    run = commands()["run"]
    choices = {a.option_strings[0]: list(a.choices) for a in run._actions if a.choices}  # noqa: SLF001
    assert choices == {"--log-level": list(oplog.LEVELS), "--log-format": list(oplog.FORMATS)}


# -- config keys --------------------------------------------------------------------------

PROVIDER = "    issuer: i\n    audiences: [a]\n    jwks: {url: 'https://issuer.example/jwks'}\n"
BASE = "providers:\n  p:\n" + PROVIDER + "routes:\n  - {match: {path_prefix: /}, auth: {provider: p}}\n"
CORS_BASE = "cors: {allow_origins: ['https://app.example.com']}\n" + BASE

# One unknown key in every section: the error lists the keys that section allows.
PROBE = """\
zz_unknown: 1
upstream: {url: 'http://127.0.0.1:1', zz_unknown: 1}
websocket: {zz_unknown: 1}
strip_headers: {zz_unknown: 1}
token_cache: {zz_unknown: 1}
cors: {allow_origins: ['https://app.example.com'], zz_unknown: 1}
revocation: {zz_unknown: 1, redis: {url: 'redis://127.0.0.1:6379/0', zz_unknown: 1}}
providers:
  p:
    zz_unknown: 1
    issuer: i
    audiences: [a]
    jwks: {url: 'https://issuer.example/jwks', zz_unknown: 1}
    headers: {zz_unknown: 1}
routes:
  - zz_unknown: 1
    match: {path_prefix: /, zz_unknown: 1}
    auth: {provider: p, zz_unknown: 1}
"""


def allowed_keys() -> dict[str, set[str]]:
    """{"": top-level keys, "upstream": its keys, "providers.p": ..., ...} as config.py allows them."""
    with pytest.raises(ConfigError) as caught:
        config.parse(PROBE, file="c.yaml")
    found = {}
    for issue in caught.value.issues:
        match = re.fullmatch(r"c\.yaml:\d+: (?:(.*)\.)?zz_unknown: unknown key; allowed here: (.*)", str(issue))
        assert match, str(issue)
        found[re.sub(r"\[\d+\]", "[]", match.group(1) or "")] = set(match.group(2).split(", "))
    return found


CONFIGURATION = section("## Configuration")
# The reference tables (not the reasons and metrics tables further down).
CONFIG_TABLES = (
    section("### Providers") + section("### Listener, upstream and what the upstream receives") + section("### CORS")
)


def table_keys(text: str) -> set[str]:
    """The names in the first column of each table row: `a` / `b`, `x.y`, `routes[].z`."""
    names = set()
    for cell in re.findall(r"^\| ([^|]+?) \|", text, re.MULTILINE):
        names.update(re.findall(r"`([a-z_\[\].]+)`", cell))
    return names - {"key", "file"}


def yaml_keys(text: str) -> set[str]:
    """Every `name:` in the YAML examples and inline flows of the section."""
    blocks = "\n".join(body for language, body in fenced_blocks(text) if language == "yaml")
    inline = " ".join(re.findall(r"`([^`\n]*)`", prose(text)))
    return set(re.findall(r"([a-z_]+):(?=\s|$)", blocks + " " + inline, re.MULTILINE))


def mentioned(text: str) -> set[str]:
    """Every backticked name in the prose of `text`."""
    return set(re.findall(r"`([a-z_]+)`", prose(text)))


def test_every_config_key_is_documented() -> None:
    tables, yaml_names = table_keys(CONFIG_TABLES), yaml_keys(CONFIGURATION)
    own_sections = {
        "providers": "### Providers",
        "routes": "### Routes",
        "token_cache": "### Verified-token cache",
        "cors": "### CORS",
        "revocation": "### Revocation",
    }
    missing = []
    for where, keys in allowed_keys().items():
        for key in keys:
            if where == "":  # a row of its own, or a key with a section of its own
                ok = (
                    key in tables
                    or any(t.startswith(f"{key}.") for t in tables)
                    or (key in own_sections and f"\n{own_sections[key]}\n" in CONFIGURATION)
                )
            elif where in ("upstream", "websocket", "providers.p.headers", "strip_headers", "cors"):
                dotted = f"{where.rsplit('.', 1)[-1]}.{key}"
                ok = dotted in tables or (where == "strip_headers" and f"`{key}`" in CONFIGURATION)
            elif where == "providers.p":  # the Providers tables, or a row under Listener
                ok = key in tables or any(t.startswith(f"{key}.") for t in tables) or key in yaml_names
            else:  # jwks, token_cache, routes[], match, auth: their YAML examples or their prose
                ok = key in yaml_names or key in mentioned(CONFIGURATION)
            if not ok:
                missing.append(f"{where or '(top level)'}: {key}")
    assert not missing, f"config keys the README's Configuration does not document: {missing}"


def test_every_key_a_config_table_names_exists() -> None:
    allowed = allowed_keys()
    known = (
        set(allowed[""])
        | set(allowed["providers.p"])
        | {
            f"{section.rsplit('.', 1)[-1]}.{key}"
            for section in ("upstream", "websocket", "providers.p.headers", "cors")
            for key in allowed[section]
        }
        | {f"routes[].{key}" for key in allowed["routes[]"]}
        | {f"routes[].auth.{key}" for key in allowed["routes[].auth"]}
    )
    unknown = table_keys(CONFIG_TABLES) - known
    assert not unknown, f"keys in the README's config tables that the code does not accept: {unknown}"


def default_rows() -> list[tuple[str, str]]:
    """(key, default) for every table row whose default is one backticked value."""
    rows = []
    for names, default in re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|", CONFIG_TABLES, re.MULTILINE):
        keys = re.findall(r"`([a-z_.\[\]]+)`", names)
        defaults = re.findall(r"`([^`]+)`", default)
        if re.fullmatch(r"(`[^`]+`)( / `[^`]+`)*", default.strip()) and len(keys) == len(defaults):
            rows += zip(keys, defaults, strict=True)
    return rows


def with_key(key: str, value: str) -> str:
    provider_keys = {
        "issuer",
        "audiences",
        "algorithms",
        "leeway",
        "required_claims",
        "max_token_age",
        "typ",
        "token_sources",
        "headers",
    }
    head, _, tail = key.partition(".")
    yaml_value = f'"{value}"' if ":" in value and not value.startswith(("{", "[")) else value
    if head in provider_keys:
        line = f"    {head}: {{{tail}: {yaml_value}}}\n" if tail else f"    {head}: {yaml_value}\n"
        return BASE.replace(PROVIDER, PROVIDER + line)
    if head == "upstream" and tail != "url":  # an upstream section needs its url
        tail_value = f"url: http://127.0.0.1:8000, {tail}: {yaml_value}"
        return f"upstream: {{{tail_value}}}\n" + BASE
    if key.startswith("routes[].auth."):  # a key of the route's auth mapping
        return BASE.replace("auth: {provider: p}", f"auth: {{provider: p, {key.rsplit('.', 1)[1]}: {yaml_value}}}")
    if head == "cors":  # a cors section needs its origins: compared with CORS_BASE
        return f"cors: {{allow_origins: ['https://app.example.com'], {tail}: {yaml_value}}}\n" + BASE
    return (f"{head}: {{{tail}: {yaml_value}}}\n" if tail else f"{head}: {yaml_value}\n") + BASE


@pytest.mark.parametrize(("key", "default"), default_rows())
def test_each_default_in_the_config_tables_is_the_codes(key: str, default: str) -> None:
    base = CORS_BASE if key.startswith("cors.") else BASE
    assert config.parse(with_key(key, default), file="c.yaml") == config.parse(base, file="c.yaml")


def test_the_defaults_checked_cover_the_tables() -> None:
    # So that a reworded table cannot make the comparison above check nothing.
    checked = {key for key, _ in default_rows()}
    assert {
        "listen",
        "admin",
        "upstream.url",
        "upstream.timeout",
        "leeway",
        "required_claims",
        "drain_timeout",
        "log_format",
        "log_level",
        "workers",
        "max_token_bytes",
        "headers.claims",
        "token_sources",
        "cors.allow_methods",
        "cors.allow_headers",
        "cors.allow_credentials",
        "routes[].auth.mode",
    } <= checked


@pytest.mark.parametrize(
    "example",
    [
        "jwks: {url: 'https://issuer.example/jwks', cache_ttl: 5m, min_refresh_interval: 30s, timeout: 5s}",
        "token_cache: {enabled: true, max_entries: 10000, max_ttl: 5m}",
    ],
)
def test_the_defaults_written_in_the_key_source_and_cache_examples_are_the_codes(example: str) -> None:
    readme_form = example.replace("url: 'https://issuer.example/jwks', ", "url, ")
    assert readme_form.split(": ", 1)[1].replace("'", "") in CONFIGURATION, readme_form
    if example.startswith("jwks"):
        text = BASE.replace("    jwks: {url: 'https://issuer.example/jwks'}\n", f"    {example}\n")
    else:
        text = example + "\n" + BASE
    assert config.parse(text, file="c.yaml") == config.parse(BASE, file="c.yaml")


# -- --help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SECTIONS))
def test_every_command_has_a_help_that_describes_it(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.tools.cli import main

    assert main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: jwt-sidecar {name} ")
    description = out.split("\n\n")[1]
    assert len(description.split()) >= 10, out
    helpless = [a.option_strings for a in commands()[name]._actions if not a.help]  # noqa: SLF001
    assert not helpless


def test_the_helps_say_what_the_readme_says() -> None:
    run, demo, explain = commands()["run"], commands()["demo"], commands()["token explain"]
    # A start-up failure: one line, exit 1 (README: Running it).
    assert "one line on stderr" in (run.description or "") and "exit 1" in (run.description or "")
    assert "one line on stderr and exits with status 1" in words(section("## Running it"))
    # The demo replaces a taken port, but not one given as an option (README: The two commands).
    assert "replaced by a free one" in (demo.description or "") and "used as given" in (demo.description or "")
    assert "A port that is taken is replaced by a free one" in words(section("## The two commands"))
    # How explain chooses the provider.
    provider = next(a for a in explain._actions if "--provider" in a.option_strings)  # noqa: SLF001
    assert "the config's only provider" in (provider.help or "")
    assert "else the config's only provider" in words(section(SECTIONS["token explain"][0]))


def words(text: str) -> str:
    return " ".join(text.split())
