"""Passkeys on the hosted pages: created after a password sign-in, used as a second
factor and, where the app's sign-on policy is ``passwordless``, instead of the
password; step-up to a passkey; and what a misbehaving browser or authenticator sends
(another origin, another RP, no user verification, a counter going back, another
key's signature, a challenge answered twice, garbage), refused with the right page.

The browser and authenticator are :mod:`tests.softauthn`, built from the WebAuthn
spec, not from tokengate's code."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.asgi.test_mfa import rfc6238
from tests.asgi.test_signin_flow import (
    ALICE_PASSWORD,
    CALLBACK,
    PORTAL_SECRET,
    SPA_CALLBACK,
    Form,
    _remember_secrets,  # noqa: F401  (autouse: records what the log-leak search looks for)
    authorize_params,
    remember,
    sign_in_config,
)
from tests.asgi.test_user_tokens import claims_of
from tests.conftest import AuthServer
from tests.softauthn import Authenticator, b64url

pytestmark = pytest.mark.anyio

LOCAL = "http://localhost:8443"  # a secure context with a host name: passkeys allowed
ISSUER = f"{LOCAL}/oauth2/default"
AUTHORIZE = f"{ISSUER}/v1/authorize"
TOKEN = f"{ISSUER}/v1/token"
KIOSK_SECRET = "kiosk-secret-0123456789abcdefghijklmnopq"
KIOSK_CALLBACK = "https://kiosk.example.com/callback"
MFA = "urn:tokengate:loa:2fa"


def config(data: dict[str, Any]) -> None:
    sign_in_config(data)
    auth = data["authserver"]
    auth["public_url"] = LOCAL
    portal = auth["clients"][-2]
    portal["sign_on"] = {"policy": "password+mfa"}
    auth["clients"].append(
        {
            "client_id": "kiosk",
            "secret": KIOSK_SECRET,
            "grant_types": ["authorization_code", "password"],
            "redirect_uris": [KIOSK_CALLBACK],
            "scopes": ["openid", "profile"],
            "sign_on": {"policy": "passwordless"},
        }
    )
    auth["users"].append({"username": "bob", "password_hash": auth["users"][0]["password_hash"]})


@pytest.fixture
def server(make_authserver: Any) -> AuthServer:
    return make_authserver(config)  # type: ignore[no-any-return]


def browser(server: AuthServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=server.transport(), base_url=LOCAL)


class PasskeyForm(HTMLParser):
    """The page's passkey form (``data-passkey``): its action, options and fields."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.action: str | None = None
        self.kind: str | None = None
        self.options: dict[str, Any] = {}
        self.fields: dict[str, str] = {}
        self._inside = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form" and "data-passkey" in a:
            self._inside = True
            self.kind, self.action = a["data-passkey"], a.get("action")
            self.options = json.loads(a.get("data-options") or "{}")
        elif tag == "input" and self._inside and a.get("name"):
            self.fields[a["name"] or ""] = a.get("value") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._inside = False


def kiosk_params(**changes: str | None) -> dict[str, str]:
    return authorize_params(
        **{"client_id": "kiosk", "redirect_uri": KIOSK_CALLBACK, "scope": "openid", **changes}
    )


async def login_page(http: httpx.AsyncClient, **params: str) -> httpx.Response:
    response = await http.get(AUTHORIZE, params=params)
    assert response.headers["location"] == "/signin/login", response.text
    page = await http.get("/signin/login")
    assert page.status_code == 200
    return page


async def password(
    http: httpx.AsyncClient, page: httpx.Response, username: str = "alice"
) -> httpx.Response:
    form = Form(page.text)  # the last form on the page: the password's
    return await http.post(
        "/signin/login",
        data={
            "csrf_token": form.fields["csrf_token"],
            "username": username,
            "password": ALICE_PASSWORD,
        },
    )


async def post_credential(
    http: httpx.AsyncClient, form: PasskeyForm, credential: dict[str, Any] | str
) -> httpx.Response:
    assert form.action is not None
    text = credential if isinstance(credential, str) else json.dumps(credential)
    return await http.post(form.action, data={**form.fields, "credential": text})


