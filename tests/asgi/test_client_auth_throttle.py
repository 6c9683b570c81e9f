"""Failed client authentication: one answer for every cause, then throttling per
presented client_id and per address, at the token, introspection and revocation
endpoints alike."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import jwt
import pytest

from authserver.config import ClientAuthThrottle
from authserver.throttle import MemoryThrottle
from tests.asgi.test_token_endpoint import (
    CLIENT_AUTH_FAILED,
    JWT_BEARER,
    assert_oauth_error,
    assert_token_response,
    basic,
)
from tests.conftest import (
    ADMIN_SECRET,
    ISSUER,
    PUBLIC_URL,
    REPORTING_SECRET,
    TOKEN_URL,
    AuthServer,
    FakeClock,
    base_config,
    config_from,
)
from tokengate.yamlconf import ConfigErrors

pytestmark = pytest.mark.anyio

CC = {"grant_type": "client_credentials"}
TEST_IP = "203.0.113.7"  # the address of AuthServer.client()


def client_from(server: AuthServer, ip: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=server.app, client=(ip, 51000))
    return httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL)


def assert_throttled(response: httpx.Response) -> int:
    """429 in the RFC 6749 error format; returns Retry-After (whole seconds)."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": "too many failed client authentications; retry later",
    }
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    return int(retry_after)


def auth_failures(server: AuthServer, result: str) -> float:
    registry = server.services.metrics.registry
    assert registry is not None
    value = registry.get_sample_value(
        "tokengate_authserver_client_auth_failures_total",
        {"server": "default", "result": result},
    )
    return value or 0.0


# --------------------------------------------------------------------------- one answer


def admin_basic_only(data: dict[str, Any]) -> None:
    data["authserver"]["clients"][1]["auth_method"] = "client_secret_basic"


async def test_every_failed_authentication_gets_the_same_bytes(make_authserver: Any) -> None:
    server = make_authserver(admin_basic_only)
    unknown_sub = jwt.encode(
        {"iss": "ghost", "sub": "ghost", "aud": TOKEN_URL, "exp": 2**31, "jti": "j"},
        "a-shared-secret-that-is-long-enough-for-hs256",
        algorithm="HS256",
    )
    posted = {
        "unknown-client": {"client_id": "nobody", "client_secret": REPORTING_SECRET},
        "wrong-secret": {"client_id": "reporting", "client_secret": "nope"},
        "wrong-method": {"client_id": "admin", "client_secret": ADMIN_SECRET},
        "no-credentials": {"client_id": "reporting"},
        "assertion-type": {"client_assertion_type": "urn:x", "client_assertion": "a.b.c"},
        "assertion-garbage": {"client_assertion_type": JWT_BEARER, "client_assertion": "x"},
        "assertion-unknown-client": {
            "client_assertion_type": JWT_BEARER,
            "client_assertion": unknown_sub,
        },
    }
    with_basic = {
        "basic-unknown-client": basic("nobody", REPORTING_SECRET),
        "basic-wrong-secret": basic("reporting", "nope"),
        "basic-malformed": "Basic !!!",
        "bearer": "Bearer abc",
    }
    answers: dict[str, httpx.Response] = {}
    async with server.client() as http:
        for name, fields in posted.items():
            answers[name] = await http.post(TOKEN_URL, data={**CC, **fields})
        for name, value in with_basic.items():
            answers[name] = await http.post(TOKEN_URL, data=CC, headers={"authorization": value})
    for name, response in answers.items():
        assert response.status_code == 401, name
        assert response.content == CLIENT_AUTH_FAILED, name
        challenge = 'Basic realm="tokengate"' if name in with_basic else None
        assert response.headers.get("www-authenticate") == challenge, name
    details = {line["detail"] for line in server.audit_lines()}
    assert details == {
        "unknown_client",
        "wrong_secret",
        "method_not_allowed",
        "no_credentials",
        "assertion_type",
        "assertion_malformed",
        "malformed_basic",
        "unsupported_scheme",
    }


