"""Prometheus metrics: one set per process, summed over worker processes.

With ``--workers N`` the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory before the workers start; prometheus-client then keeps every value in
files there, and ``/metrics`` on any worker adds them up (gauges as noted below).
With one process, a private registry is used. Labels are bounded: route names,
reasons, issuers, server names, a fixed set of methods; never paths, subjects or
tokens.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """Every tokengate metric, created once per process."""

    def __init__(self) -> None:
        # In multiprocess mode values live in files and nothing is registered; the
        # /metrics handler collects them. Otherwise one private registry per process.
        self.registry = None if multiprocess() else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokengate_gateway_requests",
            "Gateway requests by route, method, status code, decision and reason.",
            ["route", "method", "code", "decision", "reason"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tokengate_gateway_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "tokengate_gateway_upstream_duration_seconds",
            "Time spent on the upstream exchange, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "tokengate_gateway_inflight_requests",
            "Gateway requests in progress.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.jwks_fetches = Counter(
            "tokengate_jwks_fetches",
            "JWKS fetches by issuer and result (success or error).",
            ["issuer", "result"],
            registry=r,
        )
        self.jwks_keys = Gauge(
            "tokengate_jwks_keys",
            "Usable keys in the cached JWKS, by issuer.",
            ["issuer"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.jwks_last_success = Gauge(
            "tokengate_jwks_last_success_timestamp_seconds",
            "When the issuer's JWKS was last fetched successfully (Unix time).",
            ["issuer"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.tokens_issued = Counter(
            "tokengate_authserver_tokens_issued",
            "Access tokens issued, by authorization server and grant type.",
            ["server", "grant_type"],
            registry=r,
        )
        self.token_errors = Counter(
            "tokengate_authserver_token_errors",
            "Token requests refused, by authorization server and OAuth error code.",
            ["server", "error"],
            registry=r,
        )
        self.config_reloads = Counter(
            "tokengate_config_reloads",
            "Configuration reloads by result (ok or error).",
            ["result"],
            registry=r,
        )
        # labels() looks children up on every call; the request path keeps its own map
        self._request_children: dict[tuple[str, str, int, str, str], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self._upstream_children: dict[str, Any] = {}

    def request(
        self, route: str, method: str, code: int, decision: str, reason: str, seconds: float
    ) -> None:
        key = (route, method, code, decision, reason)
        child = self._request_children.get(key)
        if child is None:
            label = method if method in METHODS else "OTHER"
            child = self.requests.labels(route, label, str(code), decision, reason)
            self._request_children[key] = child
        child.inc()
        duration = self._duration_children.get(route)
        if duration is None:
            duration = self._duration_children[route] = self.request_duration.labels(route)
        duration.observe(seconds)

    def upstream(self, route: str, seconds: float) -> None:
        child = self._upstream_children.get(route)
        if child is None:
            child = self._upstream_children[route] = self.upstream_duration.labels(route)
        child.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric, summed over processes when there are several."""
        if self.registry is not None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