def back(response: httpx.Response, callback: str = KIOSK_CALLBACK) -> dict[str, str]:
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith(callback + "?"), location
    params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    remember(params["code"])
    return params


async def tokens(http: httpx.AsyncClient, code: str, client: str = "kiosk") -> dict[str, Any]:
    secret, callback = (
        (KIOSK_SECRET, KIOSK_CALLBACK) if client == "kiosk" else (PORTAL_SECRET, CALLBACK)
    )
    response = await http.post(
        TOKEN,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": callback,
            "code_verifier": "v" * 43,
        },
        auth=(client, secret),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return {"access": claims_of(body["access_token"]), "id": claims_of(body["id_token"])}


def recovery_codes(page: httpx.Response) -> list[str]:
    codes = re.findall(r"<li><code>([a-z0-9-]{19})</code></li>", page.text)
    assert len(codes) == 10
    for code in codes:
        remember(code)
    return codes


async def create_passkey(
    http: httpx.AsyncClient, device: Authenticator, **knobs: Any
) -> httpx.Response:
    """On the passkey page: the browser creates one and the form posts it."""
    page = await http.get("/signin/passkey/enroll")
    assert page.status_code == 200, page.text
    form = PasskeyForm(page.text)
    assert form.kind == "create"
    return await post_credential(http, form, device.create(form.options, **knobs))


async def passwordless_alice(server: AuthServer, device: Authenticator) -> None:
    """alice creates her passkey in a kiosk sign-in: password, passkey, codes, back."""
    async with browser(server) as http:
        answer = await password(http, await login_page(http, **kiosk_params()))
        assert answer.headers["location"] == "/signin/passkey/enroll"
        shown = await create_passkey(http, device)
        assert shown.status_code == 200, shown.text
        recovery_codes(shown)
        back(await http.post("/signin/mfa/continue", data=Form(shown.text).fields))


# --------------------------------------------------------------------------- passwordless


async def test_passwordless_creates_a_passkey_after_the_password_then_signs_in_with_it_alone(
    server: AuthServer,
) -> None:
    device = Authenticator(LOCAL)
    async with browser(server) as http:
        page = await login_page(http, **kiosk_params())
        form = PasskeyForm(page.text)
        assert form.kind == "get" and form.action == "/signin/passkey/verify"
        assert form.options["userVerification"] == "required"
        assert form.options["rpId"] == "localhost" and not form.options.get("allowCredentials")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/signin/static/passkey.js"></script>' in page.text
        answer = await password(http, page)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/signin/passkey/enroll"
        enroll = await http.get("/signin/passkey/enroll")
        options = PasskeyForm(enroll.text).options
        assert options["rp"] == {"id": "localhost", "name": "Acme <Corp>"}
        assert options["authenticatorSelection"]["residentKey"] == "required"
        assert options["authenticatorSelection"]["userVerification"] == "required"
        assert options["attestation"] == "none"
        assert "Use an authenticator app instead" not in enroll.text  # it needs a passkey
        shown = await post_credential(http, PasskeyForm(enroll.text), device.create(options))
        assert shown.status_code == 200, shown.text
        assert "your passkey is ready" in shown.text
        recovery_codes(shown)
        first = await tokens(
            http,
            back(await http.post("/signin/mfa/continue", data=Form(shown.text).fields))["code"],
        )
    assert first["id"]["amr"] == ["pwd", "hwk", "mfa"] and first["id"]["acr"] == MFA

    async with browser(server) as http:  # another browser: the passkey alone
        page = await login_page(http, **kiosk_params())
        form = PasskeyForm(page.text)
        answer = await post_credential(http, form, device.get(form.options))
        claims = await tokens(http, back(answer)["code"])
    for token in claims.values():
        assert (token["amr"], token["acr"]) == (["hwk", "mfa"], MFA)
    assert claims["id"]["sub"] == first["id"]["sub"]
    lines = server.audit_lines()
    [enrolled] = [line for line in lines if line["event"] == "mfa.enrolled"]
    assert (enrolled["factor"], enrolled["outcome"], enrolled["username"]) == (
        "passkey",
        "success",
        "alice",
    )
    assert enrolled["passkey"] == b64url(device.passkeys[0].credential_id)
    verified = [line for line in lines if line["event"] == "mfa.verified"]
    assert [(v["factor"], v["step"], v["outcome"]) for v in verified] == [
        ("passkey", "passwordless", "success")
    ]
    signins = [line for line in lines if line["event"] == "user.signin"]
    assert signins[-1]["amr"] == ["hwk", "mfa"] and signins[-1]["username"] == "alice"


