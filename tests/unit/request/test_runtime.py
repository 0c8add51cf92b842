"""proxy/request/runtime.py: what one config builds for the request path (route plans, renderers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.auth.verify import Claims
from proxy.request.runtime import build_snapshot
from tests.conftest import TestKey
from tests.support.steps import CONFIG, Parts, start_parts

SHARED_AND_OWN_MAPS = (
    CONFIG
    + """\
  - name: own
    match: {path_prefix: /own/}
    auth: {provider: main}
    headers: {claims: {sub: X-Subject}, forward_token: true}
"""
)


@pytest.fixture
async def parts(aiohttp_server: Any, tmp_path: Path, rsa_key: TestKey) -> Any:
    made = await start_parts(aiohttp_server, tmp_path, rsa_key, SHARED_AND_OWN_MAPS)
    yield made
    await made.proxy.close()


def claims(sub: str) -> Claims:
    return Claims(provider="main", header={}, payload={"sub": sub})


async def test_routes_that_share_a_header_map_share_its_renderer_and_a_route_with_its_own_has_its_own(
    parts: Parts,
) -> None:
    snapshot = parts.runtime.snapshot
    assert snapshot is not None
    plans = snapshot.plans
    assert plans["public"].renderer is None and not plans["public"].forward_token
    assert plans["api"].renderer is plans["query"].renderer is not None, "both use the provider's map"
    own = plans["own"].renderer
    assert own is not None and own is not plans["api"].renderer and plans["own"].forward_token
    token = claims("u1")
    assert plans["api"].renderer.headers(token) == ((b"X-User-Id", b"u1"),)
    assert own.headers(token) == ((b"X-Subject", b"u1"),), "one token, each map's own rendering"


async def test_a_renderer_remembers_as_many_tokens_as_the_cache_holds_and_none_without_a_cache(
    parts: Parts,
) -> None:
    runtime = parts.runtime
    snapshot = runtime.snapshot
    assert snapshot is not None and snapshot.cache is not None
    renderer = snapshot.plans["api"].renderer
    assert renderer is not None
    assert renderer.rendered.bound == runtime.settings.token_cache.max_entries
    first = renderer.headers(token := claims("u1"))
    assert renderer.headers(token) is first
    settings = runtime.settings
    uncached = replace(settings, token_cache=replace(settings.token_cache, enabled=False))
    without = build_snapshot(uncached, keyring=snapshot.keyring, clock=runtime.clock, metrics=runtime.metrics)
    assert without.cache is None
    bare = without.plans["api"].renderer
    assert bare is not None and bare.rendered.bound == 0
    assert bare.headers(token) == first and len(bare.rendered) == 0


async def test_a_new_snapshot_renders_afresh(parts: Parts) -> None:
    # A reload builds a new snapshot: a header map it changed must never serve an old rendering.
    runtime = parts.runtime
    snapshot = runtime.snapshot
    assert snapshot is not None
    again = build_snapshot(runtime.settings, keyring=snapshot.keyring, clock=runtime.clock, metrics=runtime.metrics)
    old, new = snapshot.plans["api"].renderer, again.plans["api"].renderer
    assert old is not None and new is not None and old is not new
    token = claims("u1")
    old.headers(token)
    assert token not in new.rendered
