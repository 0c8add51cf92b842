"""k8s/ and the Dockerfile: valid for Kubernetes 1.29+, and consistent with each other and the config."""

from __future__ import annotations

import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy import cli, config
from tests.k8s_support import (
    K8S, REPO, built, configmap_config, dockerfile_instruction, entrypoint, kustomization, manifests, one,
    sidecar_container, sidecar_env,
)

FILES = sorted(str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")
               if p.name != "kustomization.yaml" and "monitoring" not in p.parts)


@pytest.mark.parametrize("version", ["1.29", "1.37"])
@pytest.mark.parametrize("name", FILES)
def test_every_manifest_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    for doc in manifests(name):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_what_kustomize_builds_validates_against_the_kubernetes_schema(version: str) -> None:
    # The generated Secret included: it is shipped as a generator, not as a file.
    for doc in built():
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_is_plain_resources_and_lists_every_manifest() -> None:
    k = kustomization()
    # No transformers, so the kustomize output is exactly the listed files plus the generated
    # Secret (see tests.k8s_support.built).
    assert set(k) == {"apiVersion", "kind", "resources", "secretGenerator"}
    top_level = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(k["resources"]) == top_level
    kinds = [d["kind"] for d in built()]
    assert sorted(kinds) == sorted(["ConfigMap", "Secret", "Deployment", "Service", "NetworkPolicy",
                                    "PodDisruptionBudget"])


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> config.Settings:
    for name, value in sidecar_env().items():
        monkeypatch.setenv(name, value)
    key, text = configmap_config()
    path = tmp_path / key
    path.write_text(text)
    return config.load(path)


def test_the_configmap_config_passes_check_config(settings: config.Settings) -> None:
    assert {"sso", "internal"} == set(settings.providers)
    assert settings.providers["sso"].keys.discovery_url.endswith("/.well-known/openid-configuration")
    admin_route = next(r for r in settings.routes if r.name == "admin")
    assert admin_route.auth.scopes.all_of == ("orders:admin",)
    assert any(r.auth is None for r in settings.routes), "a public health route"


def ports_by_name(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_ports_probes_service_and_policy_agree_with_the_config(settings: config.Settings) -> None:
    docs = built()
    deployment = one("Deployment", docs)
    sidecar = sidecar_container(deployment)
    ports = ports_by_name(sidecar)
    assert ports == {"http": settings.listen.port, "admin": settings.admin.port}
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "admin"}
    service = one("Service", docs)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    policy_ports = sorted(p["port"] for rule in one("NetworkPolicy", docs)["spec"]["ingress"] for p in rule["ports"])
    assert policy_ports == sorted([settings.listen.port, settings.admin.port])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.admin.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    exposed = {int(p) for line in dockerfile_instruction("EXPOSE") for p in line.split()}
    assert exposed == {settings.listen.port, settings.admin.port}
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    assert one("PodDisruptionBudget", docs)["spec"]["selector"]["matchLabels"] == selector
    assert one("NetworkPolicy", docs)["spec"]["podSelector"]["matchLabels"] == selector


def test_the_image_reads_the_config_where_the_configmap_is_mounted() -> None:
    argv = entrypoint()
    assert argv[:2] == ["jwt-sidecar", "run"]
    config_path = PurePosixPath(argv[argv.index("--config") + 1])
    sidecar = sidecar_container(one("Deployment"))
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "jwt-sidecar-config")
    key, _ = configmap_config()
    assert (PurePosixPath(mount["mountPath"]), config_path.name) == (config_path.parent, key)


def test_native_sidecar_with_a_locked_down_security_context(settings: config.Settings) -> None:
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = sidecar_container(deployment)
    assert sidecar in pod["initContainers"] and sidecar["restartPolicy"] == "Always"
    context = sidecar["securityContext"]
    assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    user, group = dockerfile_instruction("USER")[0].split(":")
    assert (context["runAsUser"], context["runAsGroup"]) == (int(user), int(group))
    assert pod["terminationGracePeriodSeconds"] > settings.drain_delay + settings.drain_timeout
    resources = sidecar["resources"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]


