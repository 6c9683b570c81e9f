"""Rate limits in real ``tokengate run`` processes: a route's limit held across two
workers through Redis (and per worker without it), and Redis killed mid-run."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Tokengate, free_port

SHARED_REDIS = os.environ.get("TOKENGATE_TEST_REDIS_E2E", "redis://127.0.0.1:6379/13")
RATE, BURST = 20, 20  # the route's limit: 20/s, 20 at once
HAMMER = 2.0  # seconds of traffic


def shared_redis(url: str = SHARED_REDIS) -> str:
    """A test database of the shared Redis (each test file its own), emptied; a skip
    where there is none."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.flushdb()  # only this test database, never the others
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no Redis at {url} ({type(exc).__name__})")
    finally:
        client.close()
    return url


def stack_config(echo: int, gateway: int, admin: int, redis_url: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "echo": {"listen": f"127.0.0.1:{echo}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "audit": {"path": "audit.log"},
        "gateway": {
            "listen": f"127.0.0.1:{gateway}",
            "routes": [
                {
                    "name": "limited",
                    "match": {"path": "/limited/**"},
                    "upstream": f"http://127.0.0.1:{echo}",
                    "public": True,
                    "rate_limit": {"per": "route", "limit": f"{RATE}/s", "burst": BURST},
                }
            ],
        },
    }
    if redis_url is not None:
        config["redis"] = redis_url
    return config


class Stack:
    def __init__(self, process: Tokengate, gateway: int, admin: int) -> None:
        self.process = process
        self.gateway = f"http://127.0.0.1:{gateway}"
        self.admin = f"http://127.0.0.1:{admin}"

    def fallbacks(self) -> float:
        """Decisions made in a process although Redis is configured, over all workers."""
        text = httpx.get(f"{self.admin}/metrics", timeout=5).text
        lines = [
            x for x in text.splitlines() if x.startswith("tokengate_ratelimit_redis_fallbacks_")
        ]
        return sum(float(x.split()[-1]) for x in lines if "_total" in x)

    def readyz(self) -> dict[str, Any]:
        return httpx.get(f"{self.admin}/readyz", timeout=5).json()  # type: ignore[no-any-return]


@pytest.fixture
def stack(tokengate: Any) -> Iterator[Any]:
    def start(redis_url: str | None, workers: int = 2) -> Stack:
        echo, gateway, admin = free_port(), free_port(), free_port()
        process = tokengate(
            stack_config(echo, gateway, admin, redis_url), "--workers", str(workers)
        )
        process.start(f"http://127.0.0.1:{admin}/readyz")
        return Stack(process, gateway, admin)

    yield start


async def hammer(
    url: str, seconds: float, concurrency: int = 8, pause: float = 0.02
) -> tuple[int, int, float]:
    """Requests from ``concurrency`` callers for ``seconds``, each on a new connection so
    that both workers take a share: (admitted, refused, elapsed seconds).

    Each caller pauses ``pause`` between requests: a few hundred requests a second,
    ten times the limit, without starving a shared 2-core machine (a stalled event
    loop would time decisions out and have them decided in the process)."""
    counts = {200: 0, 429: 0}
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=5) as client:
        started = time.monotonic()
        deadline = started + seconds

        async def caller() -> None:
            while time.monotonic() < deadline:
                response = await client.get(url)
                counts[response.status_code] = counts.get(response.status_code, 0) + 1
                await asyncio.sleep(pause)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    assert set(counts) == {200, 429}, counts
    return counts[200], counts[429], elapsed


def test_a_route_limit_holds_across_two_workers_through_redis(stack: Any) -> None:
    gw = stack(shared_redis())
    admitted, refused, elapsed = asyncio.run(hammer(f"{gw.gateway}/limited/x", HAMMER))
    expected = BURST + RATE * elapsed  # a full burst, then the rate
    print(
        f"redis, 2 workers: {admitted} admitted, {refused} refused in {elapsed:.2f} s; "
        f"limit allows {expected:.1f} ({admitted / expected:.1%})"
    )
    events = [e for e in gw.process.log_events() if e["event"].startswith("ratelimit.")]
    assert events == []
    assert gw.fallbacks() == 0  # every decision was Redis's
    assert refused > admitted  # the limit was the bottleneck
    assert expected * 0.95 - 1 <= admitted <= expected + 1
    assert gw.readyz()["degraded"] == []


