"""The Helm chart, rendered by Helm itself (helm-python-sdk: Helm's Go SDK, no cluster).

``make test`` installs helm-python-sdk (tests/requirements-tools.txt). Without it these
tests fail rather than skip. Helm runs in a child process, so its Go runtime never
shares the test process.
"""

from __future__ import annotations

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
out = {"lint": helm.lint(chart, strict=True), "renders": {}}
with helm.Chart.load(chart) as loaded:
    for key, case in cases.items():
        out["renders"][key] = loaded.render(
            case["values"], name=case["name"], namespace=case["namespace"]
        )
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
CASES: dict[str, dict[str, Any]] = {
    "default": {"name": "tokengate", "values": {}},
    "renamed": {"name": "payments-edge", "values": {}},
    "monitoring": {"name": "payments-edge", "values": MONITORING},
    "other-issuers": {"name": "payments-edge", "values": OTHER_ISSUERS},
    "no-authserver": {"name": "payments-edge", "values": {"authserver": {"enabled": False}}},
}


@pytest.fixture(scope="module")
def helm() -> dict[str, Any]:
    if importlib.util.find_spec("helm_python") is None:
        pytest.fail(
            "helm-python-sdk is not installed: `make test` installs tests/requirements-tools.txt",
            pytrace=False,
        )
    cases = {key: {**case, "namespace": NAMESPACE} for key, case in CASES.items()}
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


def test_helm_lints_the_chart_clean(helm: dict[str, Any]) -> None:
    lint = helm["lint"]
    assert lint["errors"] == []
    assert [m for m in lint["messages"] if m["severity"] >= 2] == []


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