async def test_unknown_and_known_client_ids_are_throttled_alike(make_authserver: Any) -> None:
    server = make_authserver()
    statuses: dict[str, list[int]] = {}
    bodies: dict[str, set[bytes]] = {}
    for i, client_id in enumerate(["reporting", "nobody", "x" * 5000]):
        async with client_from(server, f"198.51.100.{i}") as http:
            responses = [
                await http.post(TOKEN_URL, data=CC, auth=(client_id, "wrong")) for _ in range(8)
            ]
        statuses[client_id] = [r.status_code for r in responses]
        bodies[client_id] = {r.content for r in responses}
    assert statuses["reporting"] == [401] * 6 + [429] * 2
    assert statuses["nobody"] == statuses["x" * 5000] == statuses["reporting"]
    assert bodies["nobody"] == bodies["x" * 5000] == bodies["reporting"]


# --------------------------------------------------------------------------- per client_id


async def test_wrong_secrets_lock_the_client_id_until_the_lock_passes(
    make_authserver: Any,
) -> None:
    clock = FakeClock()
    server = make_authserver(clock=clock)
    async with server.client() as http:
        wrong = [
            await http.post(TOKEN_URL, data=CC, auth=("reporting", "wrong")) for _ in range(400)
        ]
        assert [r.status_code for r in wrong[:6]] == [401] * 6  # 5 free, the 6th locks 1 s
        for response in wrong[6:]:
            assert assert_throttled(response) == 1
        right = await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        assert assert_throttled(right) == 1
        # another client from the same address is not locked
        assert_token_response(await http.post(TOKEN_URL, data=CC, auth=("admin", ADMIN_SECRET)))
        clock.advance(1)
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )
        # a success clears the client's failures: five free ones again
        for _ in range(5):
            response = await http.post(TOKEN_URL, data=CC, auth=("reporting", "wrong"))
            assert response.status_code == 401
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )
    denied = [line for line in server.audit_lines() if line["event"] == "token.denied"]
    throttled = [line for line in denied if line["reason"] == "throttled"]
    assert len(throttled) == 395
    assert {(x["client_id"], x["outcome"], x["remote_addr"]) for x in throttled} == {
        ("reporting", "denied", TEST_IP)
    }
    assert auth_failures(server, "failed") == 11
    assert auth_failures(server, "throttled") == 395


def short_locks(data: dict[str, Any]) -> None:
    data["authserver"]["client_auth_throttle"] = {
        "failures": 2,
        "max_lock": "4s",
        "reset_after": "1m",
    }


async def test_locks_double_up_to_max_lock(make_authserver: Any) -> None:
    clock = FakeClock()
    server = make_authserver(short_locks, clock=clock)
    async with server.client() as http:
        for _ in range(2):  # free
            response = await http.post(TOKEN_URL, data=CC, auth=("reporting", "wrong"))
            assert response.status_code == 401
        locks = []
        for _ in range(4):
            response = await http.post(TOKEN_URL, data=CC, auth=("reporting", "wrong"))
            assert response.status_code == 401
            right = await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
            locks.append(assert_throttled(right))
            clock.advance(locks[-1])
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )
    assert locks == [1, 2, 4, 4]


async def test_retry_after_is_the_remaining_lock_rounded_up(make_authserver: Any) -> None:
    clock = FakeClock()
    server = make_authserver(short_locks, clock=clock)
    async with server.client() as http:
        for wait in (0, 0, 1, 2, 0):  # 2 free, then locks of 1 s and 2 s waited out, then 4 s
            await http.post(TOKEN_URL, data=CC, auth=("reporting", "wrong"))
            clock.advance(wait)
        clock.advance(1.5)
        response = await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        assert assert_throttled(response) == 3  # 2.5 s left
        clock.advance(2.5)
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )


async def test_failures_are_forgotten_after_reset_after(make_authserver: Any) -> None:
    clock = FakeClock()
    server = make_authserver(short_locks, clock=clock)
    async with server.client() as http:
        for _ in range(2):
            await http.post(TOKEN_URL, data=CC, auth=("reporting", "wrong"))
        clock.advance(61)
        for _ in range(2):  # free again: the earlier two were forgotten
            await http.post(TOKEN_URL, data=CC, auth=("reporting", "wrong"))
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )


