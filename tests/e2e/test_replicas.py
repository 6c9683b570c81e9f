"""Two authorization-server replicas on one PostgreSQL store: real ``tokengate run``
processes on loopback ports, behind one public URL as behind a load balancer (each
spoken to on its own port). Whatever one replica issues, records or revokes, the
other knows at once; a key rotation reaches both; a sign-in started on one finishes
on the other; a race for one refresh token has one winner and is treated as reuse;
a client assertion's ``jti`` is spent across replicas; two replicas starting together
on an empty store migrate it once and share one key; and a wrong key encryption key
stops a replica at start, creating nothing."""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import jwt
import psycopg
import pytest
import yaml
from authlib.integrations.httpx_client import OAuth2Client
from authlib.jose import JsonWebKey, JsonWebToken
from authlib.oidc.core import CodeIDToken

from authserver import migrations
from authserver.passwords import hash_password
from tests.asgi.test_signin_flow import Form
from tests.conftest import ADMIN_SECRET, REPORTING_SECRET, ec_client_key
from tests.e2e.conftest import Tokengate, e2e_config, free_port

PORTAL_SECRET = "portal-secret-0123456789abcdefghijklmnop"
CALLBACK = "https://portal.example.com/callback"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TIMEOUT = 30  # seconds a request may take on a loaded machine (httpx's default is 5)
get = functools.partial(httpx.get, timeout=TIMEOUT)
post = functools.partial(httpx.post, timeout=TIMEOUT)


@functools.cache
def alice_hash() -> str:
    return hash_password("alice-password")


def new_kek() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@dataclass
class Replica:
    process: Tokengate
    base: str  # where this replica listens

    @property
    def issuer(self) -> str:  # this replica's endpoints (the tokens' iss is the shared one)
        return f"{self.base}/oauth2/default"

    def spawn(self) -> None:
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        p = self.process
        p.proc = subprocess.Popen(
            [sys.executable, "-m", "tokengate", "run", "-c", str(p.config_path), *p.args],
            cwd=p.workdir,
            stdout=p.stdout_path.open("wb"),
            stderr=p.stderr_path.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self, timeout: float = 30) -> None:
        p = self.process
        assert p.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.proc.poll() is not None:
                raise RuntimeError(f"tokengate exited {p.proc.returncode}: {p.stderr()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.issuer}/v1/keys", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"tokengate did not become ready: {p.stderr()}")

    def token(self, client: tuple[str, str] = ("reporting", REPORTING_SECRET)) -> str:
        response = post(
            f"{self.issuer}/v1/token", data={"grant_type": "client_credentials"}, auth=client
        )
        assert response.status_code == 200, response.text
        return response.json()["access_token"]  # type: ignore[no-any-return]

    def introspect(self, token: str) -> dict[str, Any]:
        response = post(
            f"{self.issuer}/v1/introspect", data={"token": token}, auth=("admin", ADMIN_SECRET)
        )
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def kids(self) -> set[str]:
        response = get(f"{self.issuer}/v1/keys")
        assert response.status_code == 200
        return {k["kid"] for k in response.json()["keys"]}

    def jwks(self) -> list[dict[str, str]]:
        keys = get(f"{self.issuer}/v1/keys").json()["keys"]
        return sorted(keys, key=lambda k: k["kid"])


@dataclass
class Pair:
    a: Replica
    b: Replica
    public_url: str  # both replicas' public_url: the tokens' issuer is under it
    billing_key: Any

    @property
    def issuer(self) -> str:
        return f"{self.public_url}/oauth2/default"


def replica_config(
    data_dir: Path, port: int, public_url: str, store: str, kek: str, billing_jwk: dict[str, str]
) -> dict[str, Any]:
    config = e2e_config(
        data_dir,
        port,
        public_url=public_url,
        store=store,
        key_encryption_key=kek,
        jwks_max_age="1s",  # a rotated key signs about 3 s after `keys rotate`
        users=[
            {
                "username": "alice",
                "password_hash": alice_hash(),
                "profile": {"name": "Alice Doe", "email": "alice@example.com"},
            }
        ],
    )
    config["authserver"]["clients"] += [
        {
            "client_id": "portal",
            "secret": PORTAL_SECRET,
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [CALLBACK],
            "scopes": ["openid", "profile", "email", "orders:read"],
        },
        {
            "client_id": "billing",
            "auth_method": "private_key_jwt",
            "jwks": {"keys": [billing_jwk]},
            "scopes": ["orders:write"],
        },
    ]
    return config