async def test_passwordless_needs_the_authenticator_to_verify_its_user(server: AuthServer) -> None:
    device = Authenticator(LOCAL)
    async with browser(server) as http:  # creating it without user verification: refused
        await password(http, await login_page(http, **kiosk_params()))
        refused = await create_passkey(http, Authenticator(LOCAL), verify_user=False)
        assert refused.status_code == 400
        assert "The passkey was not created" in refused.text
    await passwordless_alice(server, device)
    async with browser(server) as http:
        page = await login_page(http, **kiosk_params())
        form = PasskeyForm(page.text)
        answer = await post_credential(http, form, device.get(form.options, verify_user=False))
        assert answer.status_code == 401
        assert "That passkey could not sign you in." in answer.text
    reasons = [line["reason"] for line in server.audit_lines() if line["event"] == "mfa.verified"]
    assert reasons == ["user_not_verified"]


async def test_a_password_alone_never_adds_a_passkey_to_an_account_with_a_factor(
    server: AuthServer,
) -> None:
    """alice has an authenticator app: the passwordless app asks for it before she may
    create a passkey; the pages give no way around it."""
    async with browser(server) as http:  # alice enrolls an app, for the portal
        await password(http, await login_page(http, **authorize_params()))
        page = await http.get("/signin/mfa/enroll")
        assert "Use a passkey instead" in page.text
        secret = re.search(r'<code id="secret">([^<]+)</code>', page.text).group(1)  # type: ignore[union-attr]
        remember(secret.replace(" ", ""))
        shown = await http.post(
            "/signin/mfa/enroll",
            data={**Form(page.text).fields, "code": rfc6238(secret, server.clock())},
        )
        recovery_codes(shown)
    server.clock.advance(60)
    device = Authenticator(LOCAL)
    async with browser(server) as http:
        answer = await password(http, await login_page(http, **kiosk_params()))
        assert answer.headers["location"] == "/signin/mfa"
        sneak = await http.get("/signin/passkey/enroll")  # not before the app's code
        assert sneak.status_code == 303 and sneak.headers["location"] == "/signin/mfa"
        challenge = await http.get("/signin/mfa")
        assert PasskeyForm(challenge.text).kind is None  # she has no passkey to use
        assert "Code from your authenticator app" in challenge.text
        coded = await http.post(
            "/signin/mfa",
            data={**Form(challenge.text).fields, "code": rfc6238(secret, server.clock())},
        )
        assert coded.headers["location"] == "/signin/passkey/enroll"
        # the app's code is not what this app needs: no way on without the passkey
        skipped = await http.post("/signin/mfa/continue", data=Form(challenge.text).fields)
        assert skipped.headers["location"] == "/signin/passkey/enroll"
        enroll = await http.get("/signin/passkey/enroll")
        assert "Use an authenticator app instead" not in enroll.text
        done = await post_credential(
            http, PasskeyForm(enroll.text), device.create(PasskeyForm(enroll.text).options)
        )
        claims = await tokens(http, back(done)["code"])  # no new recovery codes: she has some
    assert claims["id"]["amr"] == ["pwd", "otp", "hwk", "mfa"]


