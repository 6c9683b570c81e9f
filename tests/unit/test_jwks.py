"""The JWKS cache: discovery, single-flight, unknown kids, Cache-Control, stale-if-error."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from authserver.keys import SigningKey, generate_private_key, public_members, thumbprint
from gateway.config import IssuerConfig
from gateway.jwks import IssuerKeys, KeysUnavailable, KeyUnknown, max_age, parse_jwks

pytestmark = pytest.mark.anyio
ISSUER = "https://idp.example.com/oauth2/default"


def key(alg: str = "RS256") -> SigningKey:
    private = generate_private_key(alg)
    return SigningKey.load(thumbprint(public_members(private)), alg, private)


def issuer(**overrides: Any) -> IssuerConfig:
    values: dict[str, Any] = {
        "issuer": ISSUER,
        "audiences": ("api://default",),
        "jwks_uri": None,
        "algorithms": ("RS256", "ES256"),
        "leeway": 30,
        "allow_jwt_typ": False,
        "jwks_cache_min": 30,
        "jwks_cache_max": 3600,
        "jwks_cache_default": 300,
        "jwks_max_stale": 86400,
    }
    values.update(overrides)
    return IssuerConfig(**values)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class IdP:
    """Discovery + JWKS over httpx.MockTransport, counting requests."""

    def __init__(self, keys: list[SigningKey], cache_control: str = "max-age=600") -> None:
        self.keys = keys
        self.cache_control = cache_control
        self.requests: list[str] = []
        self.fail = False
        self.delay = 0.0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            return httpx.Response(503)
        if request.url.path.endswith("openid-configuration"):
            return httpx.Response(200, json={"issuer": ISSUER, "jwks_uri": f"{ISSUER}/v1/keys"})
        return httpx.Response(
            200,
            json={"keys": [k.jwk for k in self.keys]},
            headers={"cache-control": self.cache_control},
        )

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))

    @property
    def jwks_fetches(self) -> int:
        return sum(1 for p in self.requests if p.endswith("/v1/keys"))


async def test_discovery_then_keys_by_kid() -> None:
    signing = key()
    idp = IdP([signing])
    keys = IssuerKeys(issuer(), idp.client(), clock=Clock())
    found = await keys.key(signing.kid)
    assert found.algorithms == {"RS256"}
    assert idp.requests == [
        "/oauth2/default/.well-known/openid-configuration",
        "/oauth2/default/v1/keys",
    ]


async def test_discovery_naming_another_issuer_is_refused() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"issuer": "https://evil", "jwks_uri": "https://evil/k"})

    keys = IssuerKeys(issuer(), httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    with pytest.raises(KeysUnavailable):
        await keys.key("any")
    assert keys.fetches["error"] == 1


async def test_cold_lookups_share_one_fetch() -> None:
    signing = key()
    idp = IdP([signing])
    idp.delay = 0.05
    keys = IssuerKeys(issuer(jwks_uri=f"{ISSUER}/v1/keys"), idp.client(), clock=Clock())
    found = await asyncio.gather(*(keys.key(signing.kid) for _ in range(50)))
    assert {f.kid for f in found} == {signing.kid}
    assert idp.jwks_fetches == 1


async def test_unknown_kids_refetch_at_most_once_per_interval() -> None:
    signing = key()
    idp = IdP([signing])
    clock = Clock()
    keys = IssuerKeys(issuer(jwks_uri=f"{ISSUER}/v1/keys"), idp.client(), clock=clock)
    await keys.key(signing.kid)
    for i in range(100):
        with pytest.raises(KeyUnknown):
            await keys.key(f"random-{i}")
    assert idp.jwks_fetches == 1  # within jwks_cache_min of the last fetch: no refetch
    clock.now += 31
    rotated = key()
    idp.keys.append(rotated)
    assert (await keys.key(rotated.kid)).kid == rotated.kid  # one refetch finds it
    for i in range(100):
        with pytest.raises(KeyUnknown):
            await keys.key(f"other-{i}")
    assert idp.jwks_fetches == 2


async def test_cache_control_is_clamped() -> None:
    assert max_age("public, max-age=120") == 120
    assert max_age("no-store, max-age=120") is None
    assert max_age(None) is None
    for header, ttl in (("max-age=5", 30), ("max-age=999999", 3600), ("no-cache", 300)):
        idp = IdP([key()], cache_control=header)
        keys = IssuerKeys(issuer(jwks_uri=f"{ISSUER}/v1/keys"), idp.client(), clock=Clock())
        await keys.refresh()
        assert keys.keyset is not None and keys.keyset.ttl == ttl


async def test_stale_keys_serve_until_max_stale_then_fail_closed() -> None:
    signing = key()
    idp = IdP([signing])
    clock = Clock()
    keys = IssuerKeys(
        issuer(jwks_uri=f"{ISSUER}/v1/keys", jwks_max_stale=3600), idp.client(), clock=clock
    )
    await keys.refresh()
    idp.fail = True
    clock.now += 3000
    await keys.refresh()
    assert keys.fetches == {"success": 1, "error": 1}
    assert (await keys.key(signing.kid)).kid == signing.kid  # stale, still served
    clock.now += 601
    with pytest.raises(KeysUnavailable):
        await keys.key(signing.kid)
    idp.fail = False
    await keys.refresh()
    assert (await keys.key(signing.kid)).kid == signing.kid  # recovered


async def test_a_new_kid_during_an_outage_is_unavailable_not_unknown() -> None:
    """A rotation during a JWKS outage: the new kid may belong to a good token, so the
    answer is 503 jwks_unavailable (retry), not 401 key_unknown."""
    signing = key()
    idp = IdP([signing])
    clock = Clock()
    keys = IssuerKeys(issuer(jwks_uri=f"{ISSUER}/v1/keys"), idp.client(), clock=clock)
    await keys.refresh()
    idp.fail = True
    clock.now += 31
    with pytest.raises(KeysUnavailable):
        await keys.key("rotated-during-outage")  # the refetch fails
    with pytest.raises(KeysUnavailable):
        await keys.key("rotated-during-outage")  # no refetch yet (rate-limited): still 503
    assert (await keys.key(signing.kid)).kid == signing.kid  # known keys keep serving
    idp.fail = False
    clock.now += 31
    with pytest.raises(KeyUnknown):
        await keys.key("rotated-during-outage")  # fetches work again: truly unknown


async def test_background_refresh_backs_off_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    idp = IdP([key()])
    idp.fail = True
    keys = IssuerKeys(issuer(jwks_uri=f"{ISSUER}/v1/keys"), idp.client(), clock=Clock())
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)
        if len(delays) >= 7:
            raise asyncio.CancelledError
        await real_sleep(0)

    monkeypatch.setattr("gateway.jwks.asyncio.sleep", fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        await keys.run()
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_only_usable_signature_keys_are_kept() -> None:
    rsa, ec, ed = key("RS256"), key("ES256"), key("EdDSA")
    document = {
        "keys": [
            rsa.jwk,
            ec.jwk,
            ed.jwk,  # EdDSA is not among this issuer's algorithms
            {**rsa.jwk, "kid": "enc", "use": "enc"},
            {**rsa.jwk, "kid": "pinned-other", "alg": "RS512"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not a key",
        ]
    }
    keys = parse_jwks(document, ("RS256", "ES256"))
    assert set(keys) == {rsa.kid, ec.kid}
    with pytest.raises(ValueError):
        parse_jwks({"keys": "nope"}, ("RS256",))
