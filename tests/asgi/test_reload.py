"""Hot reload: the watcher, and the gateway and authorization server swapping configs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.asgi.gateway_fixtures import Gateway, gateway_section, make_gateway, upstream
from tests.conftest import ADMIN_SECRET, ISSUER, base_config, config_from
from tokengate.config import Config
from tokengate.metrics import Metrics
from tokengate.reload import ConfigWatcher

pytestmark = pytest.mark.anyio
__all__ = ["make_gateway", "upstream"]  # fixtures


def write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data))


async def test_watcher_applies_a_changed_file_and_refuses_an_invalid_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokengate.yaml"
    data = base_config(tmp_path / "data")
    write(path, data)
    applied: list[Config] = []

    async def apply(config: Config) -> list[str]:
        applied.append(config)
        return []

    metrics = Metrics()
    watcher = ConfigWatcher(path, apply, metrics, interval=0.01)
    task = asyncio.create_task(watcher.run())
    try:
        data["authserver"]["servers"][0]["access_token_ttl"] = "5m"
        write(path, data)
        for _ in range(200):
            if applied:
                break
            await asyncio.sleep(0.01)
        assert applied[0].authserver.servers[0].access_token_ttl == 300  # type: ignore[union-attr]

        data["authserver"]["servers"][0]["access_token_ttl"] = "soon"
        data["authserver"]["servers"][0]["audienc"] = "x"
        write(path, data)
        for _ in range(200):
            if "config.reload_failed" in capsys.readouterr().err:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert len(applied) == 1
    assert metrics.config_reloads.labels("ok")._value.get() == 1
    assert metrics.config_reloads.labels("error")._value.get() == 1


async def test_refused_reload_logs_every_path_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokengate.yaml"
    data = base_config(tmp_path / "data")
    data["authserver"]["servers"][0]["access_token_ttl"] = "soon"
    data["authserver"]["clients"][0]["scopes"] = ["nope"]
    write(path, data)

    async def apply(config: Config) -> list[str]:
        raise AssertionError("an invalid config is never applied")

    assert await ConfigWatcher(path, apply, Metrics()).reload() is False
    err = capsys.readouterr().err
    assert '"event":"config.reload_failed"' in err
    assert "authserver.servers[0].access_token_ttl: must be a duration" in err
    assert "authserver.clients[0].scopes[0]: scope 'nope' is not offered" in err


async def test_a_configmap_style_symlink_swap_is_noticed(tmp_path: Path) -> None:
    first, second = tmp_path / "v1", tmp_path / "v2"
    first.mkdir()
    second.mkdir()
    data = base_config(tmp_path / "data")
    write(first / "tokengate.yaml", data)
    data["authserver"]["servers"][0]["access_token_ttl"] = "2m"
    write(second / "tokengate.yaml", data)
    os.symlink(first, tmp_path / "..data")
    os.symlink(tmp_path / "..data" / "tokengate.yaml", tmp_path / "tokengate.yaml")
    applied: list[Config] = []

    async def apply(config: Config) -> list[str]:
        applied.append(config)
        return []

    watcher = ConfigWatcher(tmp_path / "tokengate.yaml", apply, Metrics(), interval=0.01)
    task = asyncio.create_task(watcher.run())
    try:
        os.symlink(second, tmp_path / "..data_tmp")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # the kubelet's atomic swap
        for _ in range(200):
            if applied:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert applied[0].authserver.servers[0].access_token_ttl == 120  # type: ignore[union-attr]


async def test_gateway_swaps_routes_while_in_flight_requests_finish_on_the_old_ones(
    make_gateway: Any, upstream: Any
) -> None:
    gw: Gateway = await make_gateway()
    token = await gw.token("admin")
    keys_before = gw.app.jwks[ISSUER]
    async with gw.client() as client:
        slow = asyncio.create_task(
            client.put("/orders/1?delay=0.5", headers={"authorization": f"Bearer {token}"})
        )
        await asyncio.sleep(0.1)  # the request is with the upstream now
        section = gateway_section(upstream[1])
        section["routes"] = [r for r in section["routes"] if r["name"] != "orders-write"]
        section["routes"].append(
            {
                "name": "reports",
                "match": {"path": "/reports/**"},
                "upstream": upstream[1],
                "public": True,
            }
        )
        config = config_from({"gateway": section})
        assert config.gateway is not None
        await gw.app.reconfigure(config.gateway)
        assert (await slow).status_code == 200  # finished on the configuration it started with
        after = await client.put("/orders/1", headers={"authorization": f"Bearer {token}"})
        new_route = await client.get("/reports/x")
    assert after.status_code == 404
    assert new_route.status_code == 200
    assert gw.app.jwks[ISSUER] is keys_before  # unchanged issuer: same keys, no refetch


async def test_authserver_takes_new_clients_and_servers(make_authserver: Any) -> None:
    server = make_authserver()
    data = base_config(server.services.config.data_dir)
    data["authserver"]["servers"].append(
        {"name": "reports", "audience": "api://reports", "scopes": ["reports:read"]}
    )
    data["authserver"]["clients"].append(
        {"client_id": "newcomer", "secret": "newcomer-secret-0123456789abcdefghijklm"}
    )
    data["authserver"]["clients"] = [
        c for c in data["authserver"]["clients"] if c["client_id"] != "admin"
    ]
    new = config_from(data)
    assert new.authserver is not None
    from authserver.app import AuthServerApp

    app = AuthServerApp(server.services)
    app.reconfigure(new.authserver)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://auth.test") as http:
        newcomer = await http.post(
            "/oauth2/reports/v1/token",
            data={"grant_type": "client_credentials"},
            auth=("newcomer", "newcomer-secret-0123456789abcdefghijklm"),
        )
        removed = await http.post(
            f"{ISSUER}/v1/token",
            data={"grant_type": "client_credentials"},
            auth=("admin", ADMIN_SECRET),
        )
    assert newcomer.status_code == 200, newcomer.text
    assert newcomer.json()["scope"] == "reports:read"
    assert removed.status_code == 401
