"""Prometheus metrics: one set per process, summed over worker processes.

With ``--workers N`` the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
directory before the workers start; prometheus-client then keeps every value in
files there, and ``/metrics`` on any worker adds them up (gauges as noted below).
With one process, a private registry is used. Labels are bounded: route names,
reasons, issuers, server names, a fixed set of methods; never paths, subjects or
tokens.

Gateway requests are the hot path: each is tallied in plain per-process counters
(one dict update, no lock, no file write) and :meth:`Metrics.publish` moves the
tallies into the Prometheus values. Every scrape publishes its own process first;
with several workers each one also publishes every ``PUBLISH_INTERVAL`` seconds,
so a scrape may lag the other workers by that much.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import platform
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from tokengate.asgi import HTTP_METHODS
from tokengate.jsonlog import log_event, traceback_frames
from tokengate.version import VERSION

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METHODS = frozenset(HTTP_METHODS)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PUBLISH_INTERVAL = 1.0  # seconds


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
        self.policy_decisions = Counter(
            "tokengate_authserver_policy_decisions",
            "Requests decided by an authorization server's access policies, by policy, rule"
            " (empty: none matched) and decision (allow, deny).",
            ["server", "policy", "rule", "decision"],
            registry=r,
        )
        self.factor_results = Counter(
            "tokengate_authserver_factor_results",
            "Second-factor attempts on the sign-in pages, by factor (totp, recovery_code)"
            " and result (success, failure, replayed, locked).",
            ["factor", "result"],
            registry=r,
        )
        for factor in ("totp", "recovery_code"):
            for result in ("success", "failure", "replayed", "locked"):
                self.factor_results.labels(factor, result)
        self.client_auth_failures = Counter(
            "tokengate_authserver_client_auth_failures",
            "Failed or throttled client authentications, by authorization server and result.",
            ["server", "result"],
            registry=r,
        )
        self.signins = Counter(
            "tokengate_authserver_signins",
            "Sign-ins on the hosted page, by result (success, failure).",
            ["result"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.signins.labels(result)
        self.sessions_active = Gauge(
            "tokengate_authserver_sessions_active",
            "Live browser sessions in the store (org-wide; read every few seconds).",
            registry=r,
            multiprocess_mode="livemax",  # every worker reads the same store
        )
        self.listener_refusals = Counter(
            "tokengate_listener_refusals",
            "Connections and requests a listener refused before any app saw them, by reason.",
            ["listener", "reason"],
            registry=r,
        )
        self.audit_lines_lost = Counter(
            "tokengate_audit_lines_lost",
            "Audit lines that could not be written (full disk, closed pipe, full queue).",
            registry=r,
        )
        self.introspections = Counter(
            "tokengate_authserver_introspections",
            "Introspection requests by authorization server and outcome"
            " (active, inactive or error).",
            ["server", "outcome"],
            registry=r,
        )
        self.revocations = Counter(
            "tokengate_authserver_revocations",
            "Revocation requests by authorization server and outcome (revoked, ignored or error).",
            ["server", "outcome"],
            registry=r,
        )
        self.ratelimit_fallbacks = Counter(
            "tokengate_ratelimit_redis_fallbacks",
            "Rate-limit decisions made in the process although redis: is set (Redis down,"
            " or slower than 50 ms).",
            registry=r,
        )
        self.revocation_feed = Counter(
            "tokengate_authserver_revocation_feed_requests",
            "Revocation feed requests by authorization server and outcome (ok or error).",
            ["server", "outcome"],
            registry=r,
        )
        self.feed_errors = Counter(
            "tokengate_gateway_revocation_feed_errors",
            "Failed polls of an issuer's revocation feed, by issuer.",
            ["issuer"],
            registry=r,
        )
        self.feed_last_success = Gauge(
            "tokengate_gateway_revocation_feed_last_success_timestamp_seconds",
            "When the issuer's revocation feed last answered (Unix time).",
            ["issuer"],
            registry=r,
            multiprocess_mode="livemin",  # the worker furthest behind
        )
        self.revoked_tokens = Gauge(
            "tokengate_gateway_revoked_tokens",
            "Revoked, unexpired token jtis the gateway refuses, by issuer.",
            ["issuer"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.config_reloads = Counter(
            "tokengate_config_reloads",
            "Configuration reloads by result (ok or error).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error"):  # at 0 from the start: the first error is an increase
            self.config_reloads.labels(result)
        self.build_info = Gauge(
            "tokengate_build_info",
            "Always 1; the labels say which tokengate and Python serve.",
            ["version", "python"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(VERSION, platform.python_version()).set(1)
        if r is not None:  # with workers, the scrape adds the answering process's own
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        # gateway request tallies since the last publish()
        self._inflight = 0
        self._requests: dict[tuple[str, str, int, str, str], int] = {}
        self._durations: dict[str, list[float]] = {}  # route -> bucket counts + [sum]
        self._upstream: dict[str, list[float]] = {}

    def request_started(self) -> None:
        self._inflight += 1

    def request_finished(
        self,
        route: str,
        method: str,
        code: int,
        decision: str,
        reason: str,
        seconds: float,
        upstream_seconds: float | None,
    ) -> None:
        """One gateway request: its outcome, duration and upstream time, if any."""
        self._inflight -= 1
        key = (route, method, code, decision, reason)
        self._requests[key] = self._requests.get(key, 0) + 1
        _tally(self._durations, route, seconds)
        if upstream_seconds is not None:
            _tally(self._upstream, route, upstream_seconds)

    def publish(self) -> None:
        """Move this process's request tallies into the Prometheus values."""
        requests, self._requests = self._requests, {}
        for (route, method, code, decision, reason), count in requests.items():
            label = method if method in METHODS else "OTHER"
            self.requests.labels(route, label, str(code), decision, reason).inc(count)
        durations, self._durations = self._durations, {}
        upstream, self._upstream = self._upstream, {}
        for histogram, tallies in (
            (self.request_duration, durations),
            (self.upstream_duration, upstream),
        ):
            for route, tally in tallies.items():
                _add_observations(histogram.labels(route), tally)
        self.inflight.set(self._inflight)

    async def publish_every(self, interval: float = PUBLISH_INTERVAL) -> None:
        """Publish until cancelled (workers do, so any of them can answer a scrape).

        A failing publish (the metrics directory's filesystem full) never ends the
        loop: ``metrics.publish_failed`` when failures start, ``metrics.published``
        when they end."""
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                self.publish()
            except Exception as exc:
                if not failing:
                    log_event(
                        "metrics.publish_failed",
                        error=type(exc).__name__,
                        traceback=traceback_frames(exc),
                        action="retrying every second; these tallies are lost",
                    )
                failing = True
            else:
                if failing:
                    log_event("metrics.published", action="publishing again")
                failing = False

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric, summed over processes when there are several."""
        self.publish()
        if self.registry is not None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        ProcessCollector(registry=registry)  # the process that answers this scrape
        PlatformCollector(registry=registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def _tally(tallies: dict[str, list[float]], route: str, seconds: float) -> None:
    tally = tallies.get(route)
    if tally is None:
        tally = tallies[route] = [0] * (len(LATENCY_BUCKETS) + 2)
    tally[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # first bucket with seconds <= le
    tally[-1] += seconds


def _add_observations(child: Any, tally: list[float]) -> None:
    """Add tallied observations to a histogram child at once.

    prometheus-client observes one value at a time; this writes the same result into
    the child's bucket and sum values (``_buckets``: one per bound plus +Inf, each
    counting its own observations; ``_sum``). tests/unit/test_metrics_tally.py checks
    it against ``observe()`` for the pinned version.
    """
    child._sum.inc(tally[-1])
    for bucket, count in zip(child._buckets, tally[:-1], strict=True):
        if count:
            bucket.inc(count)
