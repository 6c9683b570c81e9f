"""The admin listener: health, readiness, and metrics checked with Prometheus' own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import GatewayApp
from tests.asgi.gateway_fixtures import (
    Gateway,
    RecordingUpstream,
    gateway_section,
    make_gateway,
    upstream,
)
from tests.conftest import ISSUER, config_from
from tokengate.admin import AdminApp
from tokengate.jsonlog import AuditLog, LineSink

pytestmark = pytest.mark.anyio
__all__ = ["make_gateway", "upstream"]  # fixtures


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(parsed: dict[Any, float], name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


async def scrape(app: AdminApp) -> tuple[httpx.Response, dict[Any, float]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
        response = await client.get("/metrics")
    return response, samples(response.text)


async def test_metrics_count_known_traffic_exactly(make_gateway: Any) -> None:
    gw: Gateway = await make_gateway()
    admin = AdminApp(gw.app.metrics, [gw.app.not_ready])
    token = await gw.token()
    async with gw.client() as client:
        for _ in range(3):
            assert (
                await client.get("/orders/1", headers={"authorization": f"Bearer {token}"})
            ).status_code == 200
        for _ in range(2):
            assert (await client.get("/orders/1")).status_code == 401
        assert (
            await client.post("/orders/1", headers={"authorization": f"Bearer {token}"})
        ).status_code == 403
        assert (await client.get("/nowhere")).status_code == 404
        assert (await client.request("FETCH", "/nowhere")).status_code == 404
        assert (await client.get("/dead/x")).status_code == 502
    response, parsed = await scrape(admin)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    requests = {
        tuple(dict(labels)[k] for k in ("route", "method", "code", "decision", "reason")): v
        for (name, labels), v in parsed.items()
        if name == "tokengate_gateway_requests_total"
    }
    assert requests == {
        ("orders-read", "GET", "200", "allow", "ok"): 3,
        ("orders-read", "GET", "401", "deny", "token_missing"): 2,
        ("orders-write", "POST", "403", "deny", "insufficient_scope"): 1,
        ("(none)", "GET", "404", "deny", "no_route"): 1,
        ("(none)", "OTHER", "404", "deny", "no_route"): 1,  # FETCH: methods are bounded
        ("dead", "GET", "502", "allow", "upstream_unavailable"): 1,
    }
    assert (
        value(parsed, "tokengate_gateway_request_duration_seconds_count", route="orders-read") == 5
    )
    assert (
        value(parsed, "tokengate_gateway_upstream_duration_seconds_count", route="orders-read") == 3
    )
    assert value(parsed, "tokengate_gateway_inflight_requests") == 0
    assert value(parsed, "tokengate_jwks_fetches_total", issuer=ISSUER, result="success") == 1
    assert value(parsed, "tokengate_jwks_keys", issuer=ISSUER) == 1
    assert value(parsed, "tokengate_jwks_last_success_timestamp_seconds", issuer=ISSUER) > 1.7e9
    for _name, labels in parsed:  # bounded labels: never a path or a subject
        assert not {v for _, v in labels} & {"/orders/1", "/nowhere", "reporting"}


async def test_authserver_metrics(make_authserver: Any) -> None:
    from tests.conftest import REPORTING_SECRET

    server = make_authserver()
    metrics = server.services.endpoints.metrics
    async with server.client() as http:
        for _ in range(2):
            await http.post(
                f"{ISSUER}/v1/token",
                data={"grant_type": "client_credentials"},
                auth=("reporting", REPORTING_SECRET),
            )
        await http.post(
            f"{ISSUER}/v1/token",
            data={"grant_type": "client_credentials"},
            auth=("reporting", "wrong"),
        )
        await http.post(
            f"{ISSUER}/v1/token",
            data={"grant_type": "urn:ietf:params:oauth:grant-type:device_code"},
            auth=("reporting", REPORTING_SECRET),
        )
    _, parsed = await scrape(AdminApp(metrics, [server.services.not_ready]))
    assert (
        value(
            parsed,
            "tokengate_authserver_tokens_issued_total",
            server="default",
            grant_type="client_credentials",
        )
        == 2
    )
    assert (
        value(
            parsed,
            "tokengate_authserver_token_errors_total",
            server="default",
            error="invalid_client",
        )
        == 1
    )
    assert (
        value(
            parsed,
            "tokengate_authserver_token_errors_total",
            server="default",
            error="unsupported_grant_type",
        )
        == 1
    )


async def test_introspection_and_revocation_outcomes_are_counted(make_authserver: Any) -> None:
    from tests.conftest import ADMIN_SECRET, REPORTING_SECRET

    server = make_authserver()
    reporting = ("reporting", REPORTING_SECRET)
    async with server.client() as http:
        token = (
            await http.post(
                f"{ISSUER}/v1/token", data={"grant_type": "client_credentials"}, auth=reporting
            )
        ).json()["access_token"]
        await http.post(f"{ISSUER}/v1/introspect", data={"token": token}, auth=reporting)
        # another client's token (admin may introspect only its own): inactive
        await http.post(
            f"{ISSUER}/v1/introspect", data={"token": token}, auth=("admin", ADMIN_SECRET)
        )
        await http.post(f"{ISSUER}/v1/introspect", data={"token": "x.y.z"}, auth=reporting)
        await http.post(f"{ISSUER}/v1/introspect", data={}, auth=reporting)  # no token: 400
        await http.post(f"{ISSUER}/v1/revoke", data={"token": token}, auth=reporting)
        await http.post(f"{ISSUER}/v1/revoke", data={"token": "x.y.z"}, auth=reporting)
        await http.post(f"{ISSUER}/v1/revoke", data={"token": token}, auth=("reporting", "no"))
    _, parsed = await scrape(AdminApp(server.services.endpoints.metrics, []))
    counted = {
        (name, outcome): value(
            parsed, f"tokengate_authserver_{name}_total", server="default", outcome=outcome
        )
        for name, outcomes in (
            ("introspections", ("active", "inactive", "error")),
            ("revocations", ("revoked", "ignored", "error")),
        )
        for outcome in outcomes
    }
    assert counted == {
        ("introspections", "active"): 1,
        ("introspections", "inactive"): 2,
        ("introspections", "error"): 1,
        ("revocations", "revoked"): 1,
        ("revocations", "ignored"): 1,
        ("revocations", "error"): 1,
    }


async def test_series_alerts_depend_on_exist_at_zero_from_the_start(
    make_authserver: Any, make_gateway: Any
) -> None:
    """A counter that first appears at 1 has no increase() for Prometheus: the first
    refused reload, token error or JWKS failure would never fire an alert."""
    server = make_authserver()
    response, parsed = await scrape(AdminApp(server.services.endpoints.metrics, []))
    text = response.text
    for result in ("ok", "error"):
        assert ("tokengate_config_reloads_total", frozenset({("result", result)})) in parsed
    for error in ("invalid_client", "invalid_scope", "server_error", "temporarily_unavailable"):
        key = frozenset({("server", "default"), ("error", error)})
        assert parsed[("tokengate_authserver_token_errors_total", key)] == 0
    key = frozenset({("server", "default"), ("grant_type", "client_credentials")})
    assert parsed[("tokengate_authserver_tokens_issued_total", key)] == 0
    key = frozenset({("server", "default"), ("outcome", "error")})
    assert parsed[("tokengate_authserver_revocations_total", key)] == 0
    gw: Gateway = await make_gateway()
    _, parsed = await scrape(AdminApp(gw.app.metrics, []))
    for result in ("success", "error"):
        key = frozenset({("issuer", ISSUER), ("result", result)})
        assert ("tokengate_jwks_fetches_total", key) in parsed
    assert "tokengate_jwks_last_success_timestamp_seconds{" not in text  # never a fake 0


async def test_build_info_and_process_metrics(make_authserver: Any) -> None:
    import platform
    from importlib import metadata

    server = make_authserver()
    _, parsed = await scrape(AdminApp(server.services.endpoints.metrics, []))
    labels = frozenset(
        {("version", metadata.version("tokengate")), ("python", platform.python_version())}
    )
    assert parsed[("tokengate_build_info", labels)] == 1
    assert parsed[("process_resident_memory_bytes", frozenset())] > 1_000_000
    assert parsed[("process_open_fds", frozenset())] > 0
    assert ("python_info", labels_of(parsed, "python_info")) in parsed


def labels_of(parsed: dict[Any, float], name: str) -> frozenset[tuple[str, str]]:
    (labels,) = [labels for sample, labels in parsed if sample == name]
    return labels


async def test_health_and_readiness(make_gateway: Any, tmp_path: Path) -> None:
    gw: Gateway = await make_gateway()
    admin = AdminApp(gw.app.metrics, [gw.app.not_ready, gw.authserver.services.not_ready])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=admin), base_url="http://a"
    ) as client:
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        post = await client.post("/readyz")
        missing = await client.get("/nope")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (
        200,
        {"ready": True, "not_ready": [], "degraded": []},
    )
    assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
    assert missing.status_code == 404


def gateway_without_issuers(upstream_url: str, tmp_path: Path) -> GatewayApp:
    """A gateway whose issuers refuse every connection: it never gets keys."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    config = config_from({"gateway": gateway_section(upstream_url)})
    assert config.gateway is not None
    return GatewayApp(
        config.gateway,
        audit=AuditLog(LineSink(str(tmp_path / "audit.log"))),
        http=httpx.AsyncClient(transport=httpx.MockTransport(refuse)),
    )


