"""JWKS publication and key rotation, with a clock that moves only when told."""

from __future__ import annotations

from typing import Any

import httpx
import jwt
import pytest

from authserver.keys import RELOAD_INTERVAL, KeyFiles, KeyManager
from authserver.sqlite_store import SqliteStore
from tests.conftest import ADMIN_SECRET, ISSUER, AuthServer, FakeClock

pytestmark = pytest.mark.anyio


async def token(http: httpx.AsyncClient) -> str:
    response = await http.post(
        f"{ISSUER}/v1/token",
        data={"grant_type": "client_credentials"},
        auth=("admin", ADMIN_SECRET),
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]  # type: ignore[no-any-return]


async def jwks(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get(f"{ISSUER}/v1/keys")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "public, max-age=60"
    assert response.headers["content-type"] == "application/jwk-set+json"
    return response.json()  # type: ignore[no-any-return]


def verify(token_: str, document: dict[str, Any]) -> dict[str, Any]:
    kid = jwt.get_unverified_header(token_)["kid"]
    jwk = next(k for k in document["keys"] if k["kid"] == kid)
    return jwt.decode(
        token_,
        jwt.PyJWK(jwk).key,
        algorithms=[jwk["alg"]],
        audience="api://default",
        options={"verify_exp": False, "verify_iat": False},  # the clock is fake
    )


def kid(token_: str) -> str:
    return jwt.get_unverified_header(token_)["kid"]  # type: ignore[no-any-return]


async def test_jwks_holds_only_public_parts(authserver: AuthServer) -> None:
    async with authserver.client() as http:
        document = await jwks(http)
        head = await http.head(f"{ISSUER}/v1/keys")
    (key,) = document["keys"]
    assert set(key) == {"kty", "n", "e", "use", "alg", "kid"}
    assert (key["kty"], key["use"], key["alg"]) == ("RSA", "sig", "RS256")
    assert head.status_code == 200 and head.content == b""


async def test_rotation_publishes_next_key_before_it_signs(make_authserver: Any) -> None:
    clock = FakeClock()
    server: AuthServer = make_authserver(clock=clock)
    services = server.services
    config = services.config
    # `tokengate keys rotate` is another process with its own store connection.
    cli_store = SqliteStore(config.data_dir)
    cli = KeyManager(
        cli_store,
        KeyFiles(config.data_dir),
        jwks_max_age=config.jwks_max_age,
        leeway=config.leeway,
        clock=clock,
    )
    async with server.client() as http:
        before = await token(http)
        old_kid = kid(before)
        record = cli.rotate(config.servers[0])
        assert record.activate_at == int(clock.now) + config.jwks_max_age + RELOAD_INTERVAL

        # the JWKS re-reads key records older than a second (the maintain loop's
        # next pass may be two seconds away, or late on a busy machine)
        clock.advance(1)
        published = await jwks(http)
        assert {k["kid"] for k in published["keys"]} == {old_kid, record.kid}
        assert kid(await token(http)) == old_kid  # published, not yet signing

        clock.advance(config.jwks_max_age + RELOAD_INTERVAL - 1)  # to activate_at
        after = await token(http)
        assert kid(after) == record.kid
        published = await jwks(http)
        verify(before, published)
        verify(after, published)

        # the retired key stays until the tokens it signed have expired
        ttl = config.servers[0].access_token_ttl
        clock.advance(ttl + config.leeway - 1)
        assert old_kid in {k["kid"] for k in (await jwks(http))["keys"]}
        clock.advance(2)
        assert {k["kid"] for k in (await jwks(http))["keys"]} == {record.kid}
    states = {s.record.kid: s.state for s in cli.schedule(config.servers[0])}
    assert states == {old_kid: "expired", record.kid: "active"}
    assert [r.kid for r in cli.prune(config.servers[0])] == [old_kid]
    assert not KeyFiles(config.data_dir).path("default", old_kid).exists()
    cli_store.close()


async def test_keys_survive_a_restart(make_authserver: Any) -> None:
    first: AuthServer = make_authserver()
    async with first.client() as http:
        issued = await token(http)
    second: AuthServer = make_authserver()
    async with second.client() as http:
        document = await jwks(http)
        assert kid(await token(http)) == kid(issued)
    verify(issued, document)


async def test_changing_signing_alg_switches_keys_and_keeps_old_published(
    make_authserver: Any,
) -> None:
    first: AuthServer = make_authserver()
    async with first.client() as http:
        issued = await token(http)

    def es256(data: dict[str, Any]) -> None:
        data["authserver"]["servers"][0]["signing_alg"] = "ES256"

    second: AuthServer = make_authserver(es256)
    async with second.client() as http:
        new = await token(http)
        document = await jwks(http)
    assert jwt.get_unverified_header(new)["alg"] == "ES256"
    verify(issued, document)
    verify(new, document)


async def test_a_scheduled_rotation_publishes_the_next_key_then_signs_with_it(
    make_authserver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``rotation.every``: the maintenance pass publishes the next key one rotation
    lead before the active key has signed for ``every``, and it signs from then on."""
    clock = FakeClock()

    def every_five_minutes(data: dict[str, Any]) -> None:
        data["authserver"]["rotation"] = {"every": "5m"}

    server = make_authserver(every_five_minutes, clock=clock)
    services = server.services
    lead = services.keyring.manager.rotation_lead
    async with server.client() as http:
        first = kid(await token(http))
        clock.advance(300 - lead - 1)
        services._maintain(int(clock.now), False)  # not due yet
        assert [k["kid"] for k in (await jwks(http))["keys"]] == [first]
        clock.advance(1)
        services._maintain(int(clock.now), False)
        second = [k["kid"] for k in (await jwks(http))["keys"] if k["kid"] != first]
        assert len(second) == 1 and kid(await token(http)) == first  # published, not signing
        services._maintain(int(clock.now), False)  # a second pass: nothing more
        assert len((await jwks(http))["keys"]) == 2
        clock.advance(lead)
        assert kid(await token(http)) == second[0]
    lines = capsys.readouterr().err.replace(" ", "").splitlines()
    rotated = [line for line in lines if '"event":"keys.rotated"' in line]
    assert sorted(line.split('"server":"')[1].split('"')[0] for line in rotated) == [
        "default",
        "partners",
    ]  # once each server, however many passes
    assert all('"scheduled":true' in line for line in rotated)
