"""The Dockerfile and the Helm chart, checked as text (no docker daemon or registry here).

tests/unit/test_chart.py renders the chart with Helm; tests/unit/test_alerts.py runs
promtool on the alerts. hadolint (installed by ``make test``) lints the Dockerfile.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    configmap += (CHART / "templates" / "_helpers.tpl").read_text()  # "tokengate.config"
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


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (FROM first), in order."""
    result: list[list[tuple[str, str]]] = []
    for step in instructions(dockerfile()):
        if step[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(step)
    return result


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfile_base_image_is_pinned_by_digest() -> None:
    text = dockerfile()
    steps = instructions(text)
    args = {
        name: default
        for keyword, rest in steps
        if keyword == "ARG"
        for name, _, default in [rest.partition("=")]
    }
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11[\w.-]*@sha256:[0-9a-f]{64}", base), base
    froms = [rest for keyword, rest in steps if keyword == "FROM"]
    assert [f.split()[0] for f in froms] == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    # the digest's comment says how to bump it
    assert "docker buildx imagetools inspect python:3.11-slim" in text
    assert "docker inspect --format '{{index .RepoDigests 0}}'" in text


def _requirement_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def test_dockerfile_installs_dependencies_before_copying_the_code() -> None:
    build, _ = stages()

    def index(predicate: Any) -> int:
        return next(i for i, step in enumerate(build) if predicate(step))

    deps_copy = index(lambda s: s[0] == "COPY" and s[1] == "pyproject.toml constraints.txt ./")
    deps_install = index(
        lambda s: s[0] == "RUN" and "-c constraints.txt -r requirements.txt" in s[1]
    )
    code_copies = [
        i
        for i, (k, rest) in enumerate(build)
        if k == "COPY" and rest.split()[0] in {"tokengate", "authserver", "gateway", "README.md"}
    ]
    code_install = index(lambda s: s[0] == "RUN" and "--no-deps ." in s[1])
    assert deps_copy < deps_install < min(code_copies) <= max(code_copies) < code_install
    # nothing but pyproject.toml and constraints.txt is copied before the dependencies
    assert [s for s in build[:deps_install] if s[0] == "COPY"] == [build[deps_copy]]

    # the list the image installs is pyproject's, each one pinned in constraints.txt
    generate = build[deps_install][1].split(" > requirements.txt")[0]
    argv = shlex.split(generate)
    assert argv[:2] == ["python", "-c"]
    listed = subprocess.run(
        [sys.executable, "-c", argv[2]], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    dependencies = pyproject()["project"]["dependencies"]
    assert [line for line in listed if line] == dependencies
    pinned = {
        _requirement_name(line)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    assert {_requirement_name(d) for d in dependencies} <= pinned


def test_dockerfile_labels() -> None:
    steps = instructions(dockerfile())
    labels = dict(
        re.findall(
            r'(org\.opencontainers\.image\.[a-z]+)="([^"]*)"',
            " ".join(rest for keyword, rest in steps if keyword == "LABEL"),
        )
    )
    project = pyproject()["project"]
    assert labels["org.opencontainers.image.title"] == "tokengate"
    assert labels["org.opencontainers.image.description"] == project["description"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.source"] == "${SOURCE_URL}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    final_stage_args = dict(
        rest.partition("=")[::2] for keyword, rest in stages()[-1] if keyword == "ARG"
    )
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert final_stage_args["VERSION"] == project["version"] == chart["appVersion"]
    assert {"REVISION", "SOURCE_URL"} <= set(final_stage_args)


def test_dockerfile_keeps_only_the_data_volume() -> None:
    volumes = [rest for keyword, rest in instructions(dockerfile()) if keyword == "VOLUME"]
    assert [json.loads(v) for v in volumes] == [["/var/lib/tokengate"]]
    config = parse_config(
        (ROOT / "config/container.yaml").read_text(),
        {"TOKENGATE_PUBLIC_URL": "http://localhost:9000"},
    )
    assert config.authserver is not None
    assert str(config.authserver.data_dir).startswith("/var/lib/tokengate/")


def healthcheck() -> tuple[dict[str, str], list[str]]:
    [check] = [rest for keyword, rest in instructions(dockerfile()) if keyword == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    return dict(re.findall(r"--([a-z-]+)=(\S+)", options)), json.loads(command)


def test_dockerfile_healthcheck_asks_the_admin_listener() -> None:
    options, command = healthcheck()
    assert set(options) >= {"interval", "timeout", "start-period", "retries"}
    assert command[:2] == ["python", "-c"]  # exec form; the image has no curl
    code = command[2]
    default_url = re.search(r"'(http://[^']+)'", code)
    assert default_url is not None
    assert default_url.group(1) == "http://127.0.0.1:9100/healthz"
    config = parse_config(
        (ROOT / "config/container.yaml").read_text(),
        {"TOKENGATE_PUBLIC_URL": "http://localhost:9000"},
    )
    assert config.admin is not None and config.admin.listen.port == 9100
    client_timeout = float(re.search(r"timeout=(\d+(?:\.\d+)?)\)", code).group(1))  # type: ignore[union-attr]
    assert client_timeout < float(options["timeout"].rstrip("s"))


class _Admin(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/healthz" else 503
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def admin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_healthcheck_command_tells_healthy_from_not(admin: str) -> None:
    _, command = healthcheck()
    closed = ThreadingHTTPServer(("127.0.0.1", 0), _Admin)
    closed_url = f"http://127.0.0.1:{closed.server_address[1]}/healthz"
    closed.server_close()  # nothing listens there any more

    def run(url: str) -> int:
        env = {**os.environ, "TOKENGATE_HEALTHCHECK_URL": url}
        return subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False
        ).returncode

    assert run(f"{admin}/healthz") == 0
    assert run(f"{admin}/unhealthy") != 0  # 503
    assert run(closed_url) != 0


def test_hadolint_passes() -> None:
    venv_bin = str(Path(sys.executable).parent)
    hadolint = shutil.which("hadolint", path=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    if hadolint is None:
        pytest.fail(
            "hadolint is not installed: `make test` installs tests/requirements-tools.txt",
            pytrace=False,
        )
    result = subprocess.run(
        [hadolint, "--no-color", "--config", ".hadolint.yaml", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / ".hadolint.yaml").read_text())
    assert config["ignored"] == ["DL3064"]  # the one false positive, explained there


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        line.strip().removeprefix("**/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "**/*.pem" in (ROOT / ".dockerignore").read_text()  # keys never reach a build
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile(), re.MULTILINE):
        for item in source.split():
            top = item.split("/")[0]
            assert not any(fnmatch(top, p) or fnmatch(item, p) for p in patterns), item


# The Apache License 2.0 as published (www.apache.org/licenses/LICENSE-2.0.txt).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_is_the_apache_license_2() -> None:
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256
    assert pyproject()["project"]["license"] == {"text": "Apache-2.0"}