def test_without_redis_each_worker_holds_the_limit_on_its_own(stack: Any) -> None:
    gw = stack(None)
    admitted, refused, elapsed = asyncio.run(hammer(f"{gw.gateway}/limited/x", HAMMER))
    one = BURST + RATE * elapsed
    print(
        f"no redis, 2 workers: {admitted} admitted, {refused} refused in {elapsed:.2f} s; "
        f"one process allows {one:.1f} ({admitted / one:.1%})"
    )
    # per process: up to twice the limit over two workers, never more
    assert one * 1.2 <= admitted <= 2 * one + 2


# --------------------------------------------------------------------------- Redis killed


class OwnRedis:
    """A redis-server of this test's own, on a free port: killing it harms nobody."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        import redis

        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def test_redis_killed_mid_run_falls_back_per_process_and_recovers(
    stack: Any, own_redis: OwnRedis
) -> None:
    gw = stack(own_redis.url, workers=1)
    url = f"{gw.gateway}/limited/x"
    admitted, _, elapsed = asyncio.run(hammer(url, 0.5))
    assert admitted <= BURST + RATE * elapsed + 1  # shared: in Redis
    own_redis.kill()
    admitted, refused, elapsed = asyncio.run(hammer(url, 1.0))
    # requests keep flowing, on the process's own limit: nothing is refused for Redis
    assert admitted >= RATE * elapsed * 0.9 and refused > 0
    assert gw.fallbacks() >= admitted + refused  # each of them decided in the process
    readyz = gw.readyz()
    assert readyz["ready"] is True
    assert readyz["degraded"] == ["ratelimit: redis unavailable, limits hold per process"]
    events = [e["event"] for e in gw.process.log_events()]
    assert events.count("ratelimit.redis_unavailable") == 1  # once per episode
    own_redis.start()  # same port, empty
    deadline = time.monotonic() + 10
    while gw.readyz()["degraded"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gw.readyz()["degraded"] == []
    events = [e["event"] for e in gw.process.log_events()]
    assert events.count("ratelimit.redis_recovered") == 1
    admitted, _, elapsed = asyncio.run(hammer(url, 0.5))
    assert admitted <= BURST + RATE * elapsed + 1
    import redis

    keys = redis.Redis(port=own_redis.port).keys("tokengate:rl:*")
    assert keys == [b"tokengate:rl:route:limited:-"]  # decisions are in Redis again


def test_a_stalled_redis_costs_a_decision_at_most_the_timeout(own_redis: OwnRedis) -> None:
    """SIGSTOP: Redis accepts nothing and answers nothing. Each decision waits at most
    the 50 ms timeout once, then the process decides alone until Redis answers again."""
    import signal

    from tokengate.ratelimit import Rate, RateLimiter, lease_size

    async def scenario() -> None:
        limiter = RateLimiter(own_redis.url, retry_first=0.1, retry_max=0.2)
        rate = Rate(100, 60, 100)  # one back every 0.6 s
        try:
            assert (await limiter.decide("route:r", "k", rate)).allowed and limiter.shared
            assert own_redis.proc is not None
            own_redis.proc.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            decisions = [await limiter.decide("route:r", "k", rate) for _ in range(50)]
            took = time.monotonic() - started
            assert all(d.allowed for d in decisions) and not limiter.shared
            # timeouts for SLOW_EPISODE (0.25 s, about 5 decisions), then local ones
            assert took < 0.8
            own_redis.proc.send_signal(signal.SIGCONT)
            for _ in range(100):  # up to 5 s
                if limiter.shared:
                    break
                await asyncio.sleep(0.05)
            assert limiter.shared
            # in Redis again: it kept the first decision and ran the one that timed out
            # once it resumed (a timed-out decision may still count), not the local ones;
            # each of those three took a lease of cells (the first two long expired)
            lease = lease_size(rate)
            expected = rate.burst - 3 * lease + (lease - 1)
            assert (await limiter.decide("route:r", "k", rate)).remaining == expected
        finally:
            if own_redis.proc is not None:
                own_redis.proc.send_signal(signal.SIGCONT)
            await limiter.aclose()

    asyncio.run(scenario())


def assert_five_of_eight(answers: list[httpx.Response]) -> None:
    """Eight token requests against a budget of 5/min: five issued, three refused, with
    Okta's headers counting down and a Retry-After on the refusals."""
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 3
    assert [r.headers["x-rate-limit-remaining"] for r in answers] == [
        "4",
        "3",
        "2",
        "1",
        "0",
        "0",
        "0",
        "0",
    ]
    assert answers[-1].json()["error"] == "temporarily_unavailable"
    assert int(answers[-1].headers["retry-after"]) >= 1


