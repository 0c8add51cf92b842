"""`token explain` and the revocation list: it reads the configured store once and says whether,
and by which rule, the token is revoked, as the running proxy decides it.

The token goes through the real proxy (conftest `sidecar`, the same config file) and through
`jwt-sidecar token explain`; the list is written with `jwt-sidecar revoke`. A revoked token is
INVALID with reason `revoked` and the rule in words (never the subject or jti themselves); one
the list does not name passes that step; a provider with `revocation: false` says it opts out;
a store that cannot be read leaves the answer NOT VERIFIED (exit 3), never VALID.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from proxy.tools.cli import main
from tests.conftest import AUDIENCE, ISSUER, TestKey, jwks_of, mint, refused_port

CONFIG = f"""\
realm: api
upstream: {{url: "{{upstream}}", timeout: 2s}}
providers:
  main:
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks_file: {{jwks_file}}
    max_token_age: 1h
  trusted:
    issuer: https://trusted.test
    audiences: [{AUDIENCE}]
    jwks_file: {{jwks_file}}
    revocation: false
routes:
  - {{name: api, match: {{path_prefix: /}}, auth: {{provider: main}}}}
revocation: {{file: revoked.yaml}}
"""


async def explain(config: Path, token: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    # In a thread: the command runs its own event loop, as from a terminal.
    code = await asyncio.to_thread(main, ["token", "explain", "--config", str(config), *extra, token])
    return code, capsys.readouterr().out


async def test_explain_names_the_rule_that_revokes_a_token_as_the_proxy_refuses_it(
    sidecar: Any, rsa_key: TestKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks_of(rsa_key)))
    s = await sidecar(CONFIG, jwks_file=str(jwks_file))
    config = tmp_path / "config.yaml"
    token = mint({"sub": "mallory-77", "jti": "id-991"}, key=rsa_key)

    code, out = await explain(config, token, capsys)
    assert code == 0 and out.splitlines()[-1] == "VALID", out
    [line] = [line for line in out.splitlines() if line.startswith("  PASS  revocation")]
    assert f"not revoked by the 0 rules in file {tmp_path / 'revoked.yaml'}" in line

    assert await asyncio.to_thread(main, ["revoke", "--sub", "mallory-77", "--ttl", "2h", "--config", str(config)]) == 0
    capsys.readouterr()
    code, out = await explain(config, token, capsys)
    assert code == 1 and out.splitlines()[-1] == "INVALID: revoked", out
    [line] = [line for line in out.splitlines() if line.startswith("  FAIL  revocation")]
    assert "the subject's tokens are revoked, by the list in file " in line
    assert "rule: the subject's tokens, until 20" in line and line.endswith("[revoked]"), line
    assert "mallory-77" not in line and "id-991" not in line  # the rule in words, never who
    # The proxy agrees (its file watch picks the rule up within a second).
    for _ in range(40):
        async with await s.get("/x", headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status == 401:
                assert (await response.json())["error_description"] == "The access token has been revoked"
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the proxy never refused the revoked token")

    # The other provider opts out: its step says so and passes.
    other = mint({"sub": "mallory-77", "iss": "https://trusted.test"}, key=rsa_key)
    code, out = await explain(config, other, capsys, "--provider", "trusted")
    assert code == 0, out
    assert "  PASS  revocation      provider 'trusted' opts out (revocation: false)" in out.splitlines()


async def test_a_store_that_cannot_be_read_leaves_the_token_not_verified(
    rsa_key: TestKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks_of(rsa_key)))
    config = tmp_path / "config.yaml"
    redis = f"revocation: {{redis: {{url: redis://127.0.0.1:{refused_port()}/0, timeout: 1s}}}}\n"
    config.write_text(
        CONFIG.replace("{upstream}", "http://127.0.0.1:1")
        .replace("{jwks_file}", str(jwks_file))
        .replace("revocation: {file: revoked.yaml}\n", redis)
    )
    code, out = await explain(config, mint(key=rsa_key), capsys)
    assert code == 3, out
    assert out.splitlines()[-1] == "NOT VERIFIED: not every check could run"
    [line] = [line for line in out.splitlines() if line.startswith("  ----  revocation")]
    assert "could not be read" in line and "connection refused" in line, line
