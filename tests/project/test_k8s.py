"""k8s/ and the Dockerfile: valid for Kubernetes 1.29+, and consistent with each other and the config."""

from __future__ import annotations

import fnmatch
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config import builder as config
from proxy.config.yamlsource import parse_duration
from proxy.tools import cli
from tests.k8s_support import (
    K8S,
    REPO,
    built,
    dockerfile_instruction,
    entrypoint,
    kustomization,
    manifests,
    mounted_files,
    one,
    pod_config,
    pod_containers,
    sidecar_container,
    split_image,
)

CONFIG = "config.yaml"
"""The sidecar's config in k8s/: the source of the generated ConfigMap, not a manifest."""
FILES = sorted(
    str(p.relative_to(K8S))
    for p in K8S.rglob("*.yaml")
    if p.name != "kustomization.yaml" and p != K8S / CONFIG and "monitoring" not in p.parts
)
VARIANTS = sorted(str(p.relative_to(K8S)) for p in (K8S / "variants").glob("*.yaml"))
DEPLOYMENTS = ["deployment.yaml", *VARIANTS]
"""The Deployment and the variants that replace it in kustomization.yaml."""


# 1.30: the oldest release with all the manifests use on by default (native sidecars from
# 1.29, the preStop `sleep` action from 1.30), as the README says.
@pytest.mark.parametrize("version", ["1.30", "1.37"])
@pytest.mark.parametrize("name", FILES)
def test_every_manifest_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    for doc in manifests(name):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", ["1.30", "1.37"])
@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_what_kustomize_builds_validates_against_the_kubernetes_schema(version: str, deployment: str) -> None:
    # The generated ConfigMap and Secret included: they are shipped as generators, not as files.
    for doc in built(deployment=deployment):
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_is_plain_resources_and_lists_every_manifest() -> None:
    k = kustomization()
    # No other transformers, so the kustomize output is exactly the listed files plus the
    # generated ConfigMap and Secret, with the images set (see tests.k8s_support.built).
    assert set(k) == {"apiVersion", "kind", "resources", "images", "configMapGenerator", "secretGenerator"}
    top_level = sorted(p.name for p in K8S.glob("*.yaml") if p.name not in ("kustomization.yaml", CONFIG))
    assert sorted(k["resources"]) == top_level
    kinds = [d["kind"] for d in built()]
    assert sorted(kinds) == sorted(
        ["ConfigMap", "Secret", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"]
    )


@pytest.fixture(params=DEPLOYMENTS)
def deployment(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(tmp_path: Path, deployment: str) -> config.Settings:
    """The config as the sidecar of that Deployment loads it in its Pod."""
    return config.load(pod_config(tmp_path, built(deployment=deployment)))


def test_the_configmap_config_passes_check_config(settings: config.Settings) -> None:
    assert {"sso", "internal"} == set(settings.providers)
    assert settings.providers["sso"].keys.discovery_url.endswith("/.well-known/openid-configuration")
    admin_route = next(r for r in settings.routes if r.name == "admin")
    assert admin_route.auth.scopes.all_of == ("orders:admin",)
    assert any(r.auth is None for r in settings.routes), "a public health route"


def test_the_deployed_sidecar_logs_json_lines_for_the_log_collector(settings: config.Settings) -> None:
    # The README's "Issuer down at start" tells the operator to read JSON events from `kubectl logs`.
    assert settings.log_format == "json"
    assert settings.access_log


def test_a_client_address_header_is_kept_only_when_the_policy_admits_no_one_but_an_ingress(
    settings: config.Settings, deployment: str
) -> None:
    # k8s/config.yaml's comment: behind ingress-nginx, keeping X-Real-IP is safe only when
    # nothing but the ingress reaches the proxy port; the example policy admits every Pod.
    docs = built(deployment=deployment)
    rules = [
        r
        for r in one("NetworkPolicy", docs)["spec"]["ingress"]
        if settings.listen.port in [p["port"] for p in r["ports"]]
    ]
    from_anywhere = any("from" not in rule for rule in rules)
    assert from_anywhere, "the example admits port 8080 from every Pod (update this test with the comment)"
    assert settings.strip.kept == (), "a kept client-address header would be any Pod's word"
    assert {"X-Real-IP", "CF-Connecting-IP"} <= set(settings.strip.names)


def ports_by_name(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_ports_probes_service_and_policy_agree_with_the_config(settings: config.Settings, deployment: str) -> None:
    docs = built(deployment=deployment)
    deployment = one("Deployment", docs)
    sidecar = sidecar_container(deployment)
    ports = ports_by_name(sidecar)
    assert ports == {"http": settings.listen.port, "admin": settings.admin.port}
    # The startup probe holds the app back until keys are loaded (tests/integration/
    # test_k8s_startup.py runs it); liveness never asks about keys or draining.
    for probe, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert sidecar[probe]["httpGet"] == {"path": path, "port": "admin"}
    # An issuer down at start: the sidecar retries every min_refresh_interval while it holds no
    # keys, and the kubelet restarts it only after several of those retries have failed.
    startup = sidecar["startupProbe"]
    remote = [p.keys for p in settings.providers.values() if isinstance(p.keys, config.RemoteJwks)]
    retry = max(keys.min_refresh_interval for keys in remote)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 5 * retry
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


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_the_image_reads_k8s_config_yaml_where_the_configmap_is_mounted(deployment: str) -> None:
    argv = entrypoint()
    assert argv[:2] == ["jwt-sidecar", "run"]
    config_path = PurePosixPath(argv[argv.index("--config") + 1])
    files = mounted_files(built(deployment=deployment))
    assert files[config_path] == (K8S / CONFIG).read_bytes(), "the Pod runs k8s/config.yaml as it is"


# -- k8s/config.yaml is what is deployed, and what check-config checks -----------------------


def test_the_configmap_is_generated_from_k8s_config_yaml_and_mounted_by_its_name() -> None:
    (generator,) = kustomization()["configMapGenerator"]
    assert generator["files"] == [CONFIG]
    assert not (K8S / "configmap.yaml").exists(), "no second, hand-written copy of the config"
    for name in DEPLOYMENTS:
        pod = one("Deployment", built(deployment=name))["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "jwt-sidecar-config")
        refs = {kind: src[kind]["name"] for src in volume["projected"]["sources"] for kind in src}
        assert refs == {"configMap": generator["name"], "secret": kustomization()["secretGenerator"][0]["name"]}


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_the_sidecar_user_can_read_every_file_it_mounts(deployment: str) -> None:
    # A "hardened" defaultMode: 0400 would leave the files to root, and the sidecar (UID 10001)
    # could not read its config or its secret: it would refuse to start.
    pod = one("Deployment", built(deployment=deployment))["spec"]["template"]["spec"]
    sidecar = sidecar_container(one("Deployment", built(deployment=deployment)))
    volumes = {v["name"]: v for v in pod["volumes"]}
    in_group = pod.get("securityContext", {}).get("fsGroup") is not None
    for mount in sidecar["volumeMounts"]:
        volume = volumes[mount["name"]]
        kind = next((k for k in ("configMap", "secret", "projected") if k in volume), None)
        if kind is None:
            continue
        refs = [src[k] for src in volume[kind]["sources"] for k in src] if kind == "projected" else [volume[kind]]
        default = volume[kind].get("defaultMode", 0o644)
        for ref in refs:
            for item in ref.get("items", [{}]):
                mode = item.get("mode", default)
                assert mode & 0o004 or (in_group and mode & 0o040), f"{mount['name']}: mode {mode:o}"


def readme_deploy_commands() -> list[list[str]]:
    """The command lines of the README's "Deploy on Kubernetes" code block, comments cut."""
    section = (REPO / "README.md").read_text().split("## Deploy on Kubernetes", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_check_config_as_the_readme_runs_it_passes_on_k8s_config_yaml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A checkout without the secret (it is never committed): the README's commands, as written,
    # from the repository root, make it and check the very file the ConfigMap is made from.
    (tmp_path / "k8s").mkdir()
    shutil.copy(K8S / CONFIG, tmp_path / "k8s" / CONFIG)
    monkeypatch.chdir(tmp_path)
    commands = [c for c in readme_deploy_commands() if c[0] == "jwt-sidecar"]
    assert [c[:2] for c in commands] == [["jwt-sidecar", "keys"], ["jwt-sidecar", "check-config"]]
    generate, check = commands
    assert cli.main(generate[1:]) == 0
    capsys.readouterr()
    assert check[2:] == [f"k8s/{CONFIG}"], "the README checks the file that is deployed"
    assert cli.main(check[1:]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"k8s/{CONFIG}: OK"
    assert f"keys: secret file {tmp_path / 'k8s' / 'secrets' / 'internal.secret'}" in out


def test_check_config_on_k8s_config_yaml_fails_without_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "k8s").mkdir()
    shutil.copy(K8S / CONFIG, tmp_path / "k8s" / CONFIG)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check-config", f"k8s/{CONFIG}"]) == 1
    err = capsys.readouterr().err
    assert f"k8s/{CONFIG}:" in err and "providers.internal.secret.file: " in err, err


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_images_are_set_once_in_the_kustomization(deployment: str) -> None:
    entries = {e["name"]: e for e in kustomization()["images"]}
    source = one("Deployment", manifests(deployment))
    placeholders = [c["image"] for c in pod_containers(source)]
    # The Deployment names placeholders only: nothing there to edit, and nothing pullable
    # (a registry, a tag or a digest) that would make an unedited image look deliberate.
    assert sorted(placeholders) == sorted(entries)
    for image in placeholders:
        assert split_image(image) == (image, None, None) and "/" not in image and "." not in image
    images = {c["name"]: c["image"] for c in pod_containers(one("Deployment", built(deployment=deployment)))}
    assert images == {
        "jwt-sidecar": f"{entries['jwt-sidecar']['newName']}:{entries['jwt-sidecar']['newTag']}",
        "app": f"{entries['orders-api']['newName']}:{entries['orders-api']['newTag']}",
    }
    assert all(isinstance(e["newTag"], str) for e in entries.values()), "a tag such as 1.10 must stay text"


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("jwt-sidecar", ("jwt-sidecar", None, None)),
        ("ghcr.io/you/jwt-sidecar:0.1.0", ("ghcr.io/you/jwt-sidecar", "0.1.0", None)),
        ("registry.local:5000/jwt-sidecar", ("registry.local:5000/jwt-sidecar", None, None)),
        ("registry.local:5000/jwt-sidecar:1@sha256:ab", ("registry.local:5000/jwt-sidecar", "1", "sha256:ab")),
    ],
)
def test_image_references_split_as_kustomize_reads_them(image: str, parts: tuple[str, str | None, str | None]) -> None:
    assert split_image(image) == parts


def test_native_sidecar_with_a_locked_down_security_context(tmp_path: Path) -> None:
    settings = config.load(pod_config(tmp_path))
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


MARGIN = 5
"""Seconds of the grace period left once every step of the stop has used its whole budget."""


def app_stop_budget(app: dict[str, Any]) -> tuple[float, float]:
    """(preStop sleep, SHUTDOWN_TIMEOUT) of the app container, in seconds."""
    pre_stop = app["lifecycle"]["preStop"]
    assert set(pre_stop) == {"sleep"}, "the kubelet sleeps: nothing needed in the app image"
    env = {e["name"]: e["value"] for e in app["env"]}
    return float(pre_stop["sleep"]["seconds"]), parse_duration(env["SHUTDOWN_TIMEOUT"])


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_the_grace_period_covers_the_apps_drain_and_the_sidecars(tmp_path: Path, deployment: str) -> None:
    docs = built(deployment=deployment)
    settings = config.load(pod_config(tmp_path, docs))
    pod_doc = one("Deployment", docs)
    pod = pod_doc["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    (app,) = [c for c in pod["containers"] if c["name"] == "app"]
    sleep, shutdown = app_stop_budget(app)
    sidecar_drain = settings.drain_delay + settings.drain_timeout
    if sidecar_container(pod_doc) in pod.get("initContainers", []):
        # Native: the app is stopped first (preStop, then SIGTERM) and the sidecar only once the
        # app has exited, one after the other within the one grace period.
        assert sleep >= settings.drain_delay, "the app keeps serving while the endpoint is removed"
        assert grace >= sleep + shutdown + sidecar_drain + MARGIN
    else:
        # Classic: both are stopped together, so the app must outlive the sidecar's drain.
        assert sleep >= sidecar_drain
        assert grace >= max(sleep + shutdown, sidecar_drain) + MARGIN
    for container in pod_containers(pod_doc):
        assert "exec" not in container.get("lifecycle", {}).get("preStop", {}), "no binary needed in any image"


def test_the_readme_states_the_shutdown_numbers_the_manifests_use(tmp_path: Path) -> None:
    docs = built()
    settings = config.load(pod_config(tmp_path, docs))
    pod = one("Deployment", docs)["spec"]["template"]["spec"]
    sleep, shutdown = app_stop_budget(pod["containers"][0])
    grace = pod["terminationGracePeriodSeconds"]
    readme = " ".join((REPO / "README.md").read_text().split())
    spare = grace - (sleep + shutdown + settings.drain_delay + settings.drain_timeout)
    assert (
        f"`terminationGracePeriodSeconds: {grace}` covers it all: {sleep:g} s preStop + {shutdown:g} s app + "
        f"{settings.drain_delay:g} s `drain_delay` + {settings.drain_timeout:g} s `drain_timeout` + "
        f"{spare:g} s to spare"
    ) in readme
    assert (f"(k8s/ uses {settings.drain_delay:g}s + {settings.drain_timeout:g}s and {grace}s") in readme
    classic = one("Deployment", manifests(*VARIANTS))["spec"]["template"]["spec"]
    (classic_app,) = [c for c in classic["containers"] if c["name"] == "app"]
    assert f"`preStop` sleeps {app_stop_budget(classic_app)[0]:g} s" in readme
    assert classic["terminationGracePeriodSeconds"] == grace, "the README gives both the same grace period"


def test_classic_variant_is_the_same_pod_without_native_sidecars() -> None:
    classic = one("Deployment", built(deployment="variants/deployment-classic-sidecar.yaml"))
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
    found = subprocess.run(
        ["git", "check-ignore", "--no-index", *(str(p.relative_to(REPO)) for p in paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert sorted(found.stdout.split()) == sorted(str(p.relative_to(REPO)) for p in paths), found


def test_the_generated_secret_file_never_enters_the_image_build() -> None:
    # The README has the operator make k8s/secrets/internal.secret and then run `docker build .`
    # in the same checkout: the build context is an allow-list that leaves k8s/ out.
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*", "everything is excluded first"
    allowed = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    for path in generator_files():
        in_repo = PurePosixPath("k8s") / path
        for rule in allowed:
            assert not (
                fnmatch.fnmatch(str(in_repo), rule)
                or in_repo.is_relative_to(rule)
                or any(fnmatch.fnmatch(str(parent), rule) for parent in in_repo.parents)
            ), rule


def test_the_documented_command_makes_the_file_the_generator_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command in kustomization.yaml's comment, run as written from the repository root.
    command = next(
        line.strip("# ").split()
        for line in (K8S / "kustomization.yaml").read_text().splitlines()
        if "jwt-sidecar keys generate" in line
    )
    assert command[:3] == ["jwt-sidecar", "keys", "generate"]
    monkeypatch.chdir(tmp_path)
    assert cli.main(command[1:]) == 0
    capsys.readouterr()
    files = {
        spec.partition("=")[2]: (tmp_path / "k8s" / spec.partition("=")[2]).read_bytes()
        for g in kustomization()["secretGenerator"]
        for spec in g["files"]
    }
    settings = config.load(pod_config(tmp_path / "pod", built(files)))
    assert settings.providers["internal"].keys.kind == "secret"
    made = (tmp_path / "k8s" / generator_files()[0]).read_text().strip()
    assert settings.providers["internal"].keys.jwks["keys"][0]["k"] == made, "the Pod verifies with the file made"


@pytest.mark.parametrize(
    "value",
    [
        "REPLACE-ME-REPLACE-ME-REPLACE-ME-REPLACE-ME-00",  # what k8s/secret.yaml shipped
        "Y2hhbmdlbWVjaGFuZ2VtZWNoYW5nZW1lY2hhbmdlbWU",  # base64url of changemechangeme...
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # 32 zero bytes
    ],
)
def test_a_placeholder_secret_in_the_pod_refuses_to_start(tmp_path: Path, value: str) -> None:
    path = pod_config(tmp_path, built({name: value.encode() + b"\n" for name in generator_files()}))
    with pytest.raises(config.ConfigError) as refused:
        config.load(path)
    line = next(n for n, row in enumerate(path.read_text().splitlines(), 1) if row.strip().startswith("secret:"))
    assert f"{path}:{line}: providers.internal.secret.file: refused, this is no random secret (" in str(refused.value)


def generator_files() -> list[str]:
    return [spec.partition("=")[2] for g in kustomization()["secretGenerator"] for spec in g["files"]]
