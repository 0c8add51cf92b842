"""Reading the shipped deployment files: the Dockerfile's ENTRYPOINT and the k8s/ manifests.

No kustomize or kubectl here: `built` applies the few kustomize semantics k8s/kustomization.yaml
uses (plain resources, configMapGenerator and secretGenerator without name hashes, `images:`),
and `pod_config` lays out the files the sidecar container sees, from its volume mounts."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from proxy.tools.keygen import generate

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


def generated_configmaps() -> list[dict[str, Any]]:
    """The ConfigMaps of the kustomization's `configMapGenerator`, as kustomize makes them: each
    file's key is its `key=` prefix or its base name, its value the file as it is in k8s/."""
    configmaps = []
    for generator in kustomization().get("configMapGenerator", []):
        options = generator.get("options", {})
        assert options.get("disableNameSuffixHash") is True, "the Deployment refers to the ConfigMap by its plain name"
        assert set(generator) <= {"name", "files", "options"}, "the config comes from its file, nothing else"
        data = {}
        for spec in generator["files"]:
            key, _, path = spec.rpartition("=")
            data[key or PurePosixPath(path).name] = (K8S / path).read_text()
        metadata = {"name": generator["name"], "labels": dict(options.get("labels", {}))}
        configmaps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return configmaps


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
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": metadata,
                "type": generator.get("type", "Opaque"),
                "data": data,
            }
        )
    return secrets


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference: the tag is after the last `:` of the last
    path segment (a registry's `:port` is part of the name)."""
    rest, _, digest = image.partition("@")
    head, slash, last = rest.rpartition("/")
    last, colon, tag = last.partition(":")
    return head + slash + last, tag if colon else None, digest or None


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def set_images(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kustomize's `images:` transformer over the Deployments: a container whose image name
    (without tag or digest) is an entry's `name` gets `newName`, and `newTag` or `digest`."""
    entries = {entry["name"]: entry for entry in kustomization().get("images", [])}
    out = copy.deepcopy(docs)
    for doc in out:
        if doc["kind"] != "Deployment":
            continue
        for container in pod_containers(doc):
            name, tag, digest = split_image(container["image"])
            entry = entries.get(name)
            if entry is None:
                continue
            image = entry.get("newName", name)
            if "digest" in entry:
                image += "@" + entry["digest"]
            elif "newTag" in entry:
                image += ":" + str(entry["newTag"])
            else:
                image += (":" + tag if tag else "") + ("@" + digest if digest else "")
            container["image"] = image
    return out


def built(files: Mapping[str, bytes] | None = None, *, deployment: str = "deployment.yaml") -> list[dict[str, Any]]:
    """What `kubectl kustomize k8s/` prints (in the kustomization's order, not kustomize's):
    the plain resources, then the generated ConfigMaps and Secrets (see `generated_secrets`),
    with the images set. `deployment` names a variant to build in place of deployment.yaml,
    as the variants' comments tell the operator to do."""
    names = [deployment if name == "deployment.yaml" else name for name in kustomization()["resources"]]
    return set_images(manifests(*names) + generated_configmaps() + generated_secrets(files))


def one(kind: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [d for d in (docs or built()) if d["kind"] == kind]
    assert len(found) == 1, f"exactly one {kind}"
    return found[0]


def sidecar_container(deployment: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in pod_containers(deployment) if c["name"] == "jwt-sidecar"]
    assert len(found) == 1
    return found[0]


def sidecar_env(docs: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """The sidecar's environment as the Pod would have it (secretKeyRefs read from the Secret)."""
    docs = docs or built()
    env: dict[str, str] = {}
    for item in sidecar_container(one("Deployment", docs)).get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"])
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def configmap_config() -> tuple[str, str]:
    """(key, text) of the config file the ConfigMap holds."""
    data = one("ConfigMap")["data"]
    assert len(data) == 1
    return next(iter(data.items()))


def mounted_volumes(docs: list[dict[str, Any]] | None = None) -> dict[PurePosixPath, dict[str, bytes]]:
    """The files of each ConfigMap, Secret or projected volume the sidecar container mounts:
    by mount path, each file's content by its path in the volume (emptyDirs hold nothing)."""
    docs = docs or built()
    deployment = one("Deployment", docs)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}

    def source(kind: str, name: str) -> dict[str, bytes]:
        found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"the {kind} {name} the Pod mounts is built"
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in found[0]["data"].items()}
        return {k: v.encode() for k, v in found[0]["data"].items()}

    def items(kind: str, ref: dict[str, Any]) -> dict[str, bytes]:
        data = source(kind, ref["name"])
        if "items" not in ref:
            return data
        return {item["path"]: data[item["key"]] for item in ref["items"]}

    mounted: dict[PurePosixPath, dict[str, bytes]] = {}
    for mount in sidecar_container(deployment).get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "subPath" not in mount, "a subPath mount never sees a ConfigMap update"
        if "configMap" in volume:
            found = items("ConfigMap", volume["configMap"])
        elif "secret" in volume:
            found = items("Secret", {**volume["secret"], "name": volume["secret"]["secretName"]})
        elif "projected" in volume:
            found = {}
            for src in volume["projected"]["sources"]:
                ((kind, ref),) = ((k, v) for k, v in src.items() if k in ("configMap", "secret"))
                found.update(items("ConfigMap" if kind == "configMap" else "Secret", ref))
        else:
            continue
        mounted[PurePosixPath(mount["mountPath"])] = found
    return mounted


def mounted_files(docs: list[dict[str, Any]] | None = None) -> dict[PurePosixPath, bytes]:
    """Every file the sidecar container reads from its volumes, by its absolute path there."""
    return {mount / path: content for mount, files in mounted_volumes(docs).items() for path, content in files.items()}


def kubelet_write(volume_dir: Path, files: Mapping[str, bytes]) -> None:
    """Write a volume's files as the kubelet does (its AtomicWriter): into a new hidden
    timestamped directory, then one rename of the `..data` symlink onto it, the old directory
    removed; each top-level name is a symlink through `..data`. So an update is atomic, and a
    reader that resolves the config path sees the whole new set or the whole old one."""
    volume_dir.mkdir(parents=True, exist_ok=True)
    old = (volume_dir / "..data").resolve() if (volume_dir / "..data").is_symlink() else None
    fresh = volume_dir / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    for path, content in files.items():
        target = fresh / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    (volume_dir / "..data_tmp").symlink_to(fresh.name)
    os.rename(volume_dir / "..data_tmp", volume_dir / "..data")
    for top in {PurePosixPath(path).parts[0] for path in files}:
        if not (volume_dir / top).is_symlink():
            (volume_dir / top).symlink_to(Path("..data") / top)
    if old is not None:
        shutil.rmtree(old)


def pod_config(root: Path, docs: list[dict[str, Any]] | None = None) -> Path:
    """Lay the sidecar's mounted volumes out under `root` (the container's / moved there), as
    the kubelet writes them, and return where the image's ENTRYPOINT reads its config."""
    for mount, files in mounted_volumes(docs).items():
        kubelet_write(root / mount.relative_to("/"), files)
    argv = entrypoint()
    return root / PurePosixPath(argv[argv.index("--config") + 1]).relative_to("/")


def edit_config(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite a config file through `edit` (a test's only changes to what is deployed, such as
    loopback ports and a local issuer; comments and line numbers are lost)."""
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # through the symlinks, in place
