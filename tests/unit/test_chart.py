"""The Helm chart, rendered by Helm itself (helm-python-sdk: Helm's Go SDK, no cluster).

``make test`` installs helm-python-sdk (tests/requirements-tools.txt). Without it these
tests fail rather than skip. Helm runs in a child process, so its Go runtime never
shares the test process.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokengate.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tokengate"
NAMESPACE = "edge"

# Runs in a child process: lints the chart, then renders each case.
HELM = """
import json, sys
import helm_python as helm

chart, cases = sys.argv[1], json.load(sys.stdin)
out = {"lint": helm.lint(chart, strict=True), "renders": {}, "errors": {}}
out["lint-postgresql"] = helm.lint(chart, cases["postgresql"]["values"], strict=True)
with helm.Chart.load(chart) as loaded:
    for key, case in cases.items():
        try:
            out["renders"][key] = loaded.render(
                case["values"], name=case["name"], namespace=case["namespace"]
            )
        except helm.HelmRenderError as error:  # the chart's own `fail`s
            out["errors"][key] = str(error)
json.dump(out, sys.stdout)
"""

MONITORING = {
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {"enabled": True},
    }
}
OTHER_ISSUERS = {
    "authserver": {"service": {"port": 8443}},
    "config": {
        "gateway": {
            "listen": "0.0.0.0:8080",
            "routes": [],
            "issuers": [
                {  # the release's own server with an explicit jwks_uri: kept
                    "issuer": "https://auth.example.com/oauth2/default",
                    "audiences": ["api://default"],
                    "jwks_uri": "http://keys.example.com/jwks.json",
                },
                {  # an outside issuer: used as written (discovery)
                    "issuer": "https://example.okta.com/oauth2/default",
                    "audiences": ["api://default"],
                },
            ],
        }
    },
}
# With PostgreSQL: a store URL with a password, and a KEK (32 bytes, base64).
STORE_URL = "postgresql://tokengate:pg-Pa55word@pg.db.svc:5432/tokengate"
KEK = "dG9rZW5nYXRlLWNoYXJ0LXRlc3Qta2VrLTMyYnl0ZXM="  # b"tokengate-chart-test-kek-32bytes"
POSTGRESQL = {
    "authserver": {"store": {"type": "postgresql", "url": STORE_URL, "keyEncryptionKey": KEK}}
}
POSTGRESQL_EXISTING_SECRET = {
    "authserver": {"store": {"type": "postgresql", "existingSecret": "tokengate-store"}},
    "extraEnvFromSecret": "tokengate-env",
}
POSTGRESQL_FIXED = {
    "authserver": {
        "store": {"type": "postgresql", "existingSecret": "tokengate-store"},
        "replicas": 3,
        "autoscaling": {"enabled": False},
        "podDisruptionBudget": {"minAvailable": 2},
        "migration": {"backoffLimit": 5, "activeDeadlineSeconds": 120},
    }
}
CASES: dict[str, dict[str, Any]] = {
    "default": {"name": "tokengate", "values": {}},
    "renamed": {"name": "payments-edge", "values": {}},
    "monitoring": {"name": "payments-edge", "values": MONITORING},
    "other-issuers": {"name": "payments-edge", "values": OTHER_ISSUERS},
    "no-authserver": {"name": "payments-edge", "values": {"authserver": {"enabled": False}}},
    "postgresql": {"name": "payments-edge", "values": POSTGRESQL},
    "postgresql-existing-secret": {"name": "tokengate", "values": POSTGRESQL_EXISTING_SECRET},
    "postgresql-fixed": {"name": "payments-edge", "values": POSTGRESQL_FIXED},
    "postgresql-no-authserver": {
        "name": "payments-edge",
        "values": {"authserver": {**POSTGRESQL["authserver"], "enabled": False}},
    },
}
# Values the chart refuses, with (part of) its message.
PG = {"type": "postgresql"}
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-store-type": (
        {"authserver": {"store": {"type": "mysql"}}},
        "authserver.store.type must be sqlite or postgresql, not mysql",
    ),
    "no-secret": (
        {"authserver": {"store": PG}},
        "authserver.store.type postgresql needs existingSecret",
    ),
    "both-secrets": (
        {"authserver": {"store": {**PG, "existingSecret": "s", "url": STORE_URL}}},
        "set either existingSecret or url and keyEncryptionKey, not both",
    ),
    "not-a-postgresql-url": (
        {"authserver": {"store": {**PG, "url": "mysql://db/tokengate", "keyEncryptionKey": KEK}}},
        "authserver.store.url must be a postgresql:// (or postgres://) URL",
    ),
    "short-kek": (
        {"authserver": {"store": {**PG, "url": STORE_URL, "keyEncryptionKey": "c2hvcnQ="}}},
        "keyEncryptionKey must be 32 random bytes, base64 (openssl rand -base64 32)",
    ),
    "store-in-config": (
        {"config": {"authserver": {"store": STORE_URL}}},
        "config.authserver.store and config.authserver.key_encryption_key are set by the chart",
    ),
}


@pytest.fixture(scope="module")
def helm() -> dict[str, Any]:
    if importlib.util.find_spec("helm_python") is None:
        pytest.fail(
            "helm-python-sdk is not installed: `make test` installs tests/requirements-tools.txt",
            pytrace=False,
        )
    cases = {key: {**case, "namespace": NAMESPACE} for key, case in CASES.items()}
    for key, (values, _) in REFUSED.items():
        cases[f"refused:{key}"] = {"name": "tokengate", "values": values, "namespace": NAMESPACE}
    result = subprocess.run(
        [sys.executable, "-c", HELM, str(CHART)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def manifests(helm: dict[str, Any], case: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The rendered objects of a case by (kind, name)."""
    objects = {}
    for text in helm["renders"][case].values():
        for doc in yaml.safe_load_all(text):
            if doc:
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def tokengate_config(helm: dict[str, Any], case: str) -> tuple[str, dict[str, Any]]:
    name = CASES[case]["name"]
    text = manifests(helm, case)[("ConfigMap", f"{name}-config")]["data"]["tokengate.yaml"]
    return text, yaml.safe_load(text)