def test_the_token_endpoint_limit_holds_across_two_workers(tokengate: Any, tmp_path: Path) -> None:
    from tests.conftest import REPORTING_SECRET
    from tests.e2e.conftest import e2e_config

    port, admin = free_port(), free_port()
    config = e2e_config(tmp_path / "data", port, rate_limits={"token": {"per_client": "5/min"}})
    config.update(redis=shared_redis(), admin={"listen": f"127.0.0.1:{admin}"})
    process = tokengate(config, "--workers", "2")
    process.start(f"http://127.0.0.1:{admin}/readyz")
    url = f"http://127.0.0.1:{port}/oauth2/default/v1/token"
    answers = []
    for _ in range(8):  # a new connection each: both workers answer
        with httpx.Client(timeout=10) as client:
            answers.append(
                client.post(
                    url,
                    data={"grant_type": "client_credentials"},
                    auth=("reporting", REPORTING_SECRET),
                )
            )
    assert_five_of_eight(answers)


def test_the_token_endpoint_limit_holds_across_two_replicas(tmp_path: Path, pg_url: str) -> None:
    """Two authorization-server replicas on one PostgreSQL store, behind one public URL:
    a client's token-endpoint limit is one limit, held in the shared Redis."""
    import base64
    import secrets

    from tests.conftest import REPORTING_SECRET
    from tests.e2e.conftest import e2e_config

    redis_url = shared_redis()
    kek = base64.b64encode(secrets.token_bytes(32)).decode()
    ports = [free_port(), free_port()]
    public_url = f"http://127.0.0.1:{ports[0]}"  # the one address (a load balancer's)
    replicas = []
    try:
        for name, port in zip(("a", "b"), ports, strict=True):
            admin = free_port()
            (tmp_path / name).mkdir()
            config = e2e_config(
                tmp_path / name / "data",
                port,
                public_url=public_url,
                store=pg_url,
                key_encryption_key=kek,
                rate_limits={"token": {"per_client": "5/min"}},
            )
            config.update(redis=redis_url, admin={"listen": f"127.0.0.1:{admin}"})
            replica = Tokengate(tmp_path / name, config, "--only", "authserver")
            replicas.append(replica)
            replica.start(f"http://127.0.0.1:{admin}/readyz")
        answers = []
        for i in range(8):  # alternating: a, b, a, b, ...
            url = f"http://127.0.0.1:{ports[i % 2]}/oauth2/default/v1/token"
            answers.append(
                httpx.post(
                    url,
                    data={"grant_type": "client_credentials"},
                    auth=("reporting", REPORTING_SECRET),
                    timeout=10,
                )
            )
        assert_five_of_eight(answers)
        for replica in replicas:  # every decision was Redis's
            events = [e["event"] for e in replica.log_events()]
            assert not [e for e in events if e.startswith("ratelimit.")], events
    finally:
        for replica in replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
                replica.proc.wait()
