"""The HTTP endpoints of one authorization server: token, introspect, revoke, keys,
metadata. Each handler validates, acts, writes one audit line, and answers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from authserver.clientauth import JWKS_UNAVAILABLE, AuthenticatedClient, ClientAuthenticator
from authserver.codes import code_hash
from authserver.config import ClientConfig, ServerConfig
from authserver.errors import (
    NO_STORE,
    OAuthError,
    invalid_request,
    method_not_allowed,
    send_error,
    store_unavailable,
    throttled,
)
from authserver.forms import Form, read_form
from authserver.grants import (
    GRANT_TYPE,
    KNOWN_GRANT_TYPES,
    client_credentials,
    requested_scopes,
)
from authserver.keyring import KeyRing
from authserver.oidc import SignIn, id_token_claims, user_access_token_claims
from authserver.pkce import verifier_matches
from authserver.store import CodeRecord, Store, StoreUnavailable, StoreWorker
from authserver.throttle import AuthThrottle
from authserver.tokens import TokenVerifier, access_token_claims, new_jti
from authserver.users import UserDirectory
from tokengate.asgi import (
    JSON_TYPE,
    Receive,
    Scope,
    Send,
    header,
    header_count,
    json_bytes,
    send_bytes,
)
from tokengate.jsonlog import AuditLog, EventLimiter, log_event
from tokengate.metrics import Metrics
from tokengate.proxies import NO_PROXIES, TrustedProxies

T = TypeVar("T")
JWKS_FRESH = 1.0  # seconds: a JWKS answer re-reads key records older than this
CODE_GRANT = "authorization_code"


class Endpoints:
    def __init__(
        self,
        *,
        keyring: KeyRing,
        authenticator: ClientAuthenticator,
        throttle: AuthThrottle,
        verifier: TokenVerifier,
        store: Store,
        io: StoreWorker,
        audit: AuditLog,
        max_body_bytes: int,
        jwks_max_age: int,
        metrics: Metrics,
        users: UserDirectory,
        proxies: TrustedProxies = NO_PROXIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.users = users
        self.keyring = keyring
        self.proxies = proxies
        self.metrics = metrics
        self.authenticator = authenticator
        self.throttle = throttle
        self.verifier = verifier
        self.store = store
        self.io = io
        self.store_failures = EventLimiter()
        self.audit = audit
        self.max_body_bytes = max_body_bytes
        self.jwks_cache_control = f"public, max-age={jwks_max_age}".encode()
        self.clock = clock

    # -- token -------------------------------------------------------------

    async def token(self, server: ServerConfig, scope: Scope, receive: Receive, send: Send) -> None:
        event = self._event(server, scope)
        try:
            form = await self._form(scope, receive)
            grant_type = form.get("grant_type")
            event["grant_type"] = grant_type if grant_type in KNOWN_GRANT_TYPES else None
            if grant_type is None:
                raise invalid_request("grant_type is required")
            if grant_type == CODE_GRANT:
                body = await self._code_grant(server, scope, form, event)
                await send_bytes(send, 200, json_bytes(body), [JSON_TYPE, *NO_STORE])
                return
            if grant_type != GRANT_TYPE:
                raise OAuthError(
                    "unsupported_grant_type", f"only {GRANT_TYPE} and {CODE_GRANT} are supported"
                )
            authn = await self._authenticate(scope, form, server, server.token_endpoint, event)
            # only now, for an authenticated client: parse what it asks for
            requested = requested_scopes(form)
            event["scopes"] = list(requested or ())
            request = client_credentials(server, authn.client, requested, form.all("resource"))
        except OAuthError as exc:
            self._emit_error("token.denied", event, exc, outcome="denied")
            self.metrics.token_errors.labels(server.name, exc.error).inc()
            await send_error(send, exc)
            return
        now = int(self.clock())
        jti = new_jti()
        claims = access_token_claims(request, now, jti)
        token = self.keyring.current(server.name).signer.sign(claims)
        event.update(scopes=list(request.scopes), jti=jti)
        self.audit.emit("token.issued", **event, outcome="issued", reason="ok")
        self.metrics.tokens_issued.labels(server.name, GRANT_TYPE).inc()
        body = json_bytes(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": server.access_token_ttl,
                "scope": claims["scope"],
            }
        )
        await send_bytes(send, 200, body, [JSON_TYPE, *NO_STORE])

    # -- authorization code (RFC 6749 4.1.3, RFC 7636 4.5, OIDC Core 3.1.3) -----

    async def _code_grant(
        self, server: ServerConfig, scope: Scope, form: Form, event: dict[str, Any]
    ) -> dict[str, Any]:
        """Redeem a code: the client that asked for it, the same redirect_uri, the PKCE
        verifier, a user still allowed in. A second use revokes what the first gave."""
        client = self._public_client(scope, form)
        if client is None:
            authn = await self._authenticate(scope, form, server, server.token_endpoint, event)
            client = authn.client
        else:
            event["client_id"] = client.client_id
            if server.name not in client.servers:
                raise OAuthError(
                    "unauthorized_client",
                    f"the client may not use authorization server {server.name}",
                )
        if CODE_GRANT not in client.grant_types:
            raise OAuthError("unauthorized_client", f"the client may not use {CODE_GRANT}")
        key = code_hash(_required(form, "code"))
        now = int(self.clock())
        redemption = await self._store(self.store.redeem_code, key, now)
        if redemption is None:
            raise OAuthError("invalid_grant", "the code is invalid or expired")
        record = redemption.record
        if redemption.reused:
            await self._revoke_code_tokens(server, record, redemption.jtis, now, event)
            raise OAuthError("invalid_grant", "the code was used already")
        if record.client_id != client.client_id or record.server != server.name:
            raise OAuthError("invalid_grant", "the code was issued to another client")
        if form.get("redirect_uri") != record.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
        verifier_matches(record.code_challenge, form.get("code_verifier"))
        user = await self.users.get(record.user_id)
        if user is None or user.disabled:
            raise OAuthError("invalid_grant", "the user may no longer sign in")
        event.update(user_id=user.id, username=user.username, scopes=list(record.scopes))
        sign_in = SignIn(user=user, auth_time=record.auth_time, session_id=record.session_id)
        jti = new_jti()
        claims = user_access_token_claims(server, client, sign_in, record.scopes, now, jti)
        key_set = self.keyring.current(server.name)
        access_token = key_set.signer.sign(claims)
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": server.access_token_ttl,
            "scope": claims["scope"],
        }
        if "openid" in record.scopes:
            id_claims = id_token_claims(
                server, client.client_id, sign_in, record.scopes, record.nonce, now, access_token
            )
            body["id_token"] = key_set.signer.sign_id_token(id_claims)
        if not await self._store(self.store.code_issued, key, jti, claims["exp"]):
            raise OAuthError("invalid_grant", "the code was used already")  # reused meanwhile
        event["jti"] = jti
        self.audit.emit("token.issued", **event, outcome="issued", reason="ok")
        self.metrics.tokens_issued.labels(server.name, CODE_GRANT).inc()
        return body

    def _public_client(self, scope: Scope, form: Form) -> ClientConfig | None:
        """The public client a request names by client_id alone (no credentials)."""
        if header(scope, b"authorization") is not None or any(
            form.get(name) is not None
            for name in ("client_secret", "client_assertion", "client_assertion_type")
        ):
            return None
        client = self.authenticator.clients.get(form.get("client_id") or "")
        return client if client is not None and client.public else None

    async def _revoke_code_tokens(
        self,
        server: ServerConfig,
        record: CodeRecord,
        jtis: tuple[str, ...],
        now: int,
        event: dict[str, Any],
    ) -> None:
        """RFC 6749 10.5: a code used twice; what it gave the first time is revoked."""
        for jti in jtis:
            # the tokens were issued at most access_token_ttl ago: gone by then
            await self._store(self.store.revoke, jti, record.server, now + server.access_token_ttl)
            self.audit.emit(
                "token.revoked",
                **{**event, "jti": jti, "grant_type": CODE_GRANT},
                outcome="revoked",
                reason="code_reused",
            )

    # -- introspection (RFC 7662) -------------------------------------------

    async def introspect(
        self, server: ServerConfig, scope: Scope, receive: Receive, send: Send
    ) -> None:
        event = self._event(server, scope)
        try:
            form = await self._form(scope, receive)
            authn = await self._authenticate(
                scope, form, server, server.introspection_endpoint, event
            )
            token = _required(form, "token")
            claims, reason = await self._verify(server, token)
        except OAuthError as exc:
            self._emit_error("token.introspected", event, exc)
            self.metrics.introspections.labels(server.name, "error").inc()
            await send_error(send, exc)
            return
        jti = claims["jti"] if claims else None
        if (
            claims is not None
            and authn.client.introspect == "own"
            and claims.get("client_id") != authn.client.client_id
        ):
            claims, reason = None, "not_permitted"  # another client's token: not this caller's
        if claims is None:
            document: dict[str, Any] = {"active": False}
        else:
            document = {"active": True, **claims, "token_type": "Bearer"}
        event.update(
            jti=jti,
            scopes=_scopes_of(claims),
            outcome="active" if claims else "inactive",
            reason=reason,
        )
        self.audit.emit("token.introspected", **event)
        self.metrics.introspections.labels(server.name, event["outcome"]).inc()
        await send_bytes(send, 200, json_bytes(document), [JSON_TYPE, *NO_STORE])

    # -- revocation (RFC 7009) ------------------------------------------------

    async def revoke(
        self, server: ServerConfig, scope: Scope, receive: Receive, send: Send
    ) -> None:
        event = self._event(server, scope)
        try:
            form = await self._form(scope, receive)
            authn = await self._authenticate(scope, form, server, server.revocation_endpoint, event)
            token = _required(form, "token")
            claims, reason = await self._verify(server, token)
            if claims is not None and claims.get("client_id") != authn.client.client_id:
                event["jti"] = claims["jti"]
                raise OAuthError("unauthorized_client", "the token was issued to another client")
            if claims is not None:  # only a revocation that was stored is reported done
                event["jti"] = claims["jti"]
                await self._store(self.store.revoke, claims["jti"], server.name, int(claims["exp"]))
                reason = "ok"
        except OAuthError as exc:
            self._emit_error("token.revoked", event, exc)
            self.metrics.revocations.labels(server.name, "error").inc()
            await send_error(send, exc)
            return
        event.update(
            jti=claims["jti"] if claims else None,
            scopes=_scopes_of(claims),
            outcome="revoked" if claims else "ignored",
            reason=reason,
        )
        self.audit.emit("token.revoked", **event)
        self.metrics.revocations.labels(server.name, event["outcome"]).inc()
        # RFC 7009 2.2: 200 whether or not the token was valid.
        await send_bytes(send, 200, b"", NO_STORE)

    # -- public documents -------------------------------------------------------

    async def keys(self, server: ServerConfig, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await send_error(send, method_not_allowed("GET, HEAD"))
            return
        if self.clock() - self.keyring.read_at >= JWKS_FRESH:
            # A key another process (or worker) just added must be in every JWKS
            # answer, whichever worker answers: re-read the records first. JWKS
            # requests are few (clients cache them); a failing store serves what is
            # loaded.
            with contextlib.suppress(StoreUnavailable):
                for name in await self.io.call(self.keyring.reload):
                    log_event("keys.reloaded", server=name)
        body = self.keyring.current(server.name).jwks_body
        headers = [
            (b"content-type", b"application/jwk-set+json"),
            (b"cache-control", self.jwks_cache_control),
        ]
        await _send_document(scope, send, body, headers)

    @staticmethod
    def document(body: bytes) -> Callable[[ServerConfig, Scope, Receive, Send], Any]:
        async def serve(server: ServerConfig, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["method"] not in ("GET", "HEAD"):
                await send_error(send, method_not_allowed("GET, HEAD"))
                return
            await _send_document(
                scope, send, body, [JSON_TYPE, (b"cache-control", b"public, max-age=300")]
            )

        return serve

    # -- shared steps -------------------------------------------------------------

    async def _form(self, scope: Scope, receive: Receive) -> Form:
        if scope["method"] != "POST":
            raise method_not_allowed("POST")
        return await read_form(scope, receive, self.max_body_bytes)

    async def _authenticate(
        self,
        scope: Scope,
        form: Form,
        server: ServerConfig,
        endpoint: str,
        event: dict[str, Any],
    ) -> AuthenticatedClient:
        """Authenticate the client, throttled per presented client_id and per address."""
        if header_count(scope, b"authorization") > 1:
            raise invalid_request("more than one Authorization header")
        ip = event["remote_addr"]  # behind trusted proxies, the client's own
        audiences = list(dict.fromkeys([endpoint, server.token_endpoint, server.issuer]))
        presented: str | None = None
        try:
            try:
                credentials = self.authenticator.credentials(header(scope, b"authorization"), form)
            except OAuthError:
                self._check_throttle(server, None, ip)  # a locked address: 429, whatever it sent
                raise
            presented = credentials.client_id
            self._check_throttle(server, presented, ip)  # before the credentials are checked
            try:
                authn = await self.authenticator.verify(credentials, audiences)
            except StoreUnavailable as exc:  # an assertion's jti could not be recorded
                raise self._store_failed(exc) from None
        except OAuthError as exc:
            presented = presented or exc.client_id
            if self.authenticator.is_client(presented):
                event["client_id"] = presented
            if exc.error == "invalid_client" and exc.detail != JWKS_UNAVAILABLE:
                self.throttle.failed(presented, ip)
                self.metrics.client_auth_failures.labels(server.name, "failed").inc()
            raise
        self.throttle.succeeded(authn.client.client_id)
        event["client_id"] = authn.client.client_id
        if server.name not in authn.client.servers:
            raise OAuthError(
                "unauthorized_client", f"the client may not use authorization server {server.name}"
            )
        return authn

    def _check_throttle(self, server: ServerConfig, client_id: str | None, ip: str | None) -> None:
        retry_after = self.throttle.retry_after(client_id, ip)
        if retry_after is not None:
            self.metrics.client_auth_failures.labels(server.name, "throttled").inc()
            raise throttled(retry_after)

    async def _verify(self, server: ServerConfig, token: str) -> tuple[dict[str, Any] | None, str]:
        claims = self.verifier.verify(token, server, self.keyring.current(server.name))
        if claims is None:
            return None, "token_invalid"
        if await self._store(self.store.is_revoked, claims["jti"]):
            return None, "token_revoked"
        return claims, "ok"

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call off the event loop; a failing store is a 503 to retry."""
        try:
            return await self.io.call(fn, *args)
        except StoreUnavailable as exc:
            raise self._store_failed(exc) from None

    def _store_failed(self, exc: StoreUnavailable) -> OAuthError:
        unreported = self.store_failures.due(type(exc))
        if unreported is not None:
            log_event("authserver.store_unavailable", error=str(exc), unreported=unreported)
        return store_unavailable()

    def _event(self, server: ServerConfig, scope: Scope) -> dict[str, Any]:
        """The fields every authorization-server audit line carries."""
        source = self.proxies.origin_of(scope)
        return {
            "server": server.name,
            "client_id": None,
            "grant_type": None,
            "scopes": [],
            "jti": None,
            "remote_addr": source.client,
            "detail": None,  # why client authentication failed, as a fixed code
        }

    def _emit_error(
        self, name: str, event: dict[str, Any], exc: OAuthError, *, outcome: str = "error"
    ) -> None:
        event.update(outcome=outcome, reason=exc.reason, detail=exc.detail)
        self.audit.emit(name, **event)

    def internal_error(self, name: str, server: ServerConfig, scope: Scope) -> None:
        """The audit line (and metric) of a request whose handler failed unexpectedly."""
        event = self._event(server, scope)
        event.update(outcome="error", reason="internal_error")
        self.audit.emit(name, **event)
        if name == "token.denied":
            self.metrics.token_errors.labels(server.name, "server_error").inc()
        elif name == "token.introspected":
            self.metrics.introspections.labels(server.name, "error").inc()
        elif name == "token.revoked":
            self.metrics.revocations.labels(server.name, "error").inc()