async def test_a_passwordless_app_takes_no_app_code_from_a_user_with_a_passkey(
    server: AuthServer,
) -> None:
    device = Authenticator(LOCAL)
    await passwordless_alice(server, device)
    async with browser(server) as http:
        answer = await password(http, await login_page(http, **kiosk_params()))
        assert answer.headers["location"] == "/signin/mfa"
        page = await http.get("/signin/mfa")
        form = PasskeyForm(page.text)
        assert form.kind == "get" and 'name="code"' not in page.text
        assert [c["id"] for c in form.options["allowCredentials"]] == [
            b64url(device.passkeys[0].credential_id)
        ]
        assert form.options["userVerification"] == "preferred"  # the password was given
        code = await http.post("/signin/mfa", data={**form.fields, "code": "123456"})
        assert code.status_code == 400
        form = PasskeyForm((await http.get("/signin/mfa")).text)  # a new page, a new challenge
        done = await post_credential(http, form, device.get(form.options, verify_user=False))
        claims = await tokens(http, back(done)["code"])
    assert claims["id"]["amr"] == ["pwd", "hwk", "mfa"]


async def test_the_password_grant_is_refused_where_the_policy_is_passwordless(
    server: AuthServer,
) -> None:
    async with browser(server) as http:
        response = await http.post(
            TOKEN,
            data={
                "grant_type": "password",
                "username": "alice",
                "password": ALICE_PASSWORD,
                "scope": "openid",
            },
            auth=("kiosk", KIOSK_SECRET),
        )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_grant"


# --------------------------------------------------------------------------- second factor


async def test_a_passkey_as_the_second_factor_with_recovery_codes(server: AuthServer) -> None:
    device = Authenticator(LOCAL)
    async with browser(server) as http:
        answer = await password(http, await login_page(http, **authorize_params()))
        assert answer.headers["location"] == "/signin/mfa/enroll"
        enroll = await http.get("/signin/passkey/enroll")
        form = PasskeyForm(enroll.text)
        assert form.options["authenticatorSelection"]["userVerification"] == "preferred"
        assert 'href="/signin/mfa/enroll"' in enroll.text  # or an app instead
        shown = await post_credential(http, form, device.create(form.options, synced=True))
        assert "your passkey is ready" in shown.text
        codes = recovery_codes(shown)
        first = await tokens(
            http,
            back(await http.post("/signin/mfa/continue", data=Form(shown.text).fields), CALLBACK)[
                "code"
            ],
            "portal",
        )
    assert first["id"]["amr"] == ["pwd", "swk", "mfa"]  # synced: a software key

    async with browser(server) as http:
        await password(http, await login_page(http, **authorize_params()))
        page = await http.get("/signin/mfa")
        form = PasskeyForm(page.text)
        assert form.kind == "get" and "Recovery code" in page.text  # no app: codes only
        done = await post_credential(http, form, device.get(form.options))
        claims = await tokens(http, back(done, CALLBACK)["code"], "portal")
    assert claims["access"]["amr"] == ["pwd", "swk", "mfa"]

    async with browser(server) as http:  # the passkey lost: a recovery code
        await password(http, await login_page(http, **authorize_params()))
        page = await http.get("/signin/mfa")
        done = await http.post("/signin/mfa", data={**Form(page.text).fields, "code": codes[0]})
        assert (await tokens(http, back(done, CALLBACK)["code"], "portal"))["id"]["amr"] == [
            "pwd",
            "otp",
            "mfa",
        ]


async def test_a_password_session_steps_up_to_a_passkey(server: AuthServer) -> None:
    device = Authenticator(LOCAL)
    await passwordless_alice(server, device)
    async with browser(server) as http:
        spa = authorize_params(client_id="spa", redirect_uri=SPA_CALLBACK, scope="openid")
        signed_in = await password(http, await login_page(http, **spa))
        assert signed_in.headers["location"].startswith(SPA_CALLBACK)
        step_up = await http.get(AUTHORIZE, params=kiosk_params())
        assert step_up.headers["location"] == "/signin/mfa"  # no password asked again
        page = await http.get("/signin/mfa")
        form = PasskeyForm(page.text)
        done = await post_credential(http, form, device.get(form.options, verify_user=False))
        claims = await tokens(http, back(done)["code"])
        assert claims["id"]["amr"] == ["pwd", "hwk", "mfa"]
        again = await http.get(AUTHORIZE, params=kiosk_params())  # SSO from now on
        back(again)
    none = await server.client().get(AUTHORIZE, params=kiosk_params(prompt="none"))
    assert none.status_code == 303


