"""Reading the shipped deployment files: the Dockerfile's ENTRYPOINT and the k8s/ manifests."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from proxy.keygen import generate

REPO = Path(__file__).parents[1]
K8S = REPO / "k8s"


def dockerfile_instruction(name: str) -> list[str]:
    """Every argument line of one instruction (ENTRYPOINT, EXPOSE, USER…) in the final stage."""
    text = (REPO / "Dockerfile").read_text()
    final_stage = text.split("\nFROM ")[-1]
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", final_stage, re.MULTILINE)]


def entrypoint() -> list[str]:
    lines = dockerfile_instruction("ENTRYPOINT")
    assert len(lines) == 1, "one ENTRYPOINT, in exec form"
    argv = json.loads(lines[0])
    assert not dockerfile_instruction("CMD"), "the command is all in ENTRYPOINT"
    return argv


def manifests(*names: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in names:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


GENERATED_SECRET = generate("HS256", "internal").file_bytes()
"""What `jwt-sidecar keys generate --alg HS256 --kid internal` writes, as the operator runs it
(the real file under k8s/secrets/ is never committed, so the tests bring their own)."""


def generated_secrets(files: Mapping[str, bytes] | None = None) -> list[dict[str, Any]]:
    """The Secrets of the kustomization's `secretGenerator`, as kustomize makes them.

    `files` holds each generator file's content by its path in the generator (a missing one
    fails, as `kubectl apply -k` does); without it, every file holds GENERATED_SECRET.
    """
    secrets = []
    for generator in kustomization().get("secretGenerator", []):
        options = generator.get("options", {})
        assert options.get("disableNameSuffixHash") is True, "the Deployment refers to the Secret by its plain name"
        data = {}
        for spec in generator["files"]:
            key, _, path = spec.partition("=")
            content = GENERATED_SECRET if files is None else files[path]
            data[key] = base64.b64encode(content).decode()
        metadata = {"name": generator["name"], "labels": dict(options.get("labels", {}))}
        secrets.append({"apiVersion": "v1", "kind": "Secret", "metadata": metadata,
                        "type": generator.get("type", "Opaque"), "data": data})
    return secrets


def built(files: Mapping[str, bytes] | None = None) -> list[dict[str, Any]]:
    """What `kubectl kustomize k8s/` prints (in the kustomization's order, not kustomize's):
    the plain resources, then the generated Secrets (see `generated_secrets`)."""
    return manifests(*kustomization()["resources"]) + generated_secrets(files)


def one(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [d for d in (docs or built()) if d["kind"] == kind]
    assert len(found) == 1, f"exactly one {kind}"
    return found[0]


def sidecar_container(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "jwt-sidecar"]
    assert len(found) == 1
    return found[0]


def sidecar_env(docs: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """The sidecar's environment as the Pod would have it (secretKeyRefs read from the Secret)."""
    docs = docs or built()
    secret = one("Secret", docs)
    env: dict[str, str] = {}
    for item in sidecar_container(one("Deployment", docs)).get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def configmap_config() -> tuple[str, str]:
    """(key, text) of the config file the ConfigMap holds."""
    data = one("ConfigMap")["data"]
    assert len(data) == 1
    return next(iter(data.items()))
