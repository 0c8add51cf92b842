"""The client-address headers (X-Real-IP, True-Client-IP, X-Client-IP, Forwarded, CF-Connecting-IP,
Fastly-Client-IP, X-Cluster-Client-IP, Client-IP) never reach
the upstream from a client, unless the config keeps one for the ingress in front that writes it.

A framework reads these in place of the peer address (nginx's realip module, Go's chi, Rails,
Akamai's and Cloudflare's True-Client-IP, Cloudflare's CF-Connecting-IP, Fastly's
Fastly-Client-IP, Symfony's and Zend's X-Cluster-Client-IP and Client-IP), so a client's own copy chose its address: they are
on the built-in strip list now. `strip_headers.keep` takes one off the list (only these: never
the method or path overrides); `strip_headers.names` still adds to the list, whatever `keep`
says. Against the real proxy and a recording upstream.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.base.errors import ConfigError
from proxy.config.builder import parse
from tests.conftest import TestKey, mint
from tests.integration.conftest import BASE_CONFIG, Sidecar

ADDRESSES = [
    ("X-Real-IP", "10.1.1.1"),
    ("True-Client-IP", "10.2.2.2"),
    ("X-Client-IP", "10.3.3.3"),
    ("Forwarded", "for=10.4.4.4"),
    ("CF-Connecting-IP", "10.5.5.5"),
    ("Fastly-Client-IP", "10.6.6.6"),
    ("X-Cluster-Client-IP", "10.7.7.7"),
    ("Client-IP", "10.8.8.8"),
]


@pytest.mark.parametrize("path", ["/public/x", "/orders/1", "/maybe/x"], ids=["public", "protected", "optional"])
async def test_a_clients_address_headers_never_reach_the_upstream_by_default(
    sidecar: Any, rsa_key: TestKey, path: str
) -> None:
    s: Sidecar = await sidecar()
    response = await s.get(path, headers={**dict(ADDRESSES), "Authorization": f"Bearer {mint(key=rsa_key)}"})
    assert response.status == 200
    seen = s.upstream.last()
    for name, _ in ADDRESSES:
        assert seen.header(name) is None, f"{name} reached the upstream"
    assert seen.header("X-Forwarded-For") == "127.0.0.1", "the peer this sidecar saw"


async def test_keep_passes_the_ingresss_header_on_and_names_still_add(sidecar: Any, rsa_key: TestKey) -> None:
    config = (
        BASE_CONFIG
        + "strip_headers: {keep: [x-real-ip, Forwarded, cf-connecting-ip], names: [X-Envoy-External-Address]}\n"
    )
    s: Sidecar = await sidecar(config)
    headers = {**dict(ADDRESSES), "X-Envoy-External-Address": "10.9.9.9", "X-User-Id": "admin"}
    for path in ("/public/x", "/orders/1"):
        response = await s.get(path, headers={**headers, "Authorization": f"Bearer {mint(key=rsa_key)}"})
        assert response.status == 200
        seen = s.upstream.last()
        assert seen.header("X-Real-IP") == "10.1.1.1", "kept: the ingress's value"
        assert seen.header("Forwarded") == "for=10.4.4.4"
        assert seen.header("CF-Connecting-IP") == "10.5.5.5"
        for name in ("True-Client-IP", "X-Client-IP", "Fastly-Client-IP", "X-Cluster-Client-IP", "Client-IP"):
            assert seen.header(name) is None, f"{name} not kept"
        assert seen.header("X-Envoy-External-Address") is None, "names add to the list"
        assert seen.header("X-User-Id") in (None, "user-42"), "the identity strip is untouched"


def test_a_config_that_named_the_new_headers_itself_still_loads() -> None:
    # README advised `names: [CF-Connecting-IP, ...]` before they were built in: such a config
    # keeps loading, and they stay stripped.
    text = (
        "providers: {m: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}}\n"
        "strip_headers: {names: [CF-Connecting-IP, fastly-client-ip, X-Cluster-Client-IP, Client-IP]}\n"
    )
    names = {name.lower() for name in parse(text, file="c.yaml").strip.names}
    assert {"cf-connecting-ip", "fastly-client-ip", "x-cluster-client-ip", "client-ip", "x-real-ip"} <= names


KEEPABLE = (
    "Forwarded, X-Real-IP, True-Client-IP, X-Client-IP, CF-Connecting-IP, Fastly-Client-IP, X-Cluster-Client-IP, "
    "Client-IP"
)


@pytest.mark.parametrize(
    ("strip", "words"),
    [
        (
            "{keep: [X-Original-URL]}",
            "'X-Original-URL' cannot be kept (it is stripped because some frameworks let it change the method or "
            "the path after we routed); keep takes only " + KEEPABLE,
        ),
        (
            "{keep: [X-User-Id]}",
            "'X-User-Id' cannot be kept (it is not on the built-in list); keep takes only " + KEEPABLE,
        ),
        (
            "{keep: [Client-IP], names: [client-ip]}",
            "'Client-IP' is in both `names` and `keep`; it is either stripped or kept",
        ),
        (
            "{keep: [X-Real-IP], names: [x-real-ip]}",
            "'X-Real-IP' is in both `names` and `keep`; it is either stripped or kept",
        ),
    ],
    ids=["method-override", "identity", "both-new", "both"],
)
def test_keep_takes_only_the_client_address_headers(strip: str, words: str) -> None:
    text = "providers: {m: {issuer: i, audiences: [a], jwks: {url: 'https://x'}}}\nstrip_headers: " + strip + "\n"
    with pytest.raises(ConfigError) as caught:
        parse(text, file="c.yaml")
    assert [str(issue) for issue in caught.value.issues] == [f"c.yaml:2: strip_headers.keep: {words}"]
