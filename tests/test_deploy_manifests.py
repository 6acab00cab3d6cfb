"""The Kubernetes manifests (deploy/), rendered offline with `kubectl kustomize` for each overlay.

Built-in kinds are validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships (strict:
unknown fields are errors); the Prometheus Operator kinds, whose schemas ship with no package, are checked
field by field here. The security checks are the ones a policy scanner would make, written as tests.
"""

from __future__ import annotations

import base64
import json
import os
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
from deploy_files import ROOT, render, run_tool, setting_env_names

from server.api.routes.ops import router

OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.37.0"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
ROUTES = {getattr(route, "path", None) for route in router.routes}
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
Objects = list[dict[str, Any]]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Objects]:
    name: str = request.param
    return name, render(ROOT / "deploy" / "overlays" / name)


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def test_every_overlay_renders_the_full_set_of_objects(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Secret",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )


def test_built_in_kinds_match_the_kubernetes_schemas(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}") from None


def test_pod_security(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key, False), key
    assert pod["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount", pod["serviceAccountName"])["automountServiceAccountToken"] is False
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] >= 1000
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for volume in pod.get("volumes", []):
        assert "hostPath" not in volume, volume["name"]
    for container in containers(deployment):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc.get("privileged", False) is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc.get("runAsNonRoot", True) is True
        image = container["image"]
        assert re.fullmatch(
            r"[\w.\-/:]+:[\w.\-]+(@sha256:[0-9a-f]{64})?|[\w.\-/:]+@sha256:[0-9a-f]{64}", image
        ), image
        assert not image.endswith(":latest")
        resources = container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), f"{container['name']}: {kind}"
        # writable paths are volumes (the root file system is read-only); /tmp holds torch's scratch files
        assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}


