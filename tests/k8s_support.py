"""Reading the shipped deployment files: the Dockerfile's ENTRYPOINT and the k8s/ manifests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

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


def built() -> list[dict[str, Any]]:
    """What `kubectl kustomize k8s/` prints for a kustomization of plain resources."""
    return manifests(*kustomization()["resources"])


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
            env[item["name"]] = secret["stringData"][ref["key"]]
    return env


def configmap_config() -> tuple[str, str]:
    """(key, text) of the config file the ConfigMap holds."""
    data = one("ConfigMap")["data"]
    assert len(data) == 1
    return next(iter(data.items()))