# --------------------------------------------------------------------------- per address


async def test_many_client_ids_from_one_address_lock_the_address(make_authserver: Any) -> None:
    clock = FakeClock()
    server = make_authserver(clock=clock)
    attacker, neighbour = "198.51.100.66", "198.51.100.67"
    async with client_from(server, attacker) as http:
        guesses = [
            await http.post(TOKEN_URL, data=CC, auth=(f"guess-{i}", "wrong")) for i in range(21)
        ]
        assert [r.status_code for r in guesses] == [401] * 21  # 20 free, the 21st locks
        locked = await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        assert assert_throttled(locked) == 1
        # even a request with no credentials at all is answered 429 while locked
        assert_throttled(await http.post(TOKEN_URL, data=CC))
    async with client_from(server, neighbour) as http:
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )
    clock.advance(1)
    async with client_from(server, attacker) as http:
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )
        # a success does not clear the address: the next failure locks it for 2 s
        await http.post(TOKEN_URL, data=CC, auth=("guess-x", "wrong"))
        locked = await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        assert assert_throttled(locked) == 2
    lines = [x for x in server.audit_lines() if x["remote_addr"] == attacker]
    assert all(x["client_id"] in (None, "reporting") for x in lines)  # guesses are not logged


async def test_behind_a_trusted_proxy_the_forwarded_client_is_throttled(
    make_authserver: Any,
) -> None:
    """Behind a load balancer every request comes from its address: without
    trusted_proxies one attacker would lock out everyone; with it, only the attacker."""

    def behind_lb(data: dict[str, Any]) -> None:
        data["authserver"]["trusted_proxies"] = ["10.0.0.0/8"]

    server = make_authserver(behind_lb, clock=FakeClock())
    attacker = {"X-Forwarded-For": "198.51.100.66"}
    neighbour = {"X-Forwarded-For": "198.51.100.67"}
    async with client_from(server, "10.0.0.2") as http:
        for i in range(21):
            await http.post(TOKEN_URL, data=CC, auth=(f"guess-{i}", "wrong"), headers=attacker)
        assert_throttled(
            await http.post(
                TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET), headers=attacker
            )
        )
        assert_token_response(
            await http.post(
                TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET), headers=neighbour
            )
        )
    addresses = {x["remote_addr"] for x in server.audit_lines()}
    assert addresses == {"198.51.100.66", "198.51.100.67"}  # never the balancer's


async def test_an_untrusted_peer_cannot_dodge_throttling_with_x_forwarded_for(
    make_authserver: Any,
) -> None:
    server = make_authserver(clock=FakeClock())  # no trusted_proxies
    async with client_from(server, "198.51.100.66") as http:
        for i in range(21):
            spoof = {"X-Forwarded-For": f"192.0.2.{i}"}
            await http.post(TOKEN_URL, data=CC, auth=(f"guess-{i}", "wrong"), headers=spoof)
        assert_throttled(
            await http.post(
                TOKEN_URL,
                data=CC,
                auth=("reporting", REPORTING_SECRET),
                headers={"X-Forwarded-For": "192.0.2.200"},
            )
        )
    assert {x["remote_addr"] for x in server.audit_lines()} == {"198.51.100.66"}


def no_ip_throttle(data: dict[str, Any]) -> None:
    data["authserver"]["client_auth_throttle"] = {"ip_failures": 0, "failures": 0}


async def test_zero_turns_throttling_off(make_authserver: Any) -> None:
    server = make_authserver(no_ip_throttle)
    async with server.client() as http:
        for i in range(30):
            response = await http.post(TOKEN_URL, data=CC, auth=(f"guess-{i % 2}", "wrong"))
            assert response.status_code == 401
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )


async def test_a_reload_keeps_the_counts_unless_the_policy_changes(
    make_authserver: Any, billing_key: Any
) -> None:
    server = make_authserver()
    async with server.client() as http:
        for _ in range(6):
            await http.post(TOKEN_URL, data=CC, auth=("reporting", "wrong"))
        data = base_config(server.services.config.data_dir, billing_key[1])
        await server.app.reconfigure(config_from(data).authserver)
        right = await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        assert_throttled(right)  # same policy: still locked
        data["authserver"]["client_auth_throttle"] = {"failures": 10}
        await server.app.reconfigure(config_from(data).authserver)
        assert server.services.throttle.policy.failures == 10
        assert_token_response(
            await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        )


