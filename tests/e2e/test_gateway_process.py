"""``tokengate run`` serving the authorization server and the gateway, in front of an
upstream in its own process, over real loopback sockets."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from authlib.integrations.httpx_client import OAuth2Client

from tests.conftest import ADMIN_SECRET, REPORTING_SECRET
from tests.e2e.conftest import ROOT, Tokengate, e2e_config, free_port


class Stack:
    def __init__(
        self, main: Tokengate, upstream: Tokengate, auth_port: int, gw_port: int, admin_port: int
    ) -> None:
        self.main = main
        self.upstream = upstream
        self.issuer = f"http://127.0.0.1:{auth_port}/oauth2/default"
        self.gateway = f"http://127.0.0.1:{gw_port}"
        self.admin = f"http://127.0.0.1:{admin_port}"

    def token(self, client: str = "admin") -> str:
        secret = {"admin": ADMIN_SECRET, "reporting": REPORTING_SECRET}[client]
        with OAuth2Client(client, secret) as oauth:
            token = oauth.fetch_token(f"{self.issuer}/v1/token", grant_type="client_credentials")
        return token["access_token"]  # type: ignore[no-any-return]


def start_stack(
    tmp_path: Path, *args: str, authserver: dict[str, Any] | None = None, **issuer: Any
) -> Stack:
    up_port, auth_port, gw_port, admin_port = free_port(), free_port(), free_port(), free_port()
    (tmp_path / "upstream").mkdir()
    (tmp_path / "main").mkdir()
    upstream = Tokengate(tmp_path / "upstream", {"echo": {"listen": f"127.0.0.1:{up_port}"}})
    upstream.start(f"http://127.0.0.1:{up_port}/")
    config = e2e_config(tmp_path / "main" / "data", auth_port, **(authserver or {}))
    issuer_url = f"http://127.0.0.1:{auth_port}/oauth2/default"
    upstream_url = f"http://127.0.0.1:{up_port}"
    config["gateway"] = {
        "listen": f"127.0.0.1:{gw_port}",
        "issuers": [{"issuer": issuer_url, "audiences": ["api://default"], **issuer}],
        "routes": [
            {
                "name": "orders",
                "match": {"path": "/orders/**"},
                "upstream": upstream_url,
                "timeout": "2s",
                "require": {"scopes": ["orders:read"]},
            },
            {
                "name": "bulk",
                "match": {"path": "/bulk/**"},
                "upstream": upstream_url,
                "timeout": "60s",
                "require": {"scopes": ["orders:read"]},
            },
            {
                "name": "health",
                "match": {"path": "/health"},
                "upstream": upstream_url,
                "public": True,
            },
        ],
    }
    config["audit"] = {"path": str(tmp_path / "main" / "audit.log")}
    config["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    main = Tokengate(tmp_path / "main", config, *args)
    try:
        main.start(f"http://127.0.0.1:{admin_port}/readyz")
    except BaseException:
        for process in (main, upstream):  # the fixture never sees a stack that did not start
            if process.proc is not None and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()
        raise
    return Stack(main, upstream, auth_port, gw_port, admin_port)


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Any]:
    """Start a stack; whatever happens in the test, its processes end with it."""
    started: list[Stack] = []

    def make(*args: str, **kwargs: Any) -> Stack:
        s = start_stack(tmp_path, *args, **kwargs)
        started.append(s)
        return s

    yield make
    for s in started:
        for process in (s.main, s.upstream):
            if process.proc and process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


@pytest.fixture
def stack(make_stack: Any) -> Stack:
    return make_stack()  # type: ignore[no-any-return]


def audit(stack: Stack) -> list[dict[str, Any]]:
    time.sleep(0.2)  # the audit writer drains its queue every 20 ms
    path = stack.main.workdir / "audit.log"
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_allowed_and_denied_over_sockets(stack: Stack) -> None:
    token = stack.token()
    ok = httpx.get(
        f"{stack.gateway}/orders/7",
        headers={
            "Authorization": f"Bearer {token}",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "X-Auth-Client-Id": "spoof",
        },
    )
    assert ok.status_code == 200
    headers = ok.json()["headers"]
    assert headers["x-auth-client-id"] == "admin"
    for hop in ("x-hop", "keep-alive", "te", "authorization"):
        assert hop not in headers
    assert "connection" not in ok.headers or ok.headers["connection"] == "keep-alive"
    denied = httpx.get(f"{stack.gateway}/orders/7")
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == 'Bearer realm="tokengate"'
    reasons = [(x["event"], x["reason"]) for x in audit(stack)]
    assert ("gateway.request", "ok") in reasons and ("gateway.request", "token_missing") in reasons


def test_bodiless_statuses_and_head_keep_the_connection_sound(stack: Stack) -> None:
    with httpx.Client(base_url=stack.gateway) as client:  # one keep-alive connection
        for method, query, status in [
            ("GET", "status=304", 304),
            ("GET", "status=204", 204),
            ("HEAD", "", 200),
            ("GET", "", 200),
        ]:
            response = client.request(method, f"/health?{query}")
            assert response.status_code == status
            if status != 200 or method == "HEAD":
                assert response.content == b""
    # uvicorn reports a body shorter than the Content-Length it was given as an error
    assert '"level":"error"' not in stack.main.stderr()


def test_raw_path_bypasses_over_a_real_socket(stack: Stack) -> None:
    """No client library normalization in the way: bytes on the wire."""

    def raw_get(path: bytes) -> int:
        with socket.create_connection(("127.0.0.1", int(stack.gateway.rsplit(":", 1)[1]))) as s:
            s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return int(s.recv(64).split(b" ")[1])

    assert raw_get(b"/health/../orders/1") == 401
    assert raw_get(b"/health/%2e%2e/orders/1") == 401
    assert raw_get(b"/health%2F..%2Forders/1") == 400
    assert raw_get(b"/health/..;/orders/1") == 400


def test_chunks_arrive_as_the_upstream_sends_them(stack: Stack) -> None:
    token = stack.token()
    arrivals: list[float] = []
    started = time.monotonic()
    with httpx.stream(
        "GET",
        f"{stack.gateway}/orders/stream?chunks=5&interval=0.3",
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers
        for line in response.iter_lines():
            if line:
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 5
    assert arrivals[0] < 0.5  # the first chunk is not held back for the rest
    assert arrivals[-1] - arrivals[0] >= 1.0
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(arrivals))


def test_server_sent_events_pass_through(stack: Stack) -> None:
    token = stack.token()
    with httpx.stream(
        "GET",
        f"{stack.gateway}/orders/events?events=3&interval=0.1",
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert events == ['data: {"n": 0}', 'data: {"n": 1}', 'data: {"n": 2}']


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


GIB = 1024**3


def test_one_gib_each_way_with_flat_gateway_memory(stack: Stack) -> None:
    token = stack.token()
    headers = {"Authorization": f"Bearer {token}"}
    assert stack.main.proc is not None
    # warm up the pools, then measure
    httpx.get(f"{stack.gateway}/bulk/warm?bytes=1000000", headers=headers)
    with PeakRss(stack.main.proc.pid) as download:
        received = 0
        with httpx.stream(
            "GET", f"{stack.gateway}/bulk/big?bytes={GIB}", headers=headers, timeout=120
        ) as response:
            assert response.headers["content-length"] == str(GIB)
            for chunk in response.iter_raw():
                received += len(chunk)
    assert received == GIB

    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(1024):
        digest.update(block)

    def body() -> Iterator[bytes]:
        for _ in range(1024):
            yield block

    with PeakRss(stack.main.proc.pid) as upload:
        response = httpx.post(
            f"{stack.gateway}/bulk/upload",
            content=body(),
            headers={**headers, "Content-Length": str(GIB)},
            timeout=120,
        )
    assert response.status_code == 200
    assert response.json()["body_bytes"] == GIB
    assert response.json()["body_sha256"] == digest.hexdigest()
    for measured in (download, upload):
        assert measured.peak - measured.baseline < 64 * 1024**2, (
            measured.baseline,
            measured.peak,
        )
    lines = [x for x in audit(stack) if x.get("path") in ("/bulk/big", "/bulk/upload")]
    assert [(x["bytes_in"], x["bytes_out"] >= GIB) for x in lines] == [(0, True), (GIB, False)]


def test_client_disconnect_cancels_the_upstream_stream(stack: Stack) -> None:
    token = stack.token()
    port = int(stack.gateway.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"GET /orders/slow?chunks=1000&interval=0.1 HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        assert b"200 OK" in s.recv(4096)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if "echo.stream_cancelled" in stack.upstream.stderr():
            break
        time.sleep(0.05)
    assert "echo.stream_cancelled" in stack.upstream.stderr()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [
        x for x in audit(stack) if x.get("path") == "/orders/slow"
    ]:
        time.sleep(0.05)
    (line,) = [x for x in audit(stack) if x.get("path") == "/orders/slow"]
    assert line["status"] == 499


def test_upstream_down_is_502_and_slow_is_504(stack: Stack) -> None:
    token = stack.token()
    headers = {"Authorization": f"Bearer {token}"}
    slow = httpx.get(f"{stack.gateway}/orders/x?delay=3", headers=headers, timeout=10)
    assert slow.status_code == 504
    stack.upstream.stop()
    down = httpx.get(f"{stack.gateway}/orders/x", headers=headers)
    assert down.status_code == 502
    reasons = [x["reason"] for x in audit(stack) if x["event"] == "gateway.request"]
    assert reasons[-2:] == ["upstream_timeout", "upstream_unavailable"]


def test_key_rotation_with_no_restart_and_no_failed_request(make_stack: Any) -> None:
    stack = make_stack(
        "--workers",
        "2",
        authserver={"jwks_max_age": "1s"},
        jwks_cache_min="1s",
        jwks_cache_max="2s",
    )
    results: list[tuple[str, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        with OAuth2Client("admin", ADMIN_SECRET) as oauth:
            while not stop.is_set():
                token = oauth.fetch_token(
                    f"{stack.issuer}/v1/token", grant_type="client_credentials"
                )["access_token"]
                status = httpx.get(
                    f"{stack.gateway}/orders/1", headers={"Authorization": f"Bearer {token}"}
                ).status_code
                results.append((jwt.get_unverified_header(token)["kid"], status))

    worker = threading.Thread(target=traffic)
    worker.start()
    time.sleep(1)
    rotated = stack.main.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.split("next key ")[1].split()[0]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and sum(k == new_kid for k, _ in results) < 20:
        time.sleep(0.1)
    stop.set()
    worker.join()
    kids = {k for k, _ in results}
    assert len(kids) == 2 and new_kid in kids
    assert [s for _, s in results if s != 200] == []
    assert stack.main.stop() == 0


def test_the_default_config_demo(tmp_path: Path) -> None:
    """`make run`: the shipped config, with free ports instead of 9000/8080/7000."""
    text = (ROOT / "config/tokengate.yaml").read_text()
    ports = {old: str(free_port()) for old in ("9000", "8080", "7000", "9100")}
    for old, new in ports.items():
        text = text.replace(f":{old}", f":{new}")
    workdir = tmp_path / "demo"
    workdir.mkdir()
    config = workdir / "tokengate.yaml"
    config.write_text(text)
    import yaml

    demo = Tokengate(workdir, yaml.safe_load(text))
    demo.start(f"http://127.0.0.1:{ports['8080']}/health")
    try:
        token = httpx.post(
            f"http://127.0.0.1:{ports['9000']}/oauth2/default/v1/token",
            auth=("demo", "demo-secret-do-not-use-in-production"),
            data={"grant_type": "client_credentials"},
        ).json()["access_token"]
        response = httpx.get(
            f"http://127.0.0.1:{ports['8080']}/orders/42",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200
        assert response.json()["headers"]["x-auth-client-id"] == "demo"
        write = httpx.post(
            f"http://127.0.0.1:{ports['8080']}/orders/42",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert write.status_code == 403
        ready = httpx.get(f"http://127.0.0.1:{ports['9100']}/readyz")
        assert (ready.status_code, ready.json()) == (
            200,
            {"ready": True, "not_ready": [], "degraded": []},
        )
    finally:
        assert demo.stop() == 0


def test_an_upstream_failing_mid_body_closes_the_client_connection(stack: Stack) -> None:
    token = stack.token()
    with pytest.raises(httpx.RemoteProtocolError):  # the body is cut short, never "complete"
        httpx.get(
            f"{stack.gateway}/orders/x?bytes=1000000&fail_after=65536",
            headers={"Authorization": f"Bearer {token}"},
        )
    lines = [x for x in audit(stack) if x["event"] == "gateway.request"]
    # counted as the failure it is, though the client saw the upstream's 200 status line
    assert (lines[-1]["status"], lines[-1]["reason"]) == (502, "upstream_unavailable")
    assert lines[-1]["decision"] == "allow" and lines[-1]["bytes_out"] >= 65536
    stderr = stack.main.stderr().splitlines()
    assert stderr and all(line.startswith("{") for line in stderr), stderr  # JSON lines only
    events = [json.loads(line) for line in stderr]
    failed = [e for e in events if e["event"] == "gateway.upstream_failed"]
    assert failed and "mid-body" in failed[-1]["error"]
    assert not [e for e in events if e["event"] == "log"], events  # no traceback per request
    for _ in range(5):  # more of them: still one report per 10 s, never a traceback
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(
                f"{stack.gateway}/orders/x?bytes=1000000&fail_after=65536",
                headers={"Authorization": f"Bearer {token}"},
            )
    events = [json.loads(line) for line in stack.main.stderr().splitlines()]
    assert len([e for e in events if e["event"] == "gateway.upstream_failed"]) == len(failed)
    assert not [e for e in events if e["event"] == "log"]
    metrics = httpx.get(f"{stack.admin}/metrics").text
    assert (
        'tokengate_gateway_requests_total{code="502",decision="allow",method="GET",'
        'reason="upstream_unavailable",route="orders"} 6.0'
    ) in metrics


def test_metrics_sum_over_workers_and_sigusr1_reopens_the_audit_file(make_stack: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    stack = make_stack("--workers", "2")
    token = stack.token()
    for _ in range(20):  # a new connection each: the kernel spreads them over workers
        assert (
            httpx.get(
                f"{stack.gateway}/orders/1", headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 200
        )
    for _ in range(10):
        assert httpx.get(f"{stack.gateway}/orders/1").status_code == 401

    def counts() -> dict[tuple[str, str], float]:
        text = httpx.get(f"{stack.admin}/metrics").text
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "tokengate_gateway_requests_total":
                    key = (sample.labels["route"], sample.labels["reason"])
                    out[key] = out.get(key, 0) + sample.value
                if sample.name == "tokengate_authserver_tokens_issued_total":  # every grant type
                    out[("tokens", "issued")] = out.get(("tokens", "issued"), 0) + sample.value
        return out

    expected = {("orders", "ok"): 20, ("orders", "token_missing"): 10, ("tokens", "issued"): 1}
    deadline = time.monotonic() + 5  # each worker publishes its tallies every second
    while time.monotonic() < deadline and {k: counts().get(k) for k in expected} != expected:
        time.sleep(0.2)
    for _ in range(4):  # whichever worker answers, the totals cover both
        got = counts()
        assert got[("orders", "ok")] == 20
        assert got[("orders", "token_missing")] == 10
        assert got[("tokens", "issued")] == 1

    audit_path = stack.main.workdir / "audit.log"
    time.sleep(0.2)
    audit_path.rename(stack.main.workdir / "audit.log.1")  # what logrotate does
    assert stack.main.proc is not None
    stack.main.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and stack.main.stderr().count("audit.reopened") < 2:
        time.sleep(0.05)
    assert stack.main.stderr().count("audit.reopened") == 2  # both workers
    assert httpx.get(f"{stack.gateway}/orders/2").status_code == 401
    time.sleep(0.2)
    new_lines = [json.loads(x) for x in audit_path.read_text().splitlines()]
    assert [x["path"] for x in new_lines] == ["/orders/2"]
    old = (stack.main.workdir / "audit.log.1").read_text()
    assert "/orders/2" not in old and old.count("gateway.request") >= 30
    for line in old.splitlines():  # two workers, one file: every line whole
        json.loads(line)
    assert stack.main.stop() == 0


def test_hot_reload_of_routes_and_a_refused_invalid_config(stack: Stack) -> None:
    import yaml

    path = stack.main.config_path
    config = yaml.safe_load(path.read_text())
    upstream_url = config["gateway"]["routes"][0]["upstream"]
    assert httpx.get(f"{stack.gateway}/reports/1").status_code == 404
    config["gateway"]["routes"].insert(
        0,
        {
            "name": "reports",
            "match": {"path": "/reports/**"},
            "upstream": upstream_url,
            "public": True,
        },
    )
    path.write_text(yaml.safe_dump(config))
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline and httpx.get(f"{stack.gateway}/reports/1").status_code != 200
    ):
        time.sleep(0.1)
    assert httpx.get(f"{stack.gateway}/reports/1").status_code == 200

    broken = dict(config, gateway={**config["gateway"], "routes": [{"name": "x"}]})
    path.write_text(yaml.safe_dump(broken))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "config.reload_failed" not in stack.main.stderr():
        time.sleep(0.1)
    failure = next(e for e in stack.main.log_events() if e["event"] == "config.reload_failed")
    assert "gateway.routes[0].match: is required" in failure["problems"]
    assert "gateway.routes[0].upstream: is required" in failure["problems"]
    assert httpx.get(f"{stack.gateway}/reports/1").status_code == 200  # the old config serves
    metrics = httpx.get(f"{stack.admin}/metrics").text
    assert 'tokengate_config_reloads_total{result="error"} 1.0' in metrics
    assert 'tokengate_config_reloads_total{result="ok"} 1.0' in metrics

    # SIGHUP reloads at once, changed or not
    path.write_text(yaml.safe_dump(config))
    assert stack.main.proc is not None
    stack.main.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and stack.main.stderr().count('"config.reloaded"') < 2:
        time.sleep(0.05)
    assert stack.main.stderr().count('"config.reloaded"') >= 2


def test_sigterm_lets_in_flight_requests_finish(stack: Stack) -> None:
    token = stack.token()
    result: list[int] = []

    def slow() -> None:
        response = httpx.get(
            f"{stack.gateway}/orders/x?delay=1.5",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        result.append(response.status_code)

    worker = threading.Thread(target=slow)
    worker.start()
    time.sleep(0.4)  # the request is with the upstream
    assert stack.main.proc is not None
    stack.main.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.ConnectError):  # no longer accepting
        httpx.get(f"{stack.gateway}/health", timeout=2)
    worker.join()
    assert result == [200]
    assert stack.main.proc.wait(timeout=30) == 0


def test_a_crashed_worker_is_replaced(make_stack: Any) -> None:
    stack = make_stack("--workers", "2")
    assert stack.main.proc is not None
    children = [
        int(pid)
        for pid in Path(f"/proc/{stack.main.proc.pid}/task/{stack.main.proc.pid}/children")
        .read_text()
        .split()
    ]
    workers = [p for p in children if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) == 2, children
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "worker.replaced" not in stack.main.stderr():
        time.sleep(0.1)
    replaced = next(e for e in stack.main.log_events() if e["event"] == "worker.replaced")
    assert replaced["pid"] == workers[0] and replaced["exitcode"] == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and httpx.get(f"{stack.admin}/readyz").status_code != 200:
        time.sleep(0.1)
    token = stack.token()
    for _ in range(10):  # both workers answer again
        assert (
            httpx.get(
                f"{stack.gateway}/orders/1", headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 200
        )
    assert stack.main.stop() == 0