# --------------------------------------------------------------------------- misbehaving


async def test_each_challenge_is_answered_once(server: AuthServer) -> None:
    device = Authenticator(LOCAL)
    await passwordless_alice(server, device)
    async with browser(server) as http:
        page = await login_page(http, **kiosk_params())
        form = PasskeyForm(page.text)
        credential = device.get(form.options)
        back(await post_credential(http, form, credential))
    async with browser(server) as http:  # the same answer, to a new page
        page = await login_page(http, **kiosk_params())
        replayed = await post_credential(http, PasskeyForm(page.text), credential)
        assert replayed.status_code == 401
        # the refusal's page holds a new challenge: the old page's is gone
        again = await post_credential(http, PasskeyForm(page.text), credential)
        assert again.status_code == 401
        fresh = await post_credential(http, PasskeyForm(again.text), credential)
        assert fresh.status_code == 401
    reasons = [line["reason"] for line in server.audit_lines() if line["event"] == "mfa.verified"]
    assert reasons == ["ok", "bad_passkey", "bad_passkey", "bad_passkey"]


@pytest.mark.parametrize(
    "knobs, reason",
    [
        ({"origin": "https://evil.example"}, "bad_passkey"),
        ({"origin": "http://localhost:8444"}, "bad_passkey"),
        ({"rp_id": "evil.example"}, "bad_passkey"),
        ({"challenge": b64url(b"x" * 32)}, "bad_passkey"),
        ({"type_": "webauthn.create"}, "bad_passkey"),
        ({"count": 1}, "replayed"),  # a counter that went back: a cloned authenticator?
        ({"user_handle": b"u-someone-else"}, "bad_passkey"),
        ({"signer": "other"}, "bad_passkey"),
    ],
)
async def test_a_misbehaving_answer_is_refused_and_audited(
    server: AuthServer, knobs: dict[str, Any], reason: str
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    device = Authenticator(LOCAL)
    await passwordless_alice(server, device)
    device.passkeys[0].sign_count = 5
    async with browser(server) as http:  # counter now at 6 in the store
        page = await login_page(http, **kiosk_params())
        form = PasskeyForm(page.text)
        back(await post_credential(http, form, device.get(form.options)))
    if knobs.get("signer") == "other":
        knobs = {"signer": ec.generate_private_key(ec.SECP256R1())}
    async with browser(server) as http:
        page = await login_page(http, **kiosk_params())
        form = PasskeyForm(page.text)
        answer = await post_credential(http, form, device.get(form.options, **knobs))
        assert answer.status_code == 401, answer.text
        assert "That passkey could not sign you in." in answer.text
        assert (
            "set-cookie" not in answer.headers or "tg_session" not in answer.headers["set-cookie"]
        )
    verified = [line for line in server.audit_lines() if line["event"] == "mfa.verified"]
    assert (verified[-1]["outcome"], verified[-1]["reason"]) == ("failure", reason)
    registry = server.services.metrics.registry
    counted = {
        result: registry.get_sample_value(
            "tokengate_authserver_factor_results_total", {"factor": "passkey", "result": result}
        )
        for result in ("success", "failure", "replayed")
    }
    # created (success), one good signature (success), then this answer
    expected = {"success": 2.0, "failure": None, "replayed": None}
    expected["replayed" if reason == "replayed" else "failure"] = 1.0
    assert counted == expected


@pytest.mark.parametrize(
    "credential",
    [
        "",
        "{",
        "[]",
        '{"id": "x"}',
        json.dumps(
            {
                "id": "!!",
                "rawId": "!!",
                "type": "public-key",
                "response": {"clientDataJSON": "!!", "authenticatorData": "!!", "signature": "!!"},
            }
        ),
        json.dumps(
            {
                "id": "AA",
                "rawId": "AA",
                "type": "public-key",
                "response": {
                    "clientDataJSON": "AA",
                    "authenticatorData": "AA",
                    "signature": "AA",
                    "userHandle": 5,
                },
            }
        ),
        "x" * 20_000,
        "[" * 10_000,  # deeper than Python's JSON parser goes
        json.dumps({"id": "AA", "rawId": "AA", "response": {"clientDataJSON": "[" * 9_000}}),
    ],
)
async def test_garbage_is_a_refusal_never_a_500(server: AuthServer, credential: str) -> None:
    device = Authenticator(LOCAL)
    await passwordless_alice(server, device)
    async with browser(server) as http:
        page = await login_page(http, **kiosk_params())
        answer = await post_credential(http, PasskeyForm(page.text), credential)
        assert answer.status_code == 401, answer.text
        # and at the second factor's page, and as a new passkey
        await password(http, await login_page(http, **authorize_params()))
        page = await http.get("/signin/mfa")
        answer = await post_credential(http, PasskeyForm(page.text), credential)
        assert answer.status_code == 401, answer.text
    async with browser(server) as http:
        await password(http, await login_page(http, **authorize_params()), "bob")
        enroll = await http.get("/signin/passkey/enroll")
        answer = await post_credential(http, PasskeyForm(enroll.text), credential)
        assert answer.status_code == 400, answer.text


async def test_another_users_passkey_is_no_second_factor_and_none_is_registered_twice(
    server: AuthServer,
) -> None:
    alices = Authenticator(LOCAL)
    await passwordless_alice(server, alices)
    bobs = Authenticator(LOCAL)
    async with browser(server) as http:  # bob's authenticator offers alice's credential id
        await password(http, await login_page(http, **authorize_params()), "bob")
        twin = await create_passkey(http, bobs, credential_id=alices.passkeys[0].credential_id)
        assert twin.status_code == 400 and "The passkey was not created" in twin.text
        shown = await create_passkey(http, bobs)  # a passkey of his own
        recovery_codes(shown)
        back(await http.post("/signin/mfa/continue", data=Form(shown.text).fields), CALLBACK)
    async with browser(server) as http:  # bob's second factor, signed by alice's passkey
        await password(http, await login_page(http, **authorize_params()), "bob")
        form = PasskeyForm((await http.get("/signin/mfa")).text)
        theirs = alices.get(form.options, passkey=alices.passkeys[0])
        answer = await post_credential(http, form, theirs)
        assert answer.status_code == 401 and "That passkey could not be checked." in answer.text
    lines = server.audit_lines()
    enrolled = [(x["username"], x["reason"]) for x in lines if x["event"] == "mfa.enrolled"]
    assert enrolled == [("alice", "ok"), ("bob", "registered_already"), ("bob", "ok")]
    verified = [x for x in lines if x["event"] == "mfa.verified"]
    assert (verified[-1]["username"], verified[-1]["reason"]) == ("bob", "unknown_passkey")


async def test_a_passkey_that_says_it_is_synced_now_is_a_software_key(server: AuthServer) -> None:
    """Whether a passkey is synced is the authenticator's own word ("none"
    attestation): if it says so at any signature, amr says swk, never hwk."""
    device = Authenticator(LOCAL)
    await passwordless_alice(server, device)  # created as bound to its device
    device.passkeys[0].synced = True
    async with browser(server) as http:
        form = PasskeyForm((await login_page(http, **kiosk_params())).text)
        answer = await post_credential(http, form, device.get(form.options))
        assert (await tokens(http, back(answer)["code"]))["id"]["amr"] == ["swk", "mfa"]


async def test_passkeys_count_where_the_public_url_allows_none(make_authserver: Any) -> None:
    """The same store served where browsers allow no passkeys (an IP address): alice's
    passkey is still her factor. No page offers it, so her recovery codes stand in;
    her password alone enrolls nothing."""
    server = make_authserver(config)
    async with browser(server) as http:
        await password(http, await login_page(http, **authorize_params()))
        shown = await create_passkey(http, Authenticator(LOCAL))
        codes = recovery_codes(shown)
        back(await http.post("/signin/mfa/continue", data=Form(shown.text).fields), CALLBACK)

    def plain(data: dict[str, Any]) -> None:
        config(data)
        data["authserver"]["public_url"] = "http://127.0.0.1:9000"
        data["authserver"]["clients"].pop()  # kiosk: passwordless needs passkeys

    other = make_authserver(plain)
    async with httpx.AsyncClient(
        transport=other.transport(), base_url="http://127.0.0.1:9000"
    ) as http:
        start = await http.get("/oauth2/default/v1/authorize", params=authorize_params())
        page = await http.get(start.headers["location"])
        answer = await password(http, page)
        assert answer.headers["location"] == "/signin/mfa"
        assert (await http.get("/signin/mfa/enroll")).headers["location"] == "/signin/mfa"
        challenge = await http.get("/signin/mfa")
        assert PasskeyForm(challenge.text).kind is None and "Recovery code" in challenge.text
        done = await http.post(
            "/signin/mfa", data={**Form(challenge.text).fields, "code": codes[0]}
        )
        assert done.status_code == 303 and done.headers["location"].startswith(CALLBACK)


async def test_no_passkey_pages_where_the_public_url_allows_none(make_authserver: Any) -> None:
    from tests.asgi.test_signin_flow import sign_in_config as plain

    server = make_authserver(
        lambda d: (
            plain(d),
            d["authserver"]["clients"][-2].update(sign_on={"policy": "password+mfa"}),
        )
    )
    async with server.client() as http:
        response = await http.get(f"{server_issuer()}/v1/authorize", params=authorize_params())
        page = await http.get(response.headers["location"])
        answer = await http.post(
            "/signin/login",
            data={**Form(page.text).fields, "username": "alice", "password": ALICE_PASSWORD},
        )
        assert answer.headers["location"] == "/signin/mfa/enroll"
        enroll = await http.get("/signin/mfa/enroll")
        assert "passkey" not in enroll.text.lower()
        assert (await http.get("/signin/passkey/enroll")).status_code == 404


def server_issuer() -> str:
    from tests.conftest import ISSUER as PLAIN

    return PLAIN


def test_passwordless_needs_a_public_url_where_browsers_allow_passkeys() -> None:
    from tokengate.config import parse_config
    from tokengate.yamlconf import ConfigErrors

    text = (
        "authserver:\n  public_url: {url}\n  servers: [{{name: a, audience: x}}]\n"
        "  sign_on: {{policy: passwordless{more}}}\n"
        "  clients:\n    - {{client_id: w, auth_method: none, redirect_uris: ['http://127.0.0.1/cb'],"
        " sign_on: {{policy: passwordless}}}}\n"
    )
    with pytest.raises(ConfigErrors) as info:
        parse_config(text.format(url="http://127.0.0.1:9000", more=""), {})
    why = (
        "passwordless signs in with passkeys, and browsers allow passkeys only at a "
        "public_url on https:// or localhost, not http://127.0.0.1:9000"
    )
    assert [str(e) for e in info.value.errors] == [
        f"authserver.sign_on.policy: {why}",
        f"authserver.clients[0].sign_on.policy: {why}",
    ]
    with pytest.raises(ConfigErrors) as info:
        parse_config(text.format(url=LOCAL, more=", mfa_if: {groups: [admins]}"), {})
    assert [str(e) for e in info.value.errors] == [
        "authserver.sign_on.mfa_if: policy passwordless asks every user for a passkey"
    ]
    config = parse_config(text.format(url="https://id.example.com", more=""), {})
    assert config.authserver is not None and config.authserver.sign_on.preset == "passwordless"