# --------------------------------------------------------------------------- every endpoint


@pytest.mark.parametrize(
    ("path", "event"), [("introspect", "token.introspected"), ("revoke", "token.revoked")]
)
async def test_introspection_and_revocation_are_throttled_too(
    make_authserver: Any, path: str, event: str
) -> None:
    clock = FakeClock()
    server = make_authserver(clock=clock)
    url = f"{ISSUER}/v1/{path}"
    async with server.client() as http:
        answers = [
            await http.post(url, data={"token": "t"}, auth=("reporting", "wrong")) for _ in range(7)
        ]
        right = await http.post(url, data={"token": "t"}, auth=("reporting", REPORTING_SECRET))
        token = await http.post(TOKEN_URL, data=CC, auth=("reporting", REPORTING_SECRET))
        clock.advance(1)
        after = await http.post(url, data={"token": "t"}, auth=("reporting", REPORTING_SECRET))
    for response in answers[:6]:
        assert_oauth_error(response, 401, "invalid_client", 'Basic realm="tokengate"')
        assert response.content == CLIENT_AUTH_FAILED
    assert_throttled(answers[6])
    assert_throttled(right)
    assert_throttled(token)  # the lock holds at every endpoint
    assert after.status_code == 200
    lines = [x for x in server.audit_lines() if x["event"] == event]
    reasons = [(x["outcome"], x["reason"]) for x in lines]
    assert reasons[:8] == [("error", "invalid_client")] * 6 + [("error", "throttled")] * 2
    assert reasons[8][1] == "token_invalid"
    assert len(reasons) == 9


# --------------------------------------------------------------------------- the audit line


@pytest.mark.parametrize(
    "fields",
    [
        {"client_id": REPORTING_SECRET, "client_secret": "reporting"},  # swapped
        {"client_id": REPORTING_SECRET, "client_secret": REPORTING_SECRET},
    ],
    ids=["swapped", "secret-as-both"],
)
async def test_a_client_id_is_logged_only_when_it_names_a_client(
    authserver: AuthServer, fields: dict[str, str]
) -> None:
    async with authserver.client() as http:
        response = await http.post(TOKEN_URL, data={**CC, **fields})
        basic_swapped = await http.post(
            TOKEN_URL, data=CC, headers={"authorization": basic(REPORTING_SECRET, "reporting")}
        )
        introspect = await http.post(f"{ISSUER}/v1/introspect", data={"token": "t", **fields})
    assert response.content == basic_swapped.content == introspect.content == CLIENT_AUTH_FAILED
    lines = authserver.audit_lines()
    assert [x["client_id"] for x in lines] == [None, None, None]
    assert [x["detail"] for x in lines] == ["unknown_client"] * 3
    assert REPORTING_SECRET not in authserver.audit_path.read_text()