def test_probes_check_real_endpoints_and_allow_for_start_up(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    (server,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    for probe_name, path in (
        ("startupProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        probe = server[probe_name]
        assert probe["httpGet"]["path"] == path and path in ROUTES
        assert probe["httpGet"]["port"] in ports
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180  # backbone, bank and tasks load
    config = one(objects, "ConfigMap", _env_from(server, "configMapRef"))
    assert int(config["data"]["RECAST_PORT"]) == ports["http"]
    assert config["data"]["RECAST_HOST"] == "0.0.0.0"


def _env_from(container: dict[str, Any], kind: str) -> str:
    (name,) = [ref[kind]["name"] for ref in container["envFrom"] if kind in ref]
    return str(name)


def test_settings_and_secrets_are_real_and_placeholders(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    (server,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    config = one(objects, "ConfigMap", _env_from(server, "configMapRef"))
    secret = one(objects, "Secret", _env_from(server, "secretRef"))
    names = set(config["data"]) | set(secret["data"]) | {e["name"] for e in server.get("env", [])}
    assert names <= setting_env_names(), names - setting_env_names()
    assert set(secret["data"]) == {"RECAST_API_KEYS", "RECAST_STORE"}
    assert not set(secret["data"]) & set(config["data"])  # secrets never in the ConfigMap
    # the repository holds placeholders only: no key (the server refuses to start), a DSN to nowhere
    assert secret["data"]["RECAST_API_KEYS"] == ""
    assert "REPLACE-ME" in _decode(secret["data"]["RECAST_STORE"])
    assert _decode(secret["data"]["RECAST_STORE"]).startswith("postgresql://")
    threads = int(config["data"]["RECAST_THREADS"])
    assert threads == int(server["resources"]["limits"]["cpu"])  # torch sized to the CPU limit


def _decode(value: str) -> str:
    return base64.b64decode(value).decode()


def test_objects_reference_each_other(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in server["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = one(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_variants_request_the_right_devices(overlay: tuple[str, Objects]) -> None:
    name, objects = overlay
    deployment = one(objects, "Deployment")
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    limits = server["resources"]["limits"]
    assert server["image"].endswith(f"-{name}")
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    else:
        assert "nvidia.com/gpu" not in limits


def test_service_monitor_scrapes_the_metrics_endpoint(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    spec = monitor["spec"]
    assert isinstance(spec["selector"]["matchLabels"], dict)
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert isinstance(spec["endpoints"], list) and spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels", "scheme"}
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics" and "/metrics" in ROUTES
        assert DURATION.fullmatch(endpoint["interval"]) and DURATION.fullmatch(endpoint["scrapeTimeout"])
        # keep the server's `endpoint` label (the route) instead of the operator's port-name target label
        assert endpoint["honorLabels"] is True


def test_prometheus_rules_are_well_formed(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    rule = one(objects, "PrometheusRule")
    groups = rule["spec"]["groups"]
    assert isinstance(groups, list) and groups
    alerts = set()
    for group in groups:
        assert isinstance(group["name"], str) and isinstance(group["rules"], list)
        for item in group["rules"]:
            assert set(item) <= {"alert", "expr", "for", "labels", "annotations"}, item
            assert isinstance(item["alert"], str) and re.fullmatch(r"[A-Z][A-Za-z0-9]+", item["alert"])
            promql_parser.parse(item["expr"])  # raises on a syntax error
            if "for" in item:
                assert DURATION.fullmatch(item["for"]), item["for"]
            assert item["labels"]["severity"] in {"critical", "warning", "info"}
            assert all(isinstance(v, str) for v in item["labels"].values())
            assert isinstance(item["annotations"]["summary"], str)
            assert isinstance(item["annotations"]["description"], str)
            alerts.add(item["alert"])
    assert {
        "RecastServeHigh5xxRate",
        "RecastServeHighPredictLatency",
        "RecastServeQueueSaturated",
        "RecastServeOverloadRejections",
        "RecastServeReplicaNotReady",
        "RecastServeUploadRejections",
    } <= alerts


def test_queue_alert_threshold_follows_the_queue_setting(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    (server,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    limit = int(
        one(objects, "ConfigMap", _env_from(server, "configMapRef"))["data"]["RECAST_MAX_QUEUE_TEXTS"]
    )
    rules = {r["alert"]: r for g in one(objects, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    threshold = float(rules["RecastServeQueueSaturated"]["expr"].strip().rsplit(">", 1)[1])
    assert threshold == 0.75 * limit


def test_grafana_dashboard_config_map(overlay: tuple[str, Objects]) -> None:
    _, objects = overlay
    config_map = one(objects, "ConfigMap", "recast-serve-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = config_map["data"].values()
    dashboard = json.loads(text)
    assert dashboard["uid"] == "recast-serve" and dashboard["title"]
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "request rate",
        "p50",
        "p95",
        "p99",
        "batch size",
        "queue depth",
        "tasks resident",
        "rejections",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])


def test_yamllint_accepts_the_deployment_files() -> None:
    result = run_tool(
        "yamllint", "-c", ".yamllint", "-s", "deploy", "docker/compose.yaml", ".yamllint", ".hadolint.yaml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_operators_overlay_replaces_the_placeholder_secret(tmp_path: Path) -> None:
    """The procedure of deploy/README.md: an overlay of one's own, with the real values in an env file."""
    (tmp_path / "recast.env").write_text(
        "RECAST_API_KEYS=key-one,key-two\nRECAST_STORE=postgresql://recast:s3cret@db.internal:5432/recast\n"
    )
    cpu = os.path.relpath(ROOT / "deploy" / "overlays" / "cpu", tmp_path)  # kustomize wants a relative path
    (tmp_path / "kustomization.yaml").write_text(
        textwrap.dedent(
            f"""\
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            resources:
              - {cpu}
            secretGenerator:
              - name: recast-serve
                behavior: replace
                envs:
                  - recast.env
            """
        )
    )
    objects = render(tmp_path)
    (server,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    secret = one(objects, "Secret", _env_from(server, "secretRef"))
    assert _decode(secret["data"]["RECAST_API_KEYS"]) == "key-one,key-two"
    assert _decode(secret["data"]["RECAST_STORE"]).endswith("@db.internal:5432/recast")