# What the token endpoint can answer; with the outcomes below, every series an alert
# or dashboard may rate() exists at 0 from the start, not only after its first event.
TOKEN_ERRORS = (
    "invalid_request",
    "invalid_client",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_grant",
    "invalid_scope",
    "invalid_target",
    "temporarily_unavailable",
    "server_error",
)


def declare_series(metrics: Metrics, server: str) -> None:
    """Create one authorization server's labelled series at 0."""
    metrics.tokens_issued.labels(server, GRANT_TYPE)
    metrics.tokens_issued.labels(server, CODE_GRANT)
    for error in TOKEN_ERRORS:
        metrics.token_errors.labels(server, error)
    for result in ("failed", "throttled"):
        metrics.client_auth_failures.labels(server, result)
    for outcome in ("active", "inactive", "error"):
        metrics.introspections.labels(server, outcome)
    for outcome in ("revoked", "ignored", "error"):
        metrics.revocations.labels(server, outcome)


def _required(form: Form, name: str) -> str:
    value = form.get(name)
    if value is None:
        raise invalid_request(f"{name} is required")
    return value


def _scopes_of(claims: dict[str, Any] | None) -> list[str]:
    scope = claims.get("scope") if claims else None
    return scope.split() if isinstance(scope, str) else []


async def _send_document(
    scope: Scope, send: Send, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    if scope["method"] == "HEAD":
        length = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": length + headers})
        await send({"type": "http.response.body", "body": b""})
        return
    await send_bytes(send, 200, body, headers)