async def test_a_configured_client_id_is_logged_on_failure(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        await http.post(TOKEN_URL, data={**CC, "client_id": "reporting", "client_secret": "x"})
    line = authserver.audit_lines()[-1]
    assert (line["client_id"], line["reason"], line["detail"]) == (
        "reporting",
        "invalid_client",
        "wrong_secret",
    )


async def test_an_assertion_for_an_unknown_sub_logs_no_client_id(authserver: AuthServer) -> None:
    claims = {"iss": REPORTING_SECRET, "sub": REPORTING_SECRET, "aud": TOKEN_URL, "exp": 2**31}
    token = jwt.encode({**claims, "jti": uuid.uuid4().hex}, "k" * 32, algorithm="HS256")
    async with authserver.client() as http:
        response = await http.post(
            TOKEN_URL,
            data={**CC, "client_assertion_type": JWT_BEARER, "client_assertion": token},
        )
    assert response.content == CLIENT_AUTH_FAILED
    assert authserver.audit_lines()[-1]["client_id"] is None
    assert REPORTING_SECRET not in authserver.audit_path.read_text()


# --------------------------------------------------------------------------- the map


async def test_the_throttle_map_is_bounded() -> None:
    clock = FakeClock()
    policy = ClientAuthThrottle(failures=1, ip_failures=1, max_lock=60, reset_after=600)
    throttle = MemoryThrottle(policy, clock=clock, max_tracked=100)
    for i in range(10_000):
        await throttle.failed(f"client-{i}" * 100, f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._clients.entries) == 100
    assert len(throttle._ips.entries) == 100
    assert all(len(key) == 16 for key in throttle._clients.entries)  # ids are hashed
    # the most recent keys are the ones kept
    await throttle.failed("client-9999" * 100, None)
    assert await throttle.retry_after("client-9999" * 100, None) == 1
    assert await throttle.retry_after("client-0" * 100, None) is None


async def test_a_lone_surrogate_client_id_is_a_key_like_any_other() -> None:
    throttle = MemoryThrottle(ClientAuthThrottle(failures=1), clock=FakeClock())
    for _ in range(2):
        await throttle.failed("\ud800x", None)
    assert await throttle.retry_after("\ud800x", None) == 1


# --------------------------------------------------------------------------- config


def throttle_config(block: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "authserver": {
            "public_url": PUBLIC_URL,
            "servers": [{"name": "default", "audience": "api://default"}],
            "client_auth_throttle": block,
        }
    }
    return data


def throttle_problems(block: Any) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        config_from(throttle_config(block))
    return [str(e) for e in info.value.errors]


def test_throttle_defaults_and_values() -> None:
    config = config_from(throttle_config(None)).authserver
    assert config is not None
    assert config.client_auth_throttle == ClientAuthThrottle(5, 20, 300.0, 900.0)
    custom = config_from(throttle_config({"failures": 3, "ip_failures": 0, "max_lock": "1h"}))
    assert custom.authserver is not None
    assert custom.authserver.client_auth_throttle == ClientAuthThrottle(3, 0, 3600.0, 3600.0)


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        (
            {"failures": -1},
            "authserver.client_auth_throttle.failures: must be an integer >= 0, got -1",
        ),
        (
            {"ip_failures": "many"},
            "authserver.client_auth_throttle.ip_failures: must be an integer, got 'many'",
        ),
        (
            {"max_lock": "500ms"},
            "authserver.client_auth_throttle.max_lock: must be at least 1s, got '500ms'",
        ),
        (
            {"max_lock": "10m", "reset_after": "5m"},
            "authserver.client_auth_throttle.reset_after: "
            "must be at least max_lock (600s), got 300s",
        ),
        (
            {"failure": 3},
            "authserver.client_auth_throttle.failure: unknown key (did you mean 'failures'?)",
        ),
        ([5], "authserver.client_auth_throttle: must be a mapping, got a list"),
    ],
)
def test_throttle_config_errors_name_the_key(block: Any, problem: str) -> None:
    assert throttle_problems(block) == [problem]


def test_introspect_config() -> None:
    data = throttle_config(None)
    del data["authserver"]["client_auth_throttle"]
    data["authserver"]["clients"] = [
        {"client_id": "a", "secret": REPORTING_SECRET},
        {"client_id": "b", "secret": REPORTING_SECRET, "introspect": "any"},
    ]
    config = config_from(data).authserver
    assert config is not None
    assert [c.introspect for c in config.clients] == ["own", "any"]
    data["authserver"]["clients"][1]["introspect"] = "all"
    with pytest.raises(ConfigErrors) as info:
        config_from(data)
    assert [str(e) for e in info.value.errors] == [
        "authserver.clients[1].introspect: must be one of own, any; got 'all'"
    ]


def test_ipv6_addresses_count_per_slash_64() -> None:
    from authserver.throttle import address_key

    assert (
        address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    )
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("::ffff:198.51.100.7") == "198.51.100.7"
    assert address_key("198.51.100.7") == "198.51.100.7"
    assert address_key("not-an-ip") == "not-an-ip"
