"""Revoked tokens: the rules, the in-memory index, and the one check a request makes against it.

Owns: `Rule` (revoke one token by `jti`; every token of a subject, optionally of one issuer;
every token issued before an instant, of one subject or of a whole provider; each with an
expiry after which it is dropped), merging two writes of the same rule (the later instant
and the later expiry win, so the order they arrive in does not matter), `RevocationIndex`
(dicts by jti and by sub, and the provider-wide cut-offs: one lookup per claim, whatever the
list's size), `revoked()`, the check a request makes, and the rules' file form (YAML or
JSON, read with line numbers; written back by `jwt-sidecar revoke`).
Does not own: where the list is kept or how it is followed (revocationstore.py), whether a
route checks it (the request pipeline), or the answer a revoked token gets (401
`invalid_token`, reason `revoked`: errors.py and the pipeline).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..base.errors import ConfigError
from ..config.yamlsource import Issues, Section, describe, load_yaml

__all__ = [
    "RevocationIndex",
    "Rule",
    "format_time",
    "make_rule",
    "parse_rules",
    "parse_time",
    "render_rules",
    "revoked",
    "revoking_rules",
    "rule_from_mapping",
    "rules_problem",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One revocation. Equal rules (same jti, sub, iss, provider, and both timed or not) are one
    rule written twice: `merged` keeps the later `before` and the later `expires`."""

    jti: str | None = None
    """This one token (its `jti` claim)."""
    sub: str | None = None
    """Every token of this subject (with `before`: those issued before it)."""
    iss: str | None = None
    """Only tokens of this issuer (`iss`)."""
    provider: str | None = None
    """Only tokens admitted by this provider; None: every provider's."""
    timed: bool = False
    """Whether `before` applies: tokens issued (`iat`) before it."""
    before: float | None = field(default=None, compare=False)
    """The instant (Unix seconds, whole: see `problem`) tokens issued before are revoked."""
    expires: float | None = field(default=None, compare=False)
    """When the rule is dropped (Unix seconds); None: never (a file's rule without `expires`)."""

    @property
    def kind(self) -> str:
        return "jti" if self.jti is not None else "before" if self.timed else "sub"

    def problem(self) -> str | None:
        """What makes this rule meaningless, or None."""
        if self.jti is None and self.sub is None and not self.timed:
            return "a rule names a jti, a sub, or a time tokens issued before are revoked (before)"
        if self.jti is not None and (self.sub is not None or self.timed):
            return "a jti rule revokes one token: it has no sub or before"
        if self.timed != (self.before is not None):
            return "before: needs a time"
        for name in ("jti", "sub", "iss", "provider"):
            value = getattr(self, name)
            if value is not None and not value:
                return f"{name} must not be empty"
        return None

    def merged(self, other: Rule) -> Rule:
        """This rule written again: the later instant, the later expiry (None: never, wins)."""
        before = _later(self.before, other.before)
        expires = None if self.expires is None or other.expires is None else max(self.expires, other.expires)
        return dataclasses.replace(self, before=before, expires=expires)

    def matches(self, provider: str, claims: Mapping[str, Any]) -> bool:
        """Whether this rule revokes a token of `provider` with these claims (its jti or sub already matched)."""
        if self.provider is not None and self.provider != provider:
            return False
        if self.iss is not None and self.iss != claims.get("iss"):
            return False
        if self.before is not None:
            iat = claims.get("iat")
            # A token without a numeric `iat` cannot show it was issued after the instant:
            # under an issued-before rule, it is revoked.
            if iat.__class__ in (int, float) and iat >= self.before:
                return False
        return True

    def describe(self) -> str:
        """What the rule revokes, in words (never the sub or jti themselves: they can be personal)."""
        if self.jti is not None:
            what = "this token (jti)"
        elif self.sub is not None:
            what = "the subject's tokens"
        else:
            what = "every token"
        if self.iss is not None:
            what += " of its issuer"
        if self.provider is not None:
            what += f" of provider {self.provider}"
        if self.before is not None:
            what += f" issued before {format_time(self.before)}"
        return what

    def to_json(self) -> dict[str, Any]:
        """The rule as its file form (and its Redis form, as JSON): only the fields it has."""
        out: dict[str, Any] = {}
        for name in ("jti", "sub", "iss", "provider"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.before is not None:
            out["before"] = format_time(self.before)
        if self.expires is not None:
            out["expires"] = format_time(self.expires)
        return out

    def identity(self) -> str:
        """A string naming the rule (not its times): the Redis hash field of it."""
        return json.dumps([self.jti, self.sub, self.iss, self.provider, self.timed], separators=(",", ":"))


def _later(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def make_rule(
    *,
    jti: str | None = None,
    sub: str | None = None,
    iss: str | None = None,
    provider: str | None = None,
    before: float | None = None,
    expires: float | None = None,
) -> Rule:
    """A rule; `before` is rounded up to the whole second (see below)."""
    # Token dates are whole seconds (RFC 7519 NumericDate, as issuers write them): a token
    # issued in the second the rule names may have been issued before the instant, so the
    # whole second counts (`iat` 12:00:00 is revoked by a rule for 12:00:00.5).
    return Rule(
        jti=jti,
        sub=sub,
        iss=iss,
        provider=provider,
        timed=before is not None,
        before=float(math.ceil(before)) if before is not None else None,
        expires=expires,
    )


class RevocationIndex:
    """Every rule in force, indexed so that a request's check costs one dict lookup per claim.

    `by_jti` and `by_sub` map the claim's value to the rules that name it; `wide` maps a
    provider (None: every provider) to the rules that name no jti and no sub. Changed in
    place by the store (the event loop is single-threaded: a request never sees half a change).
    """

    __slots__ = ("by_jti", "by_sub", "next_expiry", "size", "wide")

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.by_jti: dict[str, tuple[Rule, ...]] = {}
        self.by_sub: dict[str, tuple[Rule, ...]] = {}
        self.wide: dict[str | None, tuple[Rule, ...]] = {}
        self.size = 0
        self.next_expiry = math.inf
        for rule in rules:
            self.add(rule)

    def _bucket(self, rule: Rule) -> tuple[dict[Any, tuple[Rule, ...]], Any]:
        if rule.jti is not None:
            return self.by_jti, rule.jti
        if rule.sub is not None:
            return self.by_sub, rule.sub
        return self.wide, rule.provider

    def add(self, rule: Rule) -> Rule:
        """Put `rule` in force (merged with the same rule already there); returns what is now in force."""
        table, key = self._bucket(rule)
        rules = table.get(key, ())
        for i, old in enumerate(rules):
            if old == rule:
                rule = old.merged(rule)
                table[key] = (*rules[:i], rule, *rules[i + 1 :])
                break
        else:
            table[key] = (*rules, rule)
            self.size += 1
        if rule.expires is not None and rule.expires < self.next_expiry:
            self.next_expiry = rule.expires
        return rule

    def __iter__(self) -> Iterator[Rule]:
        for table in (self.by_jti, self.by_sub, self.wide):
            for rules in table.values():
                yield from rules

    def __len__(self) -> int:
        return self.size

    def prune(self, now: float) -> int:
        """Drop the rules expired at `now`; how many. A scan of the list, done only once the
        earliest expiry has passed (the store calls it on a timer)."""
        if now < self.next_expiry:
            return 0
        dropped = 0
        soonest = math.inf
        tables: tuple[dict[Any, tuple[Rule, ...]], ...] = (self.by_jti, self.by_sub, self.wide)
        for table in tables:
            for key, rules in list(table.items()):
                kept = tuple(r for r in rules if r.expires is None or r.expires > now)
                dropped += len(rules) - len(kept)
                if not kept:
                    del table[key]
                elif len(kept) != len(rules):
                    table[key] = kept
                for r in kept:
                    if r.expires is not None and r.expires < soonest:
                        soonest = r.expires
        self.size -= dropped
        self.next_expiry = soonest
        return dropped


def revoked(index: RevocationIndex, provider: str, claims: Mapping[str, Any]) -> str | None:
    """Why a verified token of `provider` (its payload `claims`) is revoked, or None.

    The request pipeline calls this on every request whose route and provider check
    revocation, cached tokens included. An empty index costs three truth tests.
    """
    if index.by_jti:
        jti = claims.get("jti")
        if jti.__class__ is not str:
            jti = _text(jti)
        rules = index.by_jti.get(jti) if jti is not None else None
        if rules is not None:
            for rule in rules:
                if rule.matches(provider, claims):
                    return "the token is revoked (its jti)"
    if index.by_sub:
        sub = claims.get("sub")
        if sub.__class__ is not str:
            sub = _text(sub)
        rules = index.by_sub.get(sub) if sub is not None else None
        if rules is not None:
            for rule in rules:
                if rule.matches(provider, claims):
                    return f"the subject's tokens are revoked{_issued_before(rule)}"
    if index.wide:
        for key in (provider, None):
            rules = index.wide.get(key)
            if rules is not None:
                for rule in rules:
                    if rule.matches(provider, claims):
                        return f"every token of {'provider ' + provider if key else 'every provider'} is revoked{_issued_before(rule)}"
    return None


def revoking_rules(index: RevocationIndex, provider: str, claims: Mapping[str, Any]) -> list[Rule]:
    """Every rule that revokes a verified token of `provider`: what `token explain` names. A scan
    of the list (not for the request path, which asks `revoked()`); the same rules, so the two agree."""
    jti, sub = claims.get("jti"), claims.get("sub")
    jti = jti if jti.__class__ is str else _text(jti)
    sub = sub if sub.__class__ is str else _text(sub)
    found = []
    for rule in index:
        if rule.jti is not None and rule.jti != jti:
            continue
        if rule.jti is None and rule.sub is not None and rule.sub != sub:
            continue
        if rule.matches(provider, claims):
            found.append(rule)
    return found


def _text(value: Any) -> str | None:
    # A numeric jti or sub (not RFC 7519's StringOrURI, but some issuers write them) is matched
    # as its decimal text: `jwt-sidecar revoke --jti 123` must revoke {"jti": 123}.
    return str(value) if value.__class__ is int else None


def _issued_before(rule: Rule) -> str:
    return f" (issued before {format_time(rule.before)})" if rule.before is not None else ""


# -- times ----------------------------------------------------------------------------------


def format_time(seconds: float) -> str:
    """RFC 3339 UTC, to the second: 2026-12-03T12:00:00Z."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: Any) -> float:
    """An RFC 3339 / ISO 8601 time with a zone (`2026-12-03T12:00:00Z`), or Unix seconds → Unix seconds."""
    if isinstance(value, bool):
        raise ValueError("true or false is not a time")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value!r} is not a time")
        return float(value)
    if isinstance(value, datetime.datetime):  # YAML reads an unquoted timestamp as one
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not a time like 2026-12-03T12:00:00Z") from None
    else:
        raise ValueError(f"{describe(value)} is not a time like 2026-12-03T12:00:00Z")
    if moment.tzinfo is None:
        if isinstance(value, datetime.datetime):  # YAML's timestamps without a zone are UTC (YAML 1.1)
            moment = moment.replace(tzinfo=datetime.UTC)
        else:
            raise ValueError(f"{value!r} has no time zone; add one, e.g. {value.strip()}Z for UTC")
    return moment.timestamp()


# -- the file form --------------------------------------------------------------------------

_RULE_EXAMPLE = "{sub: alice, expires: 2026-12-04T12:00:00Z}"


_RULE_KEYS = frozenset({"jti", "sub", "iss", "provider", "before", "expires", "note"})


def rule_from_mapping(data: Any) -> Rule:
    """A rule from its file or Redis form (a mapping); raises ValueError when it is not one."""
    if not isinstance(data, dict):
        raise ValueError("a rule is a mapping")
    unknown = [key for key in data if key not in _RULE_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}")
    strings: dict[str, str | None] = {}
    for name in ("jti", "sub", "iss", "provider"):
        value = data.get(name)
        if value is not None and value.__class__ is not str:
            if value.__class__ is not int:
                raise ValueError(f"{name} is not a string")
            value = str(value)
        strings[name] = value
    before, expires = data.get("before"), data.get("expires")
    rule = make_rule(
        jti=strings["jti"],
        sub=strings["sub"],
        iss=strings["iss"],
        provider=strings["provider"],
        before=parse_time(before) if before is not None else None,
        expires=parse_time(expires) if expires is not None else None,
    )
    problem = rule.problem()
    if problem is not None:
        raise ValueError(problem)
    return rule


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a duplicate key")
    return found


class _FastLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's safe loader (when PyYAML has it), refusing duplicate keys; no line numbers."""


def _fast_mapping(loader: Any, node: yaml.MappingNode) -> dict[Any, Any]:
    pairs = loader.construct_pairs(node, deep=True)
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a duplicate key")
    return found


_FastLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _fast_mapping)


def _fast_rules(text: str, now: float | None) -> list[Rule]:
    """The rules of a file with no mistake, quickly (100,000 rules: C parsers, no line
    tracking); ValueError (or a YAML error) at the first doubt, and the careful reader says why."""
    if text.lstrip().startswith("{"):
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    else:
        document = yaml.load(text, Loader=_FastLoader)  # noqa: S506 - a safe loader
    if document is None:
        return []
    if not isinstance(document, dict) or set(document) - {"rules"} or not isinstance(document.get("rules", []), list):
        raise ValueError("not a mapping with a rules list")
    rules = (rule_from_mapping(item) for item in document.get("rules") or [])
    return [rule for rule in rules if now is None or rule.expires is None or rule.expires > now]


def parse_rules(text: str, *, file: str, now: float | None = None) -> list[Rule]:
    """The rules of a revocation file (`rules: [...]`; an empty file has none); raises
    `ConfigError` naming the line of every mistake. Rules expired at `now` are left out.

    Values are data, never expanded: a subject named `${HOME}` is that text."""
    try:
        return _fast_rules(text, now)
    except (ValueError, TypeError, RecursionError, yaml.YAMLError):
        pass  # read again, carefully, to say where and what
    document = load_yaml(text, file)
    if document is None:
        return []
    issues = Issues(file)
    if not isinstance(document, dict):
        issues.add(1, "", f"a revocation file is a mapping with a `rules` list, e.g. rules: [{_RULE_EXAMPLE}]")
        issues.raise_if_any()
    root = Section(issues, document, "")
    rules: list[Rule] = []
    for _, item, path, line in root.items("rules", "rules", f"[{_RULE_EXAMPLE}]"):
        s = Section(issues, item, path, line)
        if not isinstance(item, dict):
            s.error(None, f"a rule is a mapping, e.g. {_RULE_EXAMPLE}")
            continue
        values = {name: _text_value(s, name) for name in ("jti", "sub", "iss", "provider")}
        times: dict[str, float | None] = {}
        for name in ("before", "expires"):
            raw = s.raw(name)
            times[name] = None
            if raw is not None:
                try:
                    times[name] = parse_time(raw)
                except ValueError as error:
                    s.error(name, str(error))
        s.raw("note")  # the operator's own words, kept by nobody
        s.done()
        rule = make_rule(**values, before=times["before"], expires=times["expires"])
        if item.get("before") is not None and times["before"] is None:
            continue  # its own error said why
        problem = rule.problem()
        if problem is not None:
            s.error(None, problem)
            continue
        if now is None or rule.expires is None or rule.expires > now:
            rules.append(rule)
    root.done()
    issues.raise_if_any()
    return rules


def _text_value(s: Section, key: str) -> str | None:
    """A rule's string as written (a number as its digits); never `${VAR}`-expanded: it is data."""
    value = s.raw(key)
    if value is None or value.__class__ is str:
        return value
    if value.__class__ is int:
        return str(value)
    s.error(key, f"{describe(value)} is not a string")
    return None


def render_rules(rules: Iterable[Rule], *, json_form: bool = False) -> str:
    """The file form of `rules`, as `parse_rules` reads it back (JSON for a `.json` file)."""
    document = {"rules": [rule.to_json() for rule in rules]}
    if json_form:
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    head = "# Revoked tokens (jwt-sidecar revoke): each rule is dropped after its `expires`.\n"
    return head + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=1 << 16)


def rules_problem(error: ConfigError) -> str:
    """A refused file's problems, one line."""
    return "; ".join(str(issue) for issue in error.issues)