async def test_not_ready_names_what_is_missing(
    upstream: tuple[RecordingUpstream, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.app.STARTUP_WAIT", 0.2)

    app = gateway_without_issuers(upstream[1], tmp_path)
    admin = AdminApp(app.metrics, [app.not_ready])
    transport = httpx.ASGITransport(app=admin)
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
        starting = (await client.get("/readyz")).json()
        await app.startup()
        response = await client.get("/readyz")
    await app.shutdown()
    app.audit.sink.close()
    assert starting == {"ready": False, "not_ready": ["gateway: starting"], "degraded": []}
    assert response.status_code == 503
    assert response.json() == {
        "ready": False,
        "not_ready": [
            f"gateway: no keys for issuer {ISSUER}",
            "gateway: no keys for issuer http://auth.test/oauth2/partners",
        ],
        "degraded": [],
    }
    _, parsed = await scrape(admin)
    assert value(parsed, "tokengate_jwks_fetches_total", issuer=ISSUER, result="error") >= 1


async def test_a_drain_while_the_gateway_waits_for_keys_ends_its_start_at_once(
    upstream: Any, tmp_path: Path
) -> None:
    """A worker told to stop while its issuers do not answer (its own authorization
    server closing, say) must not sit out the 10 s start-up wait: it stops waiting,
    never reports ready, and shuts down."""
    import asyncio
    import time

    app = gateway_without_issuers(upstream[1], tmp_path)
    starting = asyncio.create_task(app.startup())
    await asyncio.sleep(0.3)
    assert not starting.done()  # waiting for keys (up to STARTUP_WAIT, 10 s)
    began = time.monotonic()
    app.drain()
    await asyncio.wait_for(starting, timeout=2)
    assert time.monotonic() - began < 0.5
    assert app.not_ready() == ["gateway: starting"]
    await app.shutdown()
    app.audit.sink.close()