@pytest.mark.parametrize("lint", ["lint", "lint-postgresql"])
def test_helm_lints_the_chart_clean(helm: dict[str, Any], lint: str) -> None:
    assert helm[lint]["errors"] == []
    assert [m for m in helm[lint]["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", list(CASES))
def test_every_object_is_named_after_the_release(helm: dict[str, Any], case: str) -> None:
    name = CASES[case]["name"]
    objects = manifests(helm, case)
    assert ("Deployment", f"{name}-gateway") in objects
    for kind, object_name in objects:
        assert object_name.startswith(name), (kind, object_name)
        labels = objects[(kind, object_name)]["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == name


@pytest.mark.parametrize("case", ["default", "renamed"])
def test_the_gateway_fetches_keys_from_its_own_releases_authserver(
    helm: dict[str, Any], case: str
) -> None:
    name = CASES[case]["name"]
    objects = manifests(helm, case)
    service = objects[("Service", f"{name}-authserver")]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    text, config = tokengate_config(helm, case)
    [issuer] = config["gateway"]["issuers"]
    assert issuer["jwks_uri"] == f"http://{name}-authserver:{port}/oauth2/default/v1/keys"
    parsed = parse_config(text, {})  # still a valid tokengate config
    assert parsed.gateway is not None
    assert [i.jwks_uri for i in parsed.gateway.issuers] == [issuer["jwks_uri"]]


def test_explicit_jwks_uris_and_outside_issuers_are_kept(helm: dict[str, Any]) -> None:
    text, config = tokengate_config(helm, "other-issuers")
    own, outside = config["gateway"]["issuers"]
    assert own["jwks_uri"] == "http://keys.example.com/jwks.json"
    assert "jwks_uri" not in outside
    parse_config(text, {})


def test_no_authserver_no_in_cluster_jwks_uri(helm: dict[str, Any]) -> None:
    objects = manifests(helm, "no-authserver")
    assert not any(kind == "StatefulSet" for kind, _ in objects)
    text, config = tokengate_config(helm, "no-authserver")
    assert "jwks_uri" not in config["gateway"]["issuers"][0]
    parse_config(text, {})


def test_the_authserver_service_port_is_followed(helm: dict[str, Any]) -> None:
    objects = manifests(helm, "other-issuers")
    ports = objects[("Service", "payments-edge-authserver")]["spec"]["ports"]
    assert {"name": "http", "port": 8443, "targetPort": "http"} in ports


def test_monitoring_objects_carry_the_extra_labels(helm: dict[str, Any]) -> None:
    objects = manifests(helm, "monitoring")
    for kind in ("ServiceMonitor", "PrometheusRule"):
        labels = objects[(kind, "payments-edge")]["metadata"]["labels"]
        assert labels["release"] == "kube-prometheus-stack", kind
        assert labels["app.kubernetes.io/instance"] == "payments-edge", kind
    rule = objects[("PrometheusRule", "payments-edge")]
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    dashboard = objects[("ConfigMap", "payments-edge-dashboard")]
    json.loads(dashboard["data"]["tokengate.json"])


def test_monitoring_objects_are_off_by_default(helm: dict[str, Any]) -> None:
    objects = manifests(helm, "default")
    assert not {kind for kind, _ in objects} & {"ServiceMonitor", "PrometheusRule"}
    assert ("ConfigMap", "tokengate-dashboard") not in objects


# The authorization server's store: SQLite (a StatefulSet) or PostgreSQL (a Deployment).

HOOK = {
    "helm.sh/hook": "pre-install,pre-upgrade",
    "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
}
STORE_ENV = [
    {"name": "TOKENGATE_CONFIG", "value": "/etc/tokengate/tokengate.yaml"},
    {
        "name": "TOKENGATE_STORE_URL",
        "valueFrom": {"secretKeyRef": {"name": "{secret}", "key": "store-url"}},
    },
    {
        "name": "TOKENGATE_KEK",
        "valueFrom": {"secretKeyRef": {"name": "{secret}", "key": "key-encryption-key"}},
    },
]


def store_env(secret: str) -> list[dict[str, Any]]:
    return json.loads(json.dumps(STORE_ENV).replace("{secret}", secret))


def authserver_kinds(objects: dict[tuple[str, str], dict[str, Any]], name: str) -> set[str]:
    return {kind for kind, object_name in objects if object_name == f"{name}-authserver"}


@pytest.mark.parametrize("case", ["default", "renamed"])
def test_by_default_the_authserver_is_one_statefulset_replica_on_a_volume(
    helm: dict[str, Any], case: str
) -> None:
    name = CASES[case]["name"]
    objects = manifests(helm, case)
    assert authserver_kinds(objects, name) == {"StatefulSet", "Service"}
    statefulset = objects[("StatefulSet", f"{name}-authserver")]
    assert statefulset["spec"]["replicas"] == 1
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"] == {"requests": {"storage": "1Gi"}}
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [
        {"name": "TOKENGATE_CONFIG", "value": "/etc/tokengate/tokengate.yaml"}
    ]
    assert {"name": "data", "mountPath": "/var/lib/tokengate"} in container["volumeMounts"]
    assert {kind for kind, _ in objects} == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "StatefulSet",
    }
    assert ("Job", f"{name}-migrate") not in objects
    assert not any(kind == "Secret" for kind, _ in objects)
    assert [n for kind, n in objects if kind == "ConfigMap"] == [f"{name}-config"]
    _, config = tokengate_config(helm, case)
    assert "store" not in config["authserver"]
    assert "key_encryption_key" not in config["authserver"]
    gateway = objects[("Deployment", f"{name}-gateway")]["spec"]["template"]["spec"]
    assert gateway["volumes"][0] == {"name": "config", "configMap": {"name": f"{name}-config"}}


def test_with_postgresql_the_authserver_is_an_autoscaled_deployment(
    helm: dict[str, Any],
) -> None:
    objects = manifests(helm, "postgresql")
    assert authserver_kinds(objects, "payments-edge") == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    assert not any(kind in ("StatefulSet", "PersistentVolumeClaim") for kind, _ in objects)
    deployment = objects[("Deployment", "payments-edge-authserver")]
    assert "replicas" not in deployment["spec"]  # the HPA's
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "tokengate",
        "app.kubernetes.io/instance": "payments-edge",
        "app.kubernetes.io/component": "authserver",
    }
    pod = deployment["spec"]["template"]["spec"]
    assert "volumeClaimTemplates" not in deployment["spec"]
    assert pod["volumes"] == [
        {"name": "config", "configMap": {"name": "payments-edge-config"}},
        {"name": "data", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    [container] = pod["containers"]
    assert container["args"] == ["run", "--only", "authserver", "--workers", "2"]
    assert container["env"] == store_env("payments-edge-store")
    assert "envFrom" not in container
    assert container["livenessProbe"] == {
        "httpGet": {"path": "/healthz", "port": "admin"},
        "periodSeconds": 10,
        "failureThreshold": 3,
    }
    assert container["readinessProbe"] == {
        "httpGet": {"path": "/readyz", "port": "admin"},
        "periodSeconds": 5,
        "failureThreshold": 2,
    }
    hpa = objects[("HorizontalPodAutoscaler", "payments-edge-authserver")]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "payments-edge-authserver",
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["resource"]["target"] == {
        "type": "Utilization",
        "averageUtilization": 70,
    }
    pdb = objects[("PodDisruptionBudget", "payments-edge-authserver")]["spec"]
    assert pdb == {
        "minAvailable": 1,
        "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }
    service = objects[("Service", "payments-edge-authserver")]["spec"]
    assert service["selector"] == deployment["spec"]["template"]["metadata"]["labels"]


def test_with_autoscaling_off_the_deployment_has_the_replicas_set(helm: dict[str, Any]) -> None:
    objects = manifests(helm, "postgresql-fixed")
    assert objects[("Deployment", "payments-edge-authserver")]["spec"]["replicas"] == 3
    assert ("HorizontalPodAutoscaler", "payments-edge-authserver") not in objects
    pdb = objects[("PodDisruptionBudget", "payments-edge-authserver")]
    assert pdb["spec"]["minAvailable"] == 2
    job = objects[("Job", "payments-edge-migrate")]["spec"]
    assert (job["backoffLimit"], job["activeDeadlineSeconds"]) == (5, 120)


def test_with_postgresql_the_config_names_the_secret_through_the_environment(
    helm: dict[str, Any],
) -> None:
    _, config = tokengate_config(helm, "postgresql")
    assert config["authserver"].pop("store") == "${TOKENGATE_STORE_URL}"
    assert config["authserver"].pop("key_encryption_key") == "${TOKENGATE_KEK}"
    assert config == tokengate_config(helm, "renamed")[1]  # otherwise the same


def test_with_postgresql_the_gateway_reads_a_config_without_the_authserver(
    helm: dict[str, Any],
) -> None:
    objects = manifests(helm, "postgresql")
    _, config = tokengate_config(helm, "postgresql")
    gateway_config = objects[("ConfigMap", "payments-edge-gateway-config")]
    text = gateway_config["data"]["tokengate.yaml"]
    assert yaml.safe_load(text) == {k: v for k, v in config.items() if k != "authserver"}
    parsed = parse_config(text, {})  # no TOKENGATE_STORE_URL or TOKENGATE_KEK needed
    assert parsed.authserver is None
    assert parsed.gateway is not None
    assert [i.jwks_uri for i in parsed.gateway.issuers] == [
        "http://payments-edge-authserver:9000/oauth2/default/v1/keys"
    ]
    pod = objects[("Deployment", "payments-edge-gateway")]["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {
        "name": "config",
        "configMap": {"name": "payments-edge-gateway-config"},
    }
    assert pod["containers"][0]["env"] == [
        {"name": "TOKENGATE_CONFIG", "value": "/etc/tokengate/tokengate.yaml"}
    ]


@pytest.mark.parametrize("case", ["postgresql", "postgresql-existing-secret", "postgresql-fixed"])
def test_no_secret_is_in_any_configmap(helm: dict[str, Any], case: str) -> None:
    objects = manifests(helm, case)
    configmaps = [obj for (kind, _), obj in objects.items() if kind == "ConfigMap"]
    assert len(configmaps) == 3  # the release's, the gateway's, the migration Job's
    for configmap in configmaps:
        text = json.dumps(configmap)
        for secret in (STORE_URL, "pg-Pa55word", KEK):
            assert secret not in text, configmap["metadata"]["name"]


def test_the_chart_creates_the_store_secret_from_values(helm: dict[str, Any]) -> None:
    objects = manifests(helm, "postgresql")
    secrets = {name: obj for (kind, name), obj in objects.items() if kind == "Secret"}
    assert set(secrets) == {"payments-edge-store", "payments-edge-migrate"}
    for secret in secrets.values():
        data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert data == {"store-url": STORE_URL, "key-encryption-key": KEK}
        assert secret["type"] == "Opaque"
    assert "annotations" not in secrets["payments-edge-store"]["metadata"]
    assert secrets["payments-edge-migrate"]["metadata"]["annotations"] == {
        **HOOK,
        "helm.sh/hook-weight": "-10",
    }


def test_an_existing_store_secret_is_used_and_none_created(helm: dict[str, Any]) -> None:
    objects = manifests(helm, "postgresql-existing-secret")
    assert not any(kind == "Secret" for kind, _ in objects)
    deployment = objects[("Deployment", "tokengate-authserver")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["env"] == store_env("tokengate-store")
    assert container["envFrom"] == [{"secretRef": {"name": "tokengate-env"}}]
    [job] = objects[("Job", "tokengate-migrate")]["spec"]["template"]["spec"]["containers"]
    assert job["env"] == store_env("tokengate-store")
    assert job["envFrom"] == [{"secretRef": {"name": "tokengate-env"}}]


@pytest.mark.parametrize(
    ("case", "secret"),
    [("postgresql", "payments-edge-migrate"), ("postgresql-existing-secret", "tokengate-store")],
)
def test_the_migration_job_is_a_hook_with_its_own_configmap(
    helm: dict[str, Any], case: str, secret: str
) -> None:
    name = CASES[case]["name"]
    objects = manifests(helm, case)
    job = objects[("Job", f"{name}-migrate")]
    assert job["metadata"]["annotations"] == {**HOOK, "helm.sh/hook-weight": "0"}
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["activeDeadlineSeconds"] == 600
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    [container] = pod["containers"]
    assert container["image"] == "tokengate:0.1.0"
    assert container["args"] == ["db", "migrate", "--config", "/etc/tokengate/tokengate.yaml"]
    assert container["env"] == store_env(secret)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Not the release's ConfigMap (a pre-install hook runs before it exists): its own,
    # created first (lower weight), with the same configuration.
    assert pod["volumes"][0] == {"name": "config", "configMap": {"name": f"{name}-migrate"}}
    configmap = objects[("ConfigMap", f"{name}-migrate")]
    assert configmap["metadata"]["annotations"] == {**HOOK, "helm.sh/hook-weight": "-10"}
    assert configmap["data"] == objects[("ConfigMap", f"{name}-config")]["data"]
    ordinary = [
        obj
        for (kind, _), obj in objects.items()
        if kind != "Job" and obj["metadata"].get("annotations", {}).get("helm.sh/hook")
    ]
    assert sorted(o["kind"] for o in ordinary) == (
        ["ConfigMap", "Secret"] if case == "postgresql" else ["ConfigMap"]
    )


def test_without_an_authserver_postgresql_renders_nothing_for_it(helm: dict[str, Any]) -> None:
    objects = manifests(helm, "postgresql-no-authserver")
    assert sorted(objects) == sorted(manifests(helm, "no-authserver"))
    assert sorted(objects) == [
        ("ConfigMap", "payments-edge-config"),
        ("Deployment", "payments-edge-gateway"),
        ("HorizontalPodAutoscaler", "payments-edge-gateway"),
        ("PodDisruptionBudget", "payments-edge-gateway"),
        ("Service", "payments-edge-gateway"),
    ]


@pytest.mark.parametrize("case", list(REFUSED))
def test_inconsistent_store_values_are_refused(helm: dict[str, Any], case: str) -> None:
    assert f"refused:{case}" not in helm["renders"]
    assert REFUSED[case][1] in helm["errors"][f"refused:{case}"]
