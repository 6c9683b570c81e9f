"""The chart's Prometheus alerts: valid rules, and unit-tested with ``promtool test rules``.

promtool comes from Debian's prometheus package; ``make test`` installs it when it is
missing. Without it these tests fail rather than skip: an alert nobody evaluated is
an alert that may never fire.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.errors import Reason

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "charts" / "tokengate" / "files" / "alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"
REQUESTS = "tokengate_gateway_requests_total"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool is not on PATH: `make test` installs it (Debian package prometheus)",
            pytrace=False,
        )
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_tests() -> dict[str, Any]:
    return yaml.safe_load(ALERT_TESTS.read_text())


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_load_the_charts_alerts() -> None:
    files = [(ALERT_TESTS.parent / f).resolve() for f in alert_tests()["rule_files"]]
    assert files == [ALERTS]


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in alert_tests()["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules()}
    assert alerts - firing == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"
    assert firing | quiet <= alerts, "tests of alerts that do not exist"


def test_every_alert_says_how_bad_and_what() -> None:
    for rule in rules():
        assert rule["alert"].startswith("Tokengate"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]


def _matchers(expr: str, label: str) -> set[str]:
    """Every value a label is matched against in ``expr`` (``=`` and ``=~`` alternatives)."""
    values: set[str] = set()
    for op, value in re.findall(rf'\b{label}\s*(=~|=)\s*"([^"]*)"', expr):
        values.update(value.split("|") if op == "=~" else [value])
    return values


def test_alerts_match_only_reasons_and_decisions_tokengate_uses() -> None:
    reasons = {reason.value for reason in Reason}
    decisions = {reason.decision for reason in Reason}
    assert decisions == {"allow", "deny", "error"}
    for rule in rules():
        assert _matchers(rule["expr"], "reason") <= reasons, rule["alert"]
        assert _matchers(rule["expr"], "decision") <= decisions, rule["alert"]
    upstream = next(rule for rule in rules() if rule["alert"] == "TokengateUpstreamFailures")
    assert _matchers(upstream["expr"], "reason") == {"upstream_unavailable", "upstream_timeout"}
    assert "code" not in upstream["expr"]  # the gateway's own 503 and 500 are no upstream failure


def _labels(series: str) -> tuple[str, dict[str, str]]:
    name, _, rest = series.partition("{")
    return name.strip(), dict(re.findall(r'(\w+)\s*=\s*"([^"]*)"', rest))


def test_the_unit_tests_feed_series_tokengate_can_export() -> None:
    """Each request series in the promtool tests carries a code and decision that
    tokengate really gives its reason, so the tests model what a scrape shows."""
    seen = 0
    for case in alert_tests()["tests"]:
        for item in case["input_series"]:
            name, labels = _labels(item["series"])
            assert name.startswith("tokengate_"), name
            if name != REQUESTS:
                continue
            seen += 1
            assert set(labels) >= {"route", "method", "code", "decision", "reason"}, labels
            reason = Reason(labels["reason"])
            assert labels["decision"] == reason.decision, labels
            if reason is not Reason.OK:  # an allowed request answers whatever the upstream did
                assert labels["code"] == str(reason.status), labels
    assert seen > 10
