"""A real ``tokengate run`` process: Authlib over TCP, JWKS over HTTP, live rotation."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
from authlib.integrations.httpx_client import OAuth2Client

from tests.conftest import ADMIN_SECRET, REPORTING_SECRET
from tests.e2e.conftest import e2e_config, free_port


def discover(issuer: str) -> dict[str, Any]:
    response = httpx.get(f"{issuer}/.well-known/openid-configuration")
    assert response.status_code == 200
    metadata: dict[str, Any] = response.json()
    assert metadata["issuer"] == issuer
    # RFC 8414 section 3.1: the path-inserted form serves the same server
    base, _, path = issuer.partition("/oauth2/")
    inserted = httpx.get(f"{base}/.well-known/oauth-authorization-server/oauth2/{path}")
    assert inserted.json()["issuer"] == issuer
    return metadata


def fetch_token(metadata: dict[str, Any], client_id: str, secret: str) -> dict[str, Any]:
    with OAuth2Client(client_id, secret, token_endpoint_auth_method="client_secret_basic") as c:
        return c.fetch_token(metadata["token_endpoint"], grant_type="client_credentials")  # type: ignore[no-any-return]


def verify(token: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """PyJWT's own JWKS client, over HTTP, as any resource server would do it."""
    keys = jwt.PyJWKClient(metadata["jwks_uri"], cache_jwk_set=False)
    key = keys.get_signing_key_from_jwt(token)
    return jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience="api://default",
        issuer=metadata["issuer"],
    )


def test_token_lifecycle_over_real_sockets(tokengate: Any, tmp_path: Path) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/oauth2/default"
    audit = tmp_path / "audit.log"
    config = e2e_config(tmp_path / "data", port)
    config["audit"] = {"path": str(audit)}
    process = tokengate(config)
    process.start(f"{issuer}/v1/keys")

    metadata = discover(issuer)
    token = fetch_token(metadata, "reporting", REPORTING_SECRET)
    claims = verify(token["access_token"], metadata)
    assert (claims["sub"], claims["scope"]) == ("reporting", "orders:read")

    introspected = httpx.post(
        metadata["introspection_endpoint"],
        data={"token": token["access_token"]},
        auth=("admin", ADMIN_SECRET),
    ).json()
    assert introspected["active"] is True and introspected["jti"] == claims["jti"]
    revoked = httpx.post(
        metadata["revocation_endpoint"],
        data={"token": token["access_token"]},
        auth=("reporting", REPORTING_SECRET),
    )
    assert revoked.status_code == 200
    after = httpx.post(
        metadata["introspection_endpoint"],
        data={"token": token["access_token"]},
        auth=("admin", ADMIN_SECRET),
    ).json()
    assert after == {"active": False}

    assert process.stop(signal.SIGTERM) == 0
    events = [(x["event"], x["outcome"]) for x in _lines(audit)]
    assert events == [
        ("token.issued", "issued"),
        ("token.introspected", "active"),
        ("token.revoked", "revoked"),
        ("token.introspected", "inactive"),
    ]
    text = audit.read_text() + process.stderr()
    assert token["access_token"] not in text
    assert REPORTING_SECRET not in text and ADMIN_SECRET not in text


def test_keys_rotate_on_a_running_server(tokengate: Any, tmp_path: Path) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/oauth2/default"
    # a 1s JWKS lifetime makes the next key sign 3s after `keys rotate`
    process = tokengate(e2e_config(tmp_path / "data", port, jwks_max_age="1s"), "--workers", "2")
    process.start(f"{issuer}/v1/keys")
    metadata = discover(issuer)
    before = fetch_token(metadata, "admin", ADMIN_SECRET)["access_token"]
    old_kid = jwt.get_unverified_header(before)["kid"]

    rotated = process.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.split("next key ")[1].split()[0]
    again = process.cli("keys", "rotate")
    assert again.returncode == 1 and "already has a next key" in again.stderr

    # every worker publishes the next key within the reload interval, before it signs
    deadline = time.monotonic() + 10
    seen: set[str] = set()
    while time.monotonic() < deadline and new_kid not in seen:
        seen = {k["kid"] for k in httpx.get(metadata["jwks_uri"]).json()["keys"]}
        time.sleep(0.2)
    assert seen == {old_kid, new_kid}
    failures = 0
    kids = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and new_kid not in kids:
        response = httpx.post(
            metadata["token_endpoint"],
            data={"grant_type": "client_credentials"},
            auth=("admin", ADMIN_SECRET),
        )
        failures += response.status_code != 200
        kids.add(jwt.get_unverified_header(response.json()["access_token"])["kid"])
        time.sleep(0.05)
    assert failures == 0
    after = fetch_token(metadata, "admin", ADMIN_SECRET)["access_token"]
    assert jwt.get_unverified_header(after)["kid"] == new_kid
    # a few more tokens must all come from the new key, whichever worker answers
    for _ in range(10):
        again_token = fetch_token(metadata, "admin", ADMIN_SECRET)["access_token"]
        assert jwt.get_unverified_header(again_token)["kid"] == new_kid
    verify(before, metadata)
    verify(after, metadata)

    listing = process.cli("keys", "list")
    assert listing.returncode == 0
    states = {line.split()[1]: line.split()[3] for line in listing.stdout.splitlines()[1:]}
    assert states == {old_kid: "retired", new_kid: "active"}
    assert process.stop() == 0


def test_a_port_in_use_is_a_startup_failure(tokengate: Any, tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = tokengate(e2e_config(tmp_path / "data", port)).cli("run")
    assert result.returncode == 3
    assert "cannot listen" in result.stderr


def test_an_unwritable_data_dir_is_a_startup_failure(tokengate: Any, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = tokengate(e2e_config(blocker / "data", free_port())).cli("run")
    assert result.returncode == 3
    assert "startup_failed" in result.stderr
    assert "Traceback" not in result.stderr


def _lines(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(x) for x in path.read_text().splitlines()]
