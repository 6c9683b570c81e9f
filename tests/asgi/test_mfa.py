"""Second factors on the hosted pages: enrolling an authenticator app (TOTP), codes
good once within a small window, throttling, recovery codes, sign-on policies per
client and by group, step-up from a password-only session, and acr/amr in tokens.

Codes are computed here from the secret the enrollment page shows, with a small
RFC 6238 implementation of the test's own (not tokengate's)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import struct
from html import unescape
from typing import Any

import httpx
import pytest

from tests.asgi.test_signin_flow import (
    AUTHORIZE,
    CALLBACK,
    PORTAL_SECRET,
    SPA_CALLBACK,
    Form,
    _remember_secrets,  # noqa: F401  (autouse: records what the log-leak search looks for)
    authorize_params,
    callback_params,
    exchange,
    remember,
    sign_in_config,
    submit,
)
from tests.asgi.test_user_tokens import claims_of
from tests.conftest import TOKEN_URL, AuthServer

pytestmark = pytest.mark.anyio

MFA = "urn:tokengate:loa:2fa"
ONE_FACTOR = "urn:tokengate:loa:1fa"


def rfc6238(secret_b32: str, at: float, step: int = 30) -> str:
    key = base64.b32decode(
        secret_b32.replace(" ", "") + "=" * (-len(secret_b32.replace(" ", "")) % 8)
    )
    mac = hmac.new(key, struct.pack(">Q", int(at // step)), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    return str((struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF) % 1_000_000).zfill(6)


def config(data: dict[str, Any]) -> None:
    sign_in_config(data)
    auth = data["authserver"]
    portal, spa = auth["clients"][-2:]
    portal["sign_on"] = {"policy": "password+mfa"}
    portal["grant_types"] = ["authorization_code", "refresh_token"]
    spa["grant_types"] = ["authorization_code"]
    auth["sign_on"] = {"policy": "password", "mfa_if": {"groups": ["admins"]}}
    auth["users"].append(
        {
            "username": "bob",
            "password_hash": auth["users"][0]["password_hash"],
            "groups": ["admins"],
        }
    )
    auth["clients"].append(
        {
            "client_id": "legacy-cli",
            "secret": PORTAL_SECRET,
            "grant_types": ["password"],
            "scopes": ["openid"],
            "sign_on": {"policy": "password+mfa"},
        }
    )


@pytest.fixture
def server(make_authserver: Any) -> AuthServer:
    return make_authserver(config)  # type: ignore[no-any-return]


async def password_step(
    http: httpx.AsyncClient, username: str = "alice", **changes: str | None
) -> httpx.Response:
    """GET authorize, the sign-in form, the password: the answer to the password."""
    response = await http.get(AUTHORIZE, params=authorize_params(**changes))
    assert response.headers["location"] == "/signin/login", response.headers
    page = await http.get("/signin/login")
    return await submit(http, Form(page.text), username=username)


async def enroll(
    http: httpx.AsyncClient, server: AuthServer
) -> tuple[str, list[str], httpx.Response]:
    """From the enrollment page: the secret, the recovery codes, and the answer to
    the continue button (the redirect to the client)."""
    page = await http.get("/signin/mfa/enroll")
    assert page.status_code == 200, page.text
    secret = unescape(re.search(r'<code id="secret">([^<]+)</code>', page.text).group(1))  # type: ignore[union-attr]
    assert "<svg" in page.text and "QR code of your authenticator secret" in page.text
    remember(secret.replace(" ", ""))
    form = Form(page.text)
    shown = await http.post(
        "/signin/mfa/enroll", data={**form.fields, "code": rfc6238(secret, server.clock())}
    )
    assert shown.status_code == 200, shown.text
    codes = re.findall(r"<li><code>([a-z0-9-]{19})</code></li>", shown.text)
    assert len(codes) == 10 and len(set(codes)) == 10
    for code in codes:
        remember(code)
    done = await http.post("/signin/mfa/continue", data=Form(shown.text).fields)
    return secret, codes, done


async def code_step(http: httpx.AsyncClient, code: str) -> httpx.Response:
    page = await http.get("/signin/mfa")
    assert page.status_code == 200, page.text
    return await http.post("/signin/mfa", data={**Form(page.text).fields, "code": code})


async def enrolled(server: AuthServer) -> tuple[str, list[str]]:
    """alice, enrolled in a browser of her own: her secret and recovery codes."""
    async with server.client() as http:
        answer = await password_step(http)
        assert answer.headers["location"] == "/signin/mfa/enroll"
        secret, codes, done = await enroll(http, server)
        assert done.status_code == 303 and done.headers["location"].startswith(CALLBACK)
    return secret, codes


async def test_enrolling_an_app_then_signing_in_with_it(server: AuthServer) -> None:
    async with server.client() as http:
        answer = await password_step(http, scope="openid profile")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/signin/mfa/enroll"
        assert "tg_session" not in answer.headers.get("set-cookie", "")  # no session yet
        secret, codes, done = await enroll(http, server)
        back = callback_params(done)
        response = await exchange(http, back["code"])
    assert response.status_code == 200, response.text
    body = response.json()
    remember(body["refresh_token"])
    for token in (body["access_token"], body["id_token"]):
        claims = claims_of(token)
        assert (claims["amr"], claims["acr"]) == (["pwd", "otp", "mfa"], MFA)
    lines = server.audit_lines()
    [enrolled_line] = [line for line in lines if line["event"] == "mfa.enrolled"]
    assert enrolled_line["factor"] == "totp" and enrolled_line["username"] == "alice"
    [signin] = [line for line in lines if line["event"] == "user.signin"]
    assert signin["amr"] == ["pwd", "otp", "mfa"] and signin["outcome"] == "success"
    text = server.audit_path.read_text()
    assert secret.replace(" ", "") not in text.replace(" ", "")
    assert not any(code in text for code in codes)


async def test_a_code_is_good_once_within_one_step_either_side(server: AuthServer) -> None:
    secret, _ = await enrolled(server)
    server.clock.advance(120)
    now = server.clock()
    async with server.client() as http:
        assert (await password_step(http)).headers["location"] == "/signin/mfa"
        used = rfc6238(secret, now)
        assert (await code_step(http, used)).headers["location"].startswith(CALLBACK)
    async with server.client() as http:  # the same code again, another browser: a replay
        await password_step(http)
        replayed = await code_step(http, used)
        assert replayed.status_code == 401
        assert "That code is not right" in replayed.text
        # an older step than the last accepted is refused too
        assert (await code_step(http, rfc6238(secret, now - 30))).status_code == 401
        # the next step (a phone clock 30 s ahead) is accepted
        ahead = await code_step(http, rfc6238(secret, now + 30))
        assert ahead.headers["location"].startswith(CALLBACK)
    server.clock.advance(300)
    now = server.clock()
    for at, ok in ((now - 60, False), (now + 60, False), (now - 30, True)):
        async with server.client() as http:
            await password_step(http)
            answer = await code_step(http, rfc6238(secret, at))
            assert (answer.status_code == 303) is ok, (at - now, answer.text)
    results = {
        line["reason"]
        for line in server.audit_lines()
        if line["event"] == "mfa.verified" and line["outcome"] == "failure"
    }
    assert results == {"replayed", "bad_code"}
    registry = server.services.metrics.registry
    replays = registry.get_sample_value(
        "tokengate_authserver_factor_results_total", {"factor": "totp", "result": "replayed"}
    )
    assert replays == 2  # the same code, and one of an older step than it


async def test_wrong_codes_lock_the_second_factor_like_passwords(server: AuthServer) -> None:
    secret, _ = await enrolled(server)
    server.clock.advance(60)
    async with server.client() as http:
        await password_step(http)
        statuses = [(await code_step(http, "000000")).status_code for _ in range(7)]
        assert statuses == [401] * 6 + [429]  # 5 free failures; the 6th locks
        locked = await code_step(http, rfc6238(secret, server.clock()))
        assert locked.status_code == 429
        assert re.search(r"Try again in \d+ seconds", locked.text)
        server.clock.advance(2)
        assert (await code_step(http, rfc6238(secret, server.clock()))).status_code == 303


async def test_recovery_codes_sign_in_once_each(server: AuthServer) -> None:
    _, codes = await enrolled(server)
    async with server.client() as http:
        await password_step(http)
        answer = await code_step(http, codes[3].upper().replace("-", " "))  # as typed
        assert answer.headers["location"].startswith(CALLBACK)
        token = (await exchange(http, callback_params(answer)["code"])).json()
        remember(token["refresh_token"])
        assert claims_of(token["id_token"])["acr"] == MFA
    async with server.client() as http:
        await password_step(http)
        again = await code_step(http, codes[3])
        assert again.status_code == 401
    [used] = [line for line in server.audit_lines() if line["event"] == "mfa.recovery_code_used"]
    assert used["remaining"] == 9 and used["factor"] == "recovery_code"


async def test_a_password_session_steps_up_without_the_password(server: AuthServer) -> None:
    secret, _ = await enrolled(server)
    server.clock.advance(60)
    async with server.client() as http:
        # the spa asks only for a password (alice is no admin)
        spa = await http.get(
            AUTHORIZE,
            params=authorize_params(client_id="spa", redirect_uri=SPA_CALLBACK, scope="openid"),
        )
        page = await http.get(spa.headers["location"])
        back = await submit(http, Form(page.text))
        assert back.headers["location"].startswith(SPA_CALLBACK)
        # the portal needs a second factor: straight to the code, no password form
        portal = await http.get(AUTHORIZE, params=authorize_params())
        assert portal.headers["location"] == "/signin/mfa"
        # prompt=none cannot step up
        silent = await http.get(AUTHORIZE, params=authorize_params(prompt="none"))
        assert callback_params(silent)["error"] == "interaction_required"
        answer = await code_step(http, rfc6238(secret, server.clock()))
        tokens = (await exchange(http, callback_params(answer)["code"])).json()
        remember(tokens["refresh_token"])
        claims = claims_of(tokens["id_token"])
        assert (claims["acr"], claims["auth_time"]) == (MFA, int(server.clock()))
        # the session now has the second factor: SSO to the portal needs nothing more
        sso = await http.get(AUTHORIZE, params=authorize_params())
        assert sso.headers["location"].startswith(CALLBACK + "?code=")


async def test_acr_values_ask_for_a_second_factor_and_groups_require_one(
    server: AuthServer,
) -> None:
    spa = {"client_id": "spa", "redirect_uri": SPA_CALLBACK, "scope": "openid"}
    async with server.client() as http:  # alice, spa, one factor asked: a password
        answer = await password_step(http, **spa, acr_values=f"{ONE_FACTOR} {MFA}")
        assert answer.headers["location"].startswith(SPA_CALLBACK)
    async with server.client() as http:  # only the second factor will do
        answer = await password_step(http, **spa, acr_values=f"{MFA} urn:other")
        assert answer.headers["location"] == "/signin/mfa/enroll"
    async with server.client() as http:  # bob is an admin: org policy mfa_if groups
        answer = await password_step(http, "bob", **spa)
        assert answer.headers["location"] == "/signin/mfa/enroll"


async def test_the_password_grant_cannot_skip_a_second_factor(server: AuthServer) -> None:
    async with server.client() as http:
        response = await http.post(
            TOKEN_URL,
            data={"grant_type": "password", "username": "alice", "password": "alice-password"},
            auth=("legacy-cli", PORTAL_SECRET),
        )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "second factor" in response.json()["error_description"]


async def test_enrollment_keeps_its_secret_and_a_wrong_first_code_is_refused(
    server: AuthServer,
) -> None:
    async with server.client() as http:
        await password_step(http)
        first = await http.get("/signin/mfa/enroll")
        again = await http.get("/signin/mfa/enroll")
        secret = re.search(r'<code id="secret">([^<]+)</code>', first.text).group(1)  # type: ignore[union-attr]
        assert secret in again.text  # a reload shows the same secret
        wrong = await http.post(
            "/signin/mfa/enroll", data={**Form(first.text).fields, "code": "123456"}
        )
        assert wrong.status_code == 401 and 'aria-invalid="true"' in wrong.text
        assert secret in wrong.text
        # the code page is no way around enrolling, and continue needs a code first
        assert (await http.get("/signin/mfa")).headers["location"] == "/signin/mfa/enroll"
        early = await http.post("/signin/mfa/continue", data=Form(first.text).fields)
        assert early.status_code == 400
    # a sign-in page with no password behind it has nothing to offer
    async with server.client() as http:
        await http.get(AUTHORIZE, params=authorize_params())
        assert (await http.get("/signin/mfa")).status_code == 400


async def test_reset_forgets_the_app_and_the_next_sign_in_enrolls_again(
    server: AuthServer,
) -> None:
    await enrolled(server)
    store = server.services.store
    alice = store.user_by_key("alice")
    assert alice is not None and store.totp(alice.id) is not None
    assert store.reset_mfa(alice.id) and not store.reset_mfa(alice.id)
    assert store.recovery_codes_left(alice.id) == 0
    async with server.client() as http:
        assert (await password_step(http)).headers["location"] == "/signin/mfa/enroll"


async def test_with_a_key_encryption_key_the_secret_is_stored_sealed(
    make_authserver: Any,
) -> None:
    def sealed(data: dict[str, Any]) -> None:
        config(data)
        data["authserver"]["key_encryption_key"] = base64.b64encode(b"k" * 32).decode()

    server = make_authserver(sealed)
    secret, _ = await enrolled(server)
    alice = server.services.store.user_by_key("alice")
    record = server.services.store.totp(alice.id)
    raw = base64.b32decode(secret.replace(" ", "") + "=" * (-len(secret.replace(" ", "")) % 8))
    assert record.secret.startswith(b"tgk1") and raw not in record.secret


async def test_a_new_device_needs_the_second_factor_a_remembered_one_does_not(
    make_authserver: Any,
) -> None:
    def new_devices(data: dict[str, Any]) -> None:
        sign_in_config(data)
        data["authserver"]["sign_on"] = {"policy": "password", "mfa_if": {"new_device": True}}

    server = make_authserver(new_devices)
    async with server.client() as laptop:
        first = await password_step(laptop, scope="openid")
        assert first.headers["location"] == "/signin/mfa/enroll"
        secret, _, done = await enroll(laptop, server)
        device = laptop.cookies.get("tg_device")
        assert device is not None and len(device) == 43
        [set_device] = [
            c for c in done.headers.get_list("set-cookie") if c.startswith("tg_device=")
        ]
        assert "HttpOnly" in set_device and "SameSite=Lax" in set_device
        assert "Max-Age=15552000" in set_device
        remember(device)
        laptop.cookies.delete("tg_session")  # signed out; the device is remembered
        again = await password_step(laptop, scope="openid")
        tokens = (await exchange(laptop, callback_params(again)["code"])).json()
        assert claims_of(tokens["id_token"])["acr"] == ONE_FACTOR  # a password was enough
    async with server.client() as phone:  # another browser: the second factor again
        server.clock.advance(60)
        answer = await password_step(phone, scope="openid")
        assert answer.headers["location"] == "/signin/mfa"
        assert (await code_step(phone, rfc6238(secret, server.clock()))).status_code == 303
    alice = server.services.store.user_by_key("alice")
    assert server.services.store.reset_mfa(alice.id)  # forgets the devices too
    async with server.client() as laptop:
        laptop.cookies.set("tg_device", device, domain="auth.test")
        answer = await password_step(laptop, scope="openid")
        assert answer.headers["location"] == "/signin/mfa/enroll"


def test_mfa_if_must_say_when() -> None:
    from tokengate.config import parse_config
    from tokengate.yamlconf import ConfigErrors

    text = (
        "authserver:\n  servers: [{name: a, audience: x}]\n"
        "  sign_on: {policy: password, mfa_if: {}}\n"
    )
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, {})
    assert [str(e) for e in info.value.errors] == [
        "authserver.sign_on.mfa_if: must say when: groups, new_device: true, or both"
    ]


async def test_the_consent_page_is_no_way_around_the_second_factor(server: AuthServer) -> None:
    """A password-only session, a request that needs a second factor: the consent page
    (reachable by URL) gives nothing before the code."""
    await enrolled(server)
    async with server.client() as http:
        spa = await http.get(
            AUTHORIZE,
            params=authorize_params(client_id="spa", redirect_uri=SPA_CALLBACK, scope="openid"),
        )
        page = await http.get(spa.headers["location"])
        await submit(http, Form(page.text))  # signed in with the password alone
        portal = await http.get(AUTHORIZE, params=authorize_params())
        assert portal.headers["location"] == "/signin/mfa"
        consent = await http.get("/signin/consent")
        assert consent.status_code == 400
        code_page = Form((await http.get("/signin/mfa")).text)
        posted = await http.post(
            "/signin/consent",
            data={"csrf_token": code_page.fields["csrf_token"], "consent": "allow"},
        )
        assert posted.status_code == 400
        assert "code=" not in posted.headers.get("location", "")


async def test_what_a_sign_in_proved_is_spent_once_it_reaches_the_consent_page(
    make_authserver: Any,
) -> None:
    def consenting(data: dict[str, Any]) -> None:
        config(data)
        data["authserver"]["clients"][-3]["consent"] = "required"  # the portal

    server = make_authserver(consenting)
    async with server.client() as http:
        await password_step(http)
        page = await http.get("/signin/mfa/enroll")
        secret = re.search(r'<code id="secret">([^<]+)</code>', page.text).group(1)  # type: ignore[union-attr]
        remember(secret.replace(" ", ""))
        shown = await http.post(
            "/signin/mfa/enroll",
            data={**Form(page.text).fields, "code": rfc6238(secret, server.clock())},
        )
        form = Form(shown.text).fields
        for code in re.findall(r"<li><code>([a-z0-9-]{19})</code></li>", shown.text):
            remember(code)
        onward = await http.post("/signin/mfa/continue", data=form)
        assert onward.headers["location"] == "/signin/consent"
        http.cookies.delete("tg_session")  # the user leaves, or signs out
        again = await http.post("/signin/mfa/continue", data=form)
        assert again.status_code == 400  # nothing left to continue with
        assert "tg_session" not in again.headers.get("set-cookie", "")


async def test_codes_sent_all_at_once_are_all_counted(server: AuthServer) -> None:
    import anyio

    secret, _ = await enrolled(server)
    server.clock.advance(60)
    statuses: list[int] = []
    async with server.client() as http:
        await password_step(http)
        form = Form((await http.get("/signin/mfa")).text).fields

        async def guess(i: int) -> None:
            answer = await http.post("/signin/mfa", data={**form, "code": f"{i:06d}"})
            statuses.append(answer.status_code)

        async with anyio.create_task_group() as group:
            for i in range(40):
                group.start_soon(guess, i)
        assert statuses.count(401) <= 10, statuses  # never more than the budget checked
        assert statuses.count(429) >= 30
        right = await http.post(
            "/signin/mfa", data={**form, "code": rfc6238(secret, server.clock())}
        )
        assert right.status_code == 429  # locked for the rest of the window, right code or not


async def test_a_session_alone_never_enrolls_a_factor(server: AuthServer) -> None:
    async with server.client() as http:
        spa = await http.get(
            AUTHORIZE,
            params=authorize_params(client_id="spa", redirect_uri=SPA_CALLBACK, scope="openid"),
        )
        page = await http.get(spa.headers["location"])
        await submit(http, Form(page.text))  # alice: a password, no app yet
        portal = await http.get(AUTHORIZE, params=authorize_params())
        assert portal.headers["location"] == "/signin/login"  # the password again first
        assert (await http.get("/signin/mfa/enroll")).status_code == 400


async def test_signing_out_ends_a_sign_in_in_progress(server: AuthServer) -> None:
    """The password given, the code not yet: signing out in that browser leaves nothing
    of the sign-in to finish."""
    await enrolled(server)
    async with server.client() as http:
        assert (await password_step(http)).headers["location"] == "/signin/mfa"
        code_page = await http.get("/signin/mfa")
        assert code_page.status_code == 200
        signin = http.cookies["tg_signin"]
        signed_out = await http.get("http://auth.test/oauth2/default/v1/logout")
        cleared = [
            c for c in signed_out.headers.get_list("set-cookie") if c.startswith("tg_signin=")
        ]
        assert cleared and "Max-Age=0" in cleared[0]
        http.cookies.set("tg_signin", signin, domain="auth.test")  # kept anyway: no use
        forged = await http.post(
            "/signin/mfa", data={**Form(code_page.text).fields, "code": "000000"}
        )
        assert forged.status_code == 400  # nothing in progress any more