def test_classic_variant_is_the_same_pod_without_native_sidecars() -> None:
    classic = one("Deployment", manifests("variants/deployment-classic-sidecar.yaml"))
    native = one("Deployment")
    pod = classic["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    sidecar = sidecar_container(classic)
    expected = {k: v for k, v in sidecar_container(native).items() if k != "restartPolicy"}
    assert sidecar == expected


def test_the_pod_monitor_scrapes_the_sidecars_admin_port() -> None:
    monitor = one("PodMonitor", manifests("monitoring/podmonitor.yaml"))
    deployment = one("Deployment")
    assert monitor["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in ports_by_name(sidecar_container(deployment)) and endpoint["path"] == "/metrics"
    k = manifests("monitoring/kustomization.yaml")[0]
    listed = k["resources"] + [f for g in k.get("configMapGenerator", []) for f in g["files"]]
    assert all((K8S / "monitoring" / name).is_file() for name in listed)


# -- the HS256 secret: shipped as a recipe, never as a value ---------------------------------


def test_no_manifest_in_the_repository_holds_a_secret_value() -> None:
    # `kubectl apply -k k8s/` used to deploy secret.yaml's placeholder, a key everyone knows.
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                assert doc.get("kind") != "Secret", f"{path.relative_to(K8S)} ships a Secret"
    for generator in kustomization()["secretGenerator"]:
        assert set(generator) <= {"name", "type", "files", "options"}, "no literals, no env files"


def test_the_generated_secret_file_is_kept_out_of_git() -> None:
    paths = [K8S / spec.partition("=")[2] for g in kustomization()["secretGenerator"] for spec in g["files"]]
    assert paths
    found = subprocess.run(["git", "check-ignore", "--no-index", *(str(p.relative_to(REPO)) for p in paths)], cwd=REPO,
                           capture_output=True, text=True, check=False)
    assert sorted(found.stdout.split()) == sorted(str(p.relative_to(REPO)) for p in paths), found


def test_the_documented_command_makes_the_file_the_generator_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command in kustomization.yaml's comment, run as written from the repository root.
    command = next(line.strip("# ").split() for line in (K8S / "kustomization.yaml").read_text().splitlines()
                   if "jwt-sidecar keys generate" in line)
    assert command[:3] == ["jwt-sidecar", "keys", "generate"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(command[1:]) == 0
    capsys.readouterr()
    files = {spec.partition("=")[2]: (tmp_path / "k8s" / spec.partition("=")[2]).read_bytes()
             for g in kustomization()["secretGenerator"] for spec in g["files"]}
    for name, value in sidecar_env(built(files)).items():
        monkeypatch.setenv(name, value)
    key, text = configmap_config()
    (tmp_path / key).write_text(text)
    settings = config.load(tmp_path / key)
    assert settings.providers["internal"].keys.kind == "secret"


@pytest.mark.parametrize("value", [
    "REPLACE-ME-REPLACE-ME-REPLACE-ME-REPLACE-ME-00",  # what k8s/secret.yaml shipped
    "Y2hhbmdlbWVjaGFuZ2VtZWNoYW5nZW1lY2hhbmdlbWU",     # base64url of changemechangeme...
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",     # 32 zero bytes
])
def test_a_placeholder_secret_in_the_pod_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    env = sidecar_env(built({path: value.encode() + b"\n" for path in generator_files()}))
    for name, text in env.items():
        monkeypatch.setenv(name, text)
    key, text = configmap_config()
    (tmp_path / key).write_text(text)
    with pytest.raises(config.ConfigError) as refused:
        config.load(tmp_path / key)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "INTERNAL_JWT_SECRET" in row)
    assert f"{key}:{line}: providers.internal.secret.env: refused, this is no random secret (" in str(refused.value)


def generator_files() -> list[str]:
    return [spec.partition("=")[2] for g in kustomization()["secretGenerator"] for spec in g["files"]]
