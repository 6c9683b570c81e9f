"""The Dockerfile and the Helm chart, checked without docker or helm (neither runs here)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tokengate.config import parse_config
from tokengate.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tokengate"


def exported_metric_names() -> set[str]:
    metrics = Metrics()
    assert metrics.registry is not None
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        for suffix in ("_total", "_bucket", "_count", "_sum", "_created"):
            names.add(family.name + suffix)
    return names


def metric_references(text: str) -> set[str]:
    return set(re.findall(r"\btokengate_[a-z_]+", text))


def test_every_non_template_yaml_parses() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"]) == ("v2", "tokengate")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["gateway"]["autoscaling"]["enabled"] is True
    rules = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} >= {
        "TokengateJwksStale",
        "TokengateUpstreamFailures",
        "TokengateInternalErrors",
        "TokengateDenialSpike",
        "TokengateConfigReloadFailed",
    }
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Requests by route and decision", "Denials by reason", "Tokens issued"} <= titles


def _has(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_templates_reference_only_values_that_exist() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    templates = list((CHART / "templates").glob("*"))
    assert len(templates) >= 8
    missing = []
    for template in templates:
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()):
            if not _has(values, ref):
                missing.append(f"{template.name}: .Values.{ref}")
    assert missing == []
    for included in re.findall(
        r'\.Files\.Get "([^"]+)"', "".join(t.read_text() for t in templates)
    ):
        assert (CHART / included).is_file(), included


def test_no_value_hard_codes_a_release_name() -> None:
    """Object names come from the release: the gateway's default issuer names no
    jwks_uri, and the ConfigMap fills in the release's own authserver Service."""
    values_text = (CHART / "values.yaml").read_text()
    assert "tokengate-authserver" not in values_text
    values = yaml.safe_load(values_text)
    assert all("jwks_uri" not in i for i in values["config"]["gateway"]["issuers"])
    configmap = (CHART / "templates" / "configmap.yaml").read_text()
    assert 'include "tokengate.name"' in configmap
    assert ".Values.authserver.service.port" in configmap
    assert '"jwks_uri"' in configmap
    services = (CHART / "templates" / "services.yaml").read_text()
    assert 'name: {{ include "tokengate.name" . }}-authserver' in services


@pytest.mark.parametrize("kind", ["serviceMonitor", "prometheusRule"])
def test_monitoring_objects_take_extra_labels(kind: str) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["metrics"][kind]["labels"] == {}
    template = (CHART / "templates" / f"{kind.lower()}.yaml").read_text()
    assert f"with .Values.metrics.{kind}.labels" in template


def test_the_charts_config_is_a_valid_tokengate_config() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    config = parse_config(yaml.safe_dump(values["config"]), {})
    ports = values["ports"]
    assert config.gateway is not None and config.gateway.listen.port == ports["gateway"]
    assert config.authserver is not None and config.authserver.listen.port == ports["authserver"]
    assert config.admin is not None and config.admin.listen.port == ports["admin"]
    assert values["probes"]["readiness"]["path"] == "/readyz"


@pytest.mark.parametrize("path", ["files/alerts.yaml", "files/dashboard.json"])
def test_alerts_and_dashboard_use_metrics_tokengate_exports(path: str) -> None:
    used = metric_references((CHART / path).read_text())
    assert used
    assert used <= exported_metric_names(), used - exported_metric_names()


def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") == 2  # build stage, then the runtime image
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for item in source.split():
            assert (ROOT / item).exists(), item
    assert re.search(r"^USER 10001", text, re.MULTILINE)
    assert 'ENTRYPOINT ["tokengate"]' in text and 'CMD ["run"]' in text
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.MULTILINE).group(1).split()}  # type: ignore[union-attr]
    config = parse_config(
        (ROOT / "config/container.yaml").read_text(),
        {"TOKENGATE_PUBLIC_URL": "http://localhost:9000"},
    )
    assert config.gateway and config.authserver and config.admin
    listens = {config.gateway.listen, config.authserver.listen, config.admin.listen}
    assert {listen.port for listen in listens} == exposed
    assert {listen.host for listen in listens} == {"0.0.0.0"}
