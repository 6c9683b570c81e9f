"""Gateway request tallies, published at once, equal what per-request updates give."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tokengate.metrics import LATENCY_BUCKETS, Metrics


def _samples(text: bytes, prefix: str) -> list[str]:
    return sorted(
        line
        for line in text.decode().splitlines()
        if line.startswith(prefix) and "_created" not in line
    )


def test_published_histograms_match_observe_for_the_pinned_client() -> None:
    rng = random.Random(7)
    durations = [rng.choice([0.0, 0.001, 0.0025, 30, 31]) for _ in range(50)]
    durations += [rng.uniform(0, 40) for _ in range(500)]
    metrics = Metrics()
    reference = CollectorRegistry()
    expected = Histogram(
        "tokengate_gateway_request_duration_seconds",
        "reference",
        ["route"],
        buckets=LATENCY_BUCKETS,
        registry=reference,
    )
    for seconds in durations:
        metrics.request_started()
        metrics.request_finished("api", "GET", 200, "allow", "ok", seconds, None)
        expected.labels("api").observe(seconds)
    got, _ = metrics.exposition()
    name = "tokengate_gateway_request_duration_seconds"
    assert _samples(got, name) == _samples(generate_latest(reference), name)


def test_counts_inflight_and_upstream_times_are_published() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.request_started()
    metrics.request_finished("api", "GET", 200, "allow", "ok", 0.002, 0.001)
    metrics.request_finished("api", "BREW", 404, "deny", "no_route", 0.002, None)
    text, _ = metrics.exposition()
    lines = text.decode().splitlines()
    assert "tokengate_gateway_inflight_requests 1.0" in lines
    assert (
        'tokengate_gateway_requests_total{code="200",decision="allow",method="GET",'
        'reason="ok",route="api"} 1.0' in lines
    )
    assert (
        'tokengate_gateway_requests_total{code="404",decision="deny",method="OTHER",'
        'reason="no_route",route="api"} 1.0' in lines
    )
    assert 'tokengate_gateway_upstream_duration_seconds_count{route="api"} 1.0' in lines
    # published once: a second scrape does not count the same requests again
    again, _ = metrics.exposition()
    assert again.decode().count('reason="ok",route="api"} 1.0') == 1


def test_a_failing_publish_is_reported_once_and_never_ends_the_loop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full metrics directory made publish raise, which ended a worker's publishing
    for good: its later tallies reached no scrape."""
    metrics = Metrics()
    outcomes = iter([OSError(28, "No space left on device")] * 3 + [None] * 2)
    published = []

    def publish() -> None:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        published.append(True)
        if len(published) == 2:
            raise asyncio.CancelledError  # stop the loop here

    monkeypatch.setattr(metrics, "publish", publish)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(metrics.publish_every(interval=0))
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["event"] for e in events] == ["metrics.publish_failed", "metrics.published"]
    assert events[0]["error"] == "OSError"
    assert "No space" not in json.dumps(events)  # frames, never the message
    assert published == [True, True]