@pytest.fixture
def replicas(tmp_path: Path, pg_url: str) -> Iterator[Callable[..., Pair]]:
    """Makes two replicas (A and B) on ``pg_url``; ``start``: wait for both, started
    at the same moment. Every process is killed afterwards."""
    made: list[Replica] = []

    def make(*, start: bool = True) -> Pair:
        kek = new_kek()
        billing_key, billing_jwk = ec_client_key()
        ports = free_port(), free_port()
        public_url = f"http://127.0.0.1:{ports[0]}"
        pair = []
        for name, port in zip("ab", ports, strict=True):
            workdir = tmp_path / name
            workdir.mkdir()
            config = replica_config(workdir / "data", port, public_url, pg_url, kek, billing_jwk)
            replica = Replica(
                Tokengate(workdir, config, "--only", "authserver"), f"http://127.0.0.1:{port}"
            )
            made.append(replica)
            pair.append(replica)
        a, b = pair
        if start:
            a.spawn()
            b.spawn()
            a.wait_ready()
            b.wait_ready()
        return Pair(a, b, public_url, billing_key)

    yield make
    for replica in made:
        proc = replica.process.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def sql(pg_url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        return conn.execute(query).fetchall()  # type: ignore[arg-type]


def test_a_token_revoked_at_one_replica_is_inactive_at_the_other_at_once(
    replicas: Callable[..., Pair],
) -> None:
    pair = replicas()
    token = pair.a.token()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert pair.b.introspect(token) == {
        "active": True,
        "iss": pair.issuer,
        "sub": "reporting",
        "aud": "api://default",
        "exp": claims["exp"],
        "iat": claims["iat"],
        "jti": claims["jti"],
        "client_id": "reporting",
        "scope": "orders:read",
        "token_type": "Bearer",
    }
    revoked = post(
        f"{pair.a.issuer}/v1/revoke", data={"token": token}, auth=("reporting", REPORTING_SECRET)
    )
    assert (revoked.status_code, revoked.content) == (200, b"")
    assert pair.b.introspect(token) == {"active": False}
    assert pair.a.introspect(token) == {"active": False}
    assert (pair.a.process.stop(), pair.b.process.stop()) == (0, 0)


def test_a_rotation_from_the_cli_reaches_both_replicas(replicas: Callable[..., Pair]) -> None:
    pair = replicas()
    old_kid = jwt.get_unverified_header(pair.a.token())["kid"]
    assert jwt.get_unverified_header(pair.b.token())["kid"] == old_kid

    rotated = pair.a.process.cli("keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.split("next key ")[1].split()[0]
    assert new_kid != old_kid

    deadline = time.monotonic() + 10
    kids = {"a": old_kid, "b": old_kid}
    while time.monotonic() < deadline and set(kids.values()) != {new_kid}:
        for name, replica in (("a", pair.a), ("b", pair.b)):
            kids[name] = jwt.get_unverified_header(replica.token())["kid"]
        time.sleep(0.1)
    assert kids == {"a": new_kid, "b": new_kid}

    listing = pair.b.process.cli("keys", "list")
    assert listing.returncode == 0, listing.stderr
    states = {line.split()[1]: line.split()[3] for line in listing.stdout.splitlines()[1:]}
    assert states == {old_kid: "retired", new_kid: "active"}
    assert pair.a.jwks() == pair.b.jwks()
    assert pair.a.kids() == {old_kid, new_kid}


def test_a_sign_in_started_on_one_replica_finishes_on_the_other(
    replicas: Callable[..., Pair],
) -> None:
    pair = replicas()
    verifier = secrets.token_urlsafe(48)
    nonce = secrets.token_urlsafe(16)
    with OAuth2Client(
        "portal",
        PORTAL_SECRET,
        timeout=TIMEOUT,
        scope="openid profile email orders:read",
        redirect_uri=CALLBACK,
        code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_basic",
    ) as app:
        url, state = app.create_authorization_url(
            f"{pair.a.issuer}/v1/authorize", code_verifier=verifier, nonce=nonce
        )
        with httpx.Client(follow_redirects=False, timeout=TIMEOUT) as browser:
            to_page = browser.get(url)  # on A
            assert to_page.status_code == 303
            page = browser.get(urljoin(pair.a.base, to_page.headers["location"]))  # on A
            assert page.status_code == 200
            form = Form(page.text)
            assert form.action is not None
            signed_in = browser.post(  # on B, with A's cookies
                urljoin(pair.b.base, urlsplit(form.action).path),
                data={**form.fields, "username": "alice", "password": "alice-password"},
            )
            assert signed_in.status_code == 303, signed_in.text
            callback = signed_in.headers["location"]
        assert callback.startswith(CALLBACK + "?")
        returned = parse_qs(urlsplit(callback).query)
        assert returned["state"] == [state] and returned["iss"] == [pair.issuer]
        token = app.fetch_token(  # on B
            f"{pair.b.issuer}/v1/token", authorization_response=callback, code_verifier=verifier
        )
    assert token["token_type"] == "Bearer"
    assert {"access_token", "id_token", "refresh_token"} <= token.keys()

    checked = JsonWebToken(["RS256"]).decode(
        token["id_token"],
        JsonWebKey.import_key_set({"keys": pair.b.jwks()}),
        claims_cls=CodeIDToken,
        claims_options={"iss": {"values": [pair.issuer]}},
        claims_params={
            "nonce": nonce,
            "client_id": "portal",
            "access_token": token["access_token"],
        },
    )
    checked.validate()
    assert checked["name"] == "Alice Doe"
    assert pair.a.introspect(token["access_token"])["active"] is True


def signed_in_refresh_token(pair: Pair) -> str:
    """A refresh token of alice's, from a sign-in on A."""
    verifier = secrets.token_urlsafe(48)
    with OAuth2Client(
        "portal",
        PORTAL_SECRET,
        timeout=TIMEOUT,
        scope="openid orders:read",
        redirect_uri=CALLBACK,
        code_challenge_method="S256",
    ) as app:
        url, _ = app.create_authorization_url(
            f"{pair.a.issuer}/v1/authorize", code_verifier=verifier, nonce="n"
        )
        with httpx.Client(follow_redirects=False, timeout=TIMEOUT) as browser:
            to_page = browser.get(url)
            page = browser.get(urljoin(pair.a.base, to_page.headers["location"]))
            form = Form(page.text)
            assert form.action is not None
            signed_in = browser.post(
                urljoin(pair.a.base, form.action),
                data={**form.fields, "username": "alice", "password": "alice-password"},
            )
            assert signed_in.status_code == 303, signed_in.text
        token = app.fetch_token(
            f"{pair.a.issuer}/v1/token",
            authorization_response=signed_in.headers["location"],
            code_verifier=verifier,
        )
    return token["refresh_token"]  # type: ignore[no-any-return]


def refresh(replica: Replica, refresh_token: str) -> httpx.Response:
    return post(
        f"{replica.issuer}/v1/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=("portal", PORTAL_SECRET),
    )


def test_one_refresh_token_at_both_replicas_at_once_has_one_winner(
    replicas: Callable[..., Pair],
) -> None:
    pair = replicas()
    refresh_token = signed_in_refresh_token(pair)
    barrier = threading.Barrier(2)
    answers: dict[str, httpx.Response] = {}

    def present(name: str, replica: Replica) -> None:
        with httpx.Client(
            timeout=TIMEOUT
        ) as client:  # connected before the barrier: only the POST races
            client.get(f"{replica.issuer}/v1/keys")
            barrier.wait(timeout=TIMEOUT)
            answers[name] = client.post(
                f"{replica.issuer}/v1/token",
                data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                auth=("portal", PORTAL_SECRET),
            )

    threads = [
        threading.Thread(target=present, args=("a", pair.a)),
        threading.Thread(target=present, args=("b", pair.b)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * TIMEOUT)
    assert sorted(r.status_code for r in answers.values()) == [200, 400]
    winner = next(r for r in answers.values() if r.status_code == 200)
    loser = next(r for r in answers.values() if r.status_code == 400)
    assert loser.json() == {
        "error": "invalid_grant",
        "error_description": "the refresh token was used already",
    }
    new_refresh = winner.json()["refresh_token"]
    assert new_refresh != refresh_token
    # the loser presented a retired token: reuse, so the whole family is revoked
    for replica in (pair.a, pair.b):
        dead = refresh(replica, new_refresh)
        assert dead.status_code == 400
        assert dead.json()["error"] == "invalid_grant"
    assert pair.b.introspect(winner.json()["access_token"]) == {"active": False}


def assertion(pair: Pair, jti: str) -> str:
    now = int(time.time())
    return jwt.encode(
        {
            "iss": "billing",
            "sub": "billing",
            "aud": f"{pair.issuer}/v1/token",
            "jti": jti,
            "iat": now,
            "exp": now + 60,
        },
        pair.billing_key,
        algorithm="ES256",
        headers={"kid": "billing-1"},
    )


def test_a_client_assertion_replayed_at_the_other_replica_is_refused(
    replicas: Callable[..., Pair],
) -> None:
    pair = replicas()
    signed = assertion(pair, str(uuid.uuid4()))
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": signed,
    }
    first = post(f"{pair.a.issuer}/v1/token", data=form)
    assert first.status_code == 200, first.text
    assert (
        jwt.decode(first.json()["access_token"], options={"verify_signature": False})["client_id"]
        == "billing"
    )
    replayed = post(f"{pair.b.issuer}/v1/token", data=form)
    assert replayed.status_code == 401
    assert replayed.json() == {
        "error": "invalid_client",
        "error_description": "client authentication failed",
    }
    # a fresh jti is fine at B: it is the replay that was refused
    fresh = post(
        f"{pair.b.issuer}/v1/token",
        data={**form, "client_assertion": assertion(pair, str(uuid.uuid4()))},
    )
    assert fresh.status_code == 200, fresh.text


def test_two_replicas_starting_together_migrate_once_and_share_one_key(
    replicas: Callable[..., Pair], pg_url: str
) -> None:
    pair = replicas()  # both spawned at once, then waited for
    versions = [(m.version,) for m in migrations.POSTGRES]
    assert sql(pg_url, "SELECT version FROM schema_migrations ORDER BY version") == versions
    assert sql(pg_url, "SELECT count(*) FROM signing_keys") == [(1,)]
    assert sql(pg_url, "SELECT username FROM users") == [("alice",)]  # config users: once
    created = [
        e for r in (pair.a, pair.b) for e in r.process.log_events() if e["event"] == "keys.created"
    ]
    assert len(created) == 1
    migrated = pair.a.process.cli("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    newest = migrations.POSTGRES[-1].version
    assert migrated.stdout.endswith(f": at schema version {newest}, nothing to apply\n")
    kids = pair.a.kids()
    assert len(kids) == 1
    assert pair.b.kids() == kids
    assert pair.a.jwks() == pair.b.jwks()
    for replica in (pair.a, pair.b):
        assert jwt.get_unverified_header(replica.token())["kid"] in kids


def test_a_wrong_key_encryption_key_stops_a_replica_at_start(
    replicas: Callable[..., Pair], pg_url: str
) -> None:
    pair = replicas(start=False)
    pair.a.spawn()
    pair.a.wait_ready()
    keys_before = sql(pg_url, "SELECT server, kid FROM signing_keys ORDER BY kid")
    assert len(keys_before) == 1

    config = pair.b.process.config_path
    config.write_text(config.read_text().replace(_kek_of(config), new_kek()))
    started = pair.b.process.cli("run", "--only", "authserver")
    assert started.returncode == 3  # what the config names cannot be used
    assert "does not open with authserver.key_encryption_key" in started.stderr
    assert "keys.created" not in started.stderr
    assert "Traceback" not in started.stderr
    assert sql(pg_url, "SELECT server, kid FROM signing_keys ORDER BY kid") == keys_before
    # nor does `keys rotate` with that config seal a key the replicas could not open
    rotated = pair.b.process.cli("keys", "rotate")
    assert rotated.returncode == 3
    assert "does not open with authserver.key_encryption_key" in rotated.stderr
    assert rotated.stderr.endswith("; nothing was created\n")
    assert sql(pg_url, "SELECT server, kid FROM signing_keys ORDER BY kid") == keys_before
    # A is unaffected
    assert jwt.get_unverified_header(pair.a.token())["kid"] == keys_before[0][1]


def _kek_of(config: Path) -> str:
    kek: str = yaml.safe_load(config.read_text())["authserver"]["key_encryption_key"]
    return kek
