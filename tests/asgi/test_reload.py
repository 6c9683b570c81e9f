"""Hot reload: the watcher, and the gateway and authorization server swapping configs."""

from __future__ import annotations

import asyncio
import gc
import json
import os
from collections.abc import Iterator
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


def recording_watcher(path: Path) -> tuple[ConfigWatcher, list[Config], Metrics]:
    """A watcher polling every 10 ms that records the configs it applies."""
    applied: list[Config] = []

    async def apply(config: Config) -> list[str]:
        applied.append(config)
        return []

    metrics = Metrics()
    return ConfigWatcher(path, apply, metrics, interval=0.01), applied, metrics


async def test_watcher_applies_a_changed_file_and_refuses_an_invalid_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokengate.yaml"
    data = base_config(tmp_path / "data")
    write(path, data)
    watcher, applied, metrics = recording_watcher(path)
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
    await app.reconfigure(new.authserver)
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


# --------------------------------------------------------------------------- faults


def with_route(data: dict[str, Any], **route: Any) -> dict[str, Any]:
    data["gateway"] = {
        "listen": "127.0.0.1:0",
        "routes": [
            {"name": "r", "match": {"path": "/r"}, "upstream": "http://u", "public": True, **route}
        ],
    }
    return data


async def wait_for(condition: Any, seconds: float = 3.0) -> bool:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda d: with_route(d, timeout="abc"),
            "gateway.routes[0].timeout: must be a duration like 30s, 10m, 1h, 7d, got 'abc'",
        ),
        (
            lambda d: d["authserver"].update(data_dir=""),
            "authserver.data_dir: must not be empty",
        ),
    ],
)
async def test_a_value_that_crashed_the_parser_is_refused_and_watching_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any, problem: str
) -> None:
    """Such a value used to raise a TypeError out of reload(): the watcher task died
    silently and no later change was ever applied."""
    path = tmp_path / "tokengate.yaml"
    data = base_config(tmp_path / "data")
    write(path, data)
    watcher, applied, metrics = recording_watcher(path)
    task = asyncio.create_task(watcher.run())
    err = ""
    try:
        bad = base_config(tmp_path / "data")
        change(bad)
        write(path, bad)

        def refused() -> bool:
            nonlocal err
            err += capsys.readouterr().err
            return "config.reload_failed" in err

        assert await wait_for(refused), "the watcher said nothing"
        assert problem in err
        assert metrics.config_reloads.labels("error")._value.get() == 1
        data["authserver"]["servers"][0]["access_token_ttl"] = "7m"
        write(path, data)
        assert await wait_for(lambda: bool(applied)), "the watcher stopped watching"
        assert not task.done()
    finally:
        task.cancel()
    assert applied[0].authserver.servers[0].access_token_ttl == 420  # type: ignore[union-attr]
    assert metrics.config_reloads.labels("ok")._value.get() == 1


async def test_sighup_refuses_a_file_that_crashed_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokengate.yaml"
    write(path, with_route(base_config(tmp_path / "data"), timeout="5 minutes"))

    async def apply(config: Config) -> list[str]:
        raise AssertionError("an invalid config is never applied")

    metrics = Metrics()
    watcher = ConfigWatcher(path, apply, metrics)
    watcher.request()  # what SIGHUP does
    (task,) = watcher._requested
    assert await task is False
    err = capsys.readouterr().err
    assert '"event":"config.reload_failed"' in err
    assert "gateway.routes[0].timeout: must be a duration like" in err
    assert "Task exception was never retrieved" not in err
    assert metrics.config_reloads.labels("error")._value.get() == 1


async def test_the_watcher_survives_any_exception_a_reload_raises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a bug makes loading or applying raise, the reload is refused (logged by
    type, counted) and the next change is still applied."""
    import tokengate.reload

    path = tmp_path / "tokengate.yaml"
    data = base_config(tmp_path / "data")
    write(path, data)
    faults = [TypeError("quoting s3cret"), KeyError("s3cret")]
    real_load = tokengate.reload.load_config

    def load(p: Path) -> Config:
        if faults:
            raise faults.pop(0)
        return real_load(p)

    monkeypatch.setattr(tokengate.reload, "load_config", load)
    applied: list[Config] = []
    apply_faults = [ZeroDivisionError()]

    async def apply(config: Config) -> list[str]:
        if apply_faults:
            raise apply_faults.pop(0)
        applied.append(config)
        return []

    metrics = Metrics()

    def outcomes() -> float:
        return metrics.config_reloads.labels("error")._value.get() + len(applied)

    watcher = ConfigWatcher(path, apply, metrics, interval=0.01)
    task = asyncio.create_task(watcher.run())
    try:
        for ttl in ("2m", "3m", "4m", "5m"):  # TypeError, KeyError, ZeroDivisionError, ok
            data["authserver"]["servers"][0]["access_token_ttl"] = ttl
            write(path, data)
            before = outcomes()
            assert await wait_for(lambda before=before: outcomes() > before)
        assert not task.done()
    finally:
        task.cancel()
    assert metrics.config_reloads.labels("error")._value.get() == 3
    assert [c.authserver.servers[0].access_token_ttl for c in applied] == [300]  # type: ignore[union-attr]
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    failed = [e for e in events if e["event"] == "config.reload_failed"]
    assert [e["error"] for e in failed] == ["TypeError", "KeyError", "ZeroDivisionError"]
    assert all(e["problems"][0].startswith(f"{path}: could not be") for e in failed)
    assert "s3cret" not in json.dumps(failed)  # by type only: a message could quote a secret


def big_gateway(data: dict[str, Any], routes: int) -> dict[str, Any]:
    data["gateway"] = {
        "listen": "127.0.0.1:0",
        "issuers": [{"issuer": ISSUER, "audiences": ["api://default"]}],
        "routes": [
            {
                "name": f"r{i}",
                "match": {"path": f"/svc{i}/v1/**", "methods": ["GET", "POST"]},
                "upstream": f"http://10.0.{i // 250}.{i % 250}:8080",
                "timeout": "10s",
                "require": {"scopes": ["orders:read"], "claims": {"tenant": "acme"}},
            }
            for i in range(routes)
        ],
    }
    return data


@pytest.fixture
def production_gc() -> Iterator[None]:
    """The collector as ``tokengate run`` sets it: what startup built is frozen out of
    every collection, young collections are rarer (otherwise the suite's own objects
    make a full collection in the loading thread pause every thread for 100+ ms)."""
    from tokengate.serve import GC_THRESHOLD

    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


async def test_a_big_reload_never_stalls_the_event_loop(
    tmp_path: Path, production_gc: None
) -> None:
    """Reading and validating run in a thread: a coroutine ticking every 10 ms keeps
    ticking while 2,000 routes load (on the loop, it stalled for the whole load)."""
    path = tmp_path / "tokengate.yaml"
    path.write_text(json.dumps(big_gateway(base_config(tmp_path / "data"), 2000)))  # fast
    applied: list[Config] = []

    async def apply(config: Config) -> list[str]:
        applied.append(config)
        return []

    gaps: list[float] = []
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    started = loop.time()
    try:
        assert await ConfigWatcher(path, apply, Metrics()).reload() is True
        took = loop.time() - started
        await asyncio.sleep(0.05)  # the ticker sees a stall only when it runs again
    finally:
        ticker.cancel()
    assert len(applied[0].gateway.routes) == 2000  # type: ignore[union-attr]
    assert max(gaps) < 0.1, f"the loop stalled {max(gaps):.3f}s during a {took:.3f}s reload"
