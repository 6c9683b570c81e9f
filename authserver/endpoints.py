"""The HTTP endpoints of one authorization server: token, introspect, revoke, keys,
metadata. Each handler validates, acts, writes one audit line, and answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from authserver import access
from authserver.clientauth import JWKS_UNAVAILABLE, AuthenticatedClient, ClientAuthenticator
from authserver.config import ClientConfig, ServerConfig
from authserver.errors import (
    NO_STORE,
    RATE_LIMITED,
    OAuthError,
    invalid_request,
    method_not_allowed,
    rate_limited,
    send_error,
    store_unavailable,
    throttled,
)
from authserver.forms import Form, parse_form, read_form
from authserver.grants import (
    GRANT_TYPE,
    KNOWN_GRANT_TYPES,
    TokenRequest,
    client_credentials,
    requested_scopes,
)
from authserver.keyring import KeyRing
from authserver.policies import PolicyRequest
from authserver.store import Store, StoreUnavailable, StoreWorker
from authserver.throttle import AuthThrottle
from authserver.tokens import TokenVerifier, access_token_claims, new_jti
from authserver.usergrants import (
    CODE_GRANT,
    PASSWORD_GRANT,
    REFRESH_GRANT,
    Credentials,
    UserGrants,
    may_use,
    refresh_hash,
)
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
from tokengate.ratelimit import Rate, RateLimiter, okta_headers, ratelimit_headers

T = TypeVar("T")
JWKS_FRESH = 1.0  # seconds: a JWKS answer re-reads key records older than this
FEED_PAGE = 1000  # revocations per feed answer at most
FEED_MAX_WAIT = 30  # seconds a feed request may ask to be held
FEED_POLL = 0.5  # seconds between store checks while a feed request waits


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
        credentials: Credentials | None = None,
        proxies: TrustedProxies = NO_PROXIES,
        clock: Callable[[], float] = time.time,
        limiter: RateLimiter | None = None,
        token_rate: Rate | None = None,
    ) -> None:
        self.users = users
        self.limiter = limiter or RateLimiter()
        self.token_rate = token_rate  # per authenticated client; None: unlimited
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
        self._revoked_here = asyncio.Event()  # set (and replaced) at each revocation here
        self.draining = False  # the process is shutting down: feed requests answer now
        self.user_grants = UserGrants(
            keyring=keyring,
            store=store,
            call=self._store,
            users=users,
            audit=audit,
            metrics=metrics,
            credentials=credentials,
            clock=clock,
        )
        self.user_grant = {  # grant_type -> its handler
            CODE_GRANT: self.user_grants.code,
            REFRESH_GRANT: self.user_grants.refresh,
            PASSWORD_GRANT: self.user_grants.password,
        }

    # -- token -------------------------------------------------------------

    async def token(self, server: ServerConfig, scope: Scope, receive: Receive, send: Send) -> None:
        event = self._event(server, scope)
        limited: list[tuple[bytes, bytes]] = []  # a limited client's headers, on every answer
        try:
            form = await self._form(scope, receive)
            grant_type = form.get("grant_type")
            event["grant_type"] = grant_type if grant_type in KNOWN_GRANT_TYPES else None
            if grant_type is None:
                raise invalid_request("grant_type is required")
            if grant_type in self.user_grant:
                client = await self._user_client(server, scope, form, event)
                limited = await self._rate_limit(server, client.client_id)
                body = await self.user_grant[grant_type](server, client, form, event)
                await send_bytes(send, 200, json_bytes(body), [JSON_TYPE, *NO_STORE, *limited])
                return
            if grant_type != GRANT_TYPE:
                raise OAuthError(
                    "unsupported_grant_type",
                    f"supported: {GRANT_TYPE}, {CODE_GRANT}, {REFRESH_GRANT}, {PASSWORD_GRANT}",
                )
            authn = await self._authenticate(scope, form, server, server.token_endpoint, event)
            limited = await self._rate_limit(server, authn.client.client_id)
            # only now, for an authenticated client: parse what it asks for
            requested = requested_scopes(form)
            event["scopes"] = list(requested or ())
            request = client_credentials(server, authn.client, requested, form.all("resource"))
            if server.access_policies:
                asked = PolicyRequest(authn.client.client_id, GRANT_TYPE, request.scopes)
                decided, decision = access.check(server, asked, event, self.metrics)
                request = TokenRequest(decided, request.client, decision.scopes)
        except (OAuthError, StoreUnavailable) as caught:
            # a failing store (a user read, a password check) is a 503 to retry
            exc = caught if isinstance(caught, OAuthError) else self.store_failed(caught)
            self._emit_error("token.denied", event, exc, outcome="denied")
            label = RATE_LIMITED if exc.reason == RATE_LIMITED else exc.error
            self.metrics.token_errors.labels(server.name, label).inc()
            if limited and exc.reason != RATE_LIMITED:
                exc.headers = [*exc.headers, *limited]
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
                "expires_in": request.server.access_token_ttl,
                "scope": claims["scope"],
            }
        )
        await send_bytes(send, 200, body, [JSON_TYPE, *NO_STORE, *limited])

    async def _rate_limit(self, server: ServerConfig, client_id: str) -> list[tuple[bytes, bytes]]:
        """Spend one of the client's token requests: the headers of every answer to it
        (RateLimit fields and Okta's X-Rate-Limit-*), or a 429 when it has none left."""
        rate = self.token_rate
        if rate is None:
            return []
        decision = await self.limiter.decide(f"token:{server.name}", client_id, rate)
        headers = ratelimit_headers("token", rate, decision) + okta_headers(decision, self.clock())
        if not decision.allowed:
            raise rate_limited(headers)
        return headers

    # -- user grants (authorization_code, refresh_token) ----------------------------

    async def _user_client(
        self, server: ServerConfig, scope: Scope, form: Form, event: dict[str, Any]
    ) -> ClientConfig:
        """The client of a user grant: a public client named by client_id alone, or an
        authenticated confidential one."""
        client = self._public_client(scope, form)
        if client is None:
            authn = await self._authenticate(scope, form, server, server.token_endpoint, event)
            return authn.client
        event["client_id"] = client.client_id
        if server.name not in client.servers:
            raise OAuthError(
                "unauthorized_client", f"the client may not use authorization server {server.name}"
            )
        return client

    def _public_client(self, scope: Scope, form: Form) -> ClientConfig | None:
        """The public client a request names by client_id alone (no credentials)."""
        if header(scope, b"authorization") is not None or any(
            form.get(name) is not None
            for name in ("client_secret", "client_assertion", "client_assertion_type")
        ):
            return None
        client = self.authenticator.clients.get(form.get("client_id") or "")
        return client if client is not None and client.public else None

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
            claims, reason = await self._verify(server, token, form.get("token_type_hint"))
        except (OAuthError, StoreUnavailable) as caught:
            # a failing store (a user read, a password check) is a 503 to retry
            exc = caught if isinstance(caught, OAuthError) else self.store_failed(caught)
            self._emit_error("token.introspected", event, exc)
            self.metrics.introspections.labels(server.name, "error").inc()
            await send_error(send, exc)
            return
        jti = claims.get("jti") if claims else None
        if (
            claims is not None
            and authn.client.introspect == "own"
            and claims.get("client_id") != authn.client.client_id
        ):
            claims, reason = None, "not_permitted"  # another client's token: not this caller's
        if claims is None:
            document: dict[str, Any] = {"active": False}
        else:
            document = {"active": True, **claims}
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
            claims, reason = await self._verify(server, token, form.get("token_type_hint"))
            if claims is not None and claims.get("client_id") != authn.client.client_id:
                event["jti"] = claims.get("jti")
                raise OAuthError("unauthorized_client", "the token was issued to another client")
            if claims is not None:  # only a revocation that was stored is reported done
                event["jti"] = claims.get("jti")
                await self._revoke(server, token, claims)
                self.wake_feed()
                reason = "ok"
        except (OAuthError, StoreUnavailable) as caught:
            # a failing store (a user read, a password check) is a 503 to retry
            exc = caught if isinstance(caught, OAuthError) else self.store_failed(caught)
            self._emit_error("token.revoked", event, exc)
            self.metrics.revocations.labels(server.name, "error").inc()
            await send_error(send, exc)
            return
        event.update(
            jti=claims.get("jti") if claims else None,
            scopes=_scopes_of(claims),
            outcome="revoked" if claims else "ignored",
            reason=reason,
        )
        self.audit.emit("token.revoked", **event)
        self.metrics.revocations.labels(server.name, event["outcome"]).inc()
        # RFC 7009 2.2: 200 whether or not the token was valid.
        await send_bytes(send, 200, b"", NO_STORE)

    # -- revocation feed (tokengate's own) --------------------------------------

    async def revocations(
        self, server: ServerConfig, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Revoked access-token ``jti``s with their ``exp``, after a cursor, for
        gateways to follow. GET (credentials in the Authorization header) or POST
        (form body); ``cursor`` opaque, absent = everything still live; ``wait``:
        hold the request up to that many seconds (0-30) until something arrives.
        Client-authenticated like introspection, for clients with ``introspect: any``."""
        event = self._event(server, scope)
        try:
            if scope["method"] == "GET":
                form = parse_form(scope.get("query_string") or b"")
                if any(form.get(n) for n in ("client_secret", "client_assertion")):
                    raise invalid_request("credentials go in the Authorization header or a POST")
            else:
                form = await self._form(scope, receive)
            authn = await self._authenticate(
                scope, form, server, server.revocation_feed_endpoint, event
            )
            if authn.client.introspect != "any":
                raise OAuthError(
                    "unauthorized_client", "the revocation feed needs introspect: any", 403
                )
            cursor = _feed_cursor(form.get("cursor"))
            wait = _feed_wait(form.get("wait"))
            deadline = time.monotonic() + wait
            while True:
                # taken before the read: a revocation that commits during it still wakes us
                revoked_here = self._revoked_here
                entries, after = await self._store(
                    self.store.revocations_after, server.name, cursor, FEED_PAGE, int(self.clock())
                )
                left = deadline - time.monotonic()
                if entries or left <= 0 or self.draining:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(FEED_POLL, left)):
                        await revoked_here.wait()
        except OAuthError as exc:
            self.metrics.revocation_feed.labels(server.name, "error").inc()
            await send_error(send, exc)
            return
        self.metrics.revocation_feed.labels(server.name, "ok").inc()
        body = {
            "revocations": [{"jti": jti, "exp": exp} for jti, exp in entries],
            "cursor": str(after),
        }
        await send_bytes(send, 200, json_bytes(body), [JSON_TYPE, *NO_STORE])

    def drain(self) -> None:
        """The process is shutting down: held feed requests answer at once, so that
        they do not hold the drain up (their clients poll again elsewhere)."""
        self.draining = True
        self.wake_feed()

    def wake_feed(self) -> None:
        """Wake this process's waiting feed requests: a revocation here, or one the
        store heard of elsewhere (other processes' requests learn of it from their
        store, or at their next poll)."""
        self._revoked_here.set()
        self._revoked_here = asyncio.Event()

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
                await self._check_throttle(
                    server, None, ip
                )  # a locked address: 429, whatever it sent
                raise
            presented = credentials.client_id
            await self._check_throttle(server, presented, ip)  # before the credentials are checked
            try:
                authn = await self.authenticator.verify(credentials, audiences)
            except StoreUnavailable as exc:  # an assertion's jti could not be recorded
                raise self.store_failed(exc) from None
        except OAuthError as exc:
            presented = presented or exc.client_id
            if self.authenticator.is_client(presented):
                event["client_id"] = presented
            if exc.error == "invalid_client" and exc.detail != JWKS_UNAVAILABLE:
                await self.throttle.failed(presented, ip)
                self.metrics.client_auth_failures.labels(server.name, "failed").inc()
            raise
        await self.throttle.succeeded(authn.client.client_id)
        event["client_id"] = authn.client.client_id
        if server.name not in authn.client.servers:
            raise OAuthError(
                "unauthorized_client", f"the client may not use authorization server {server.name}"
            )
        return authn

    async def _check_throttle(
        self, server: ServerConfig, client_id: str | None, ip: str | None
    ) -> None:
        retry_after = await self.throttle.retry_after(client_id, ip)
        if retry_after is not None:
            self.metrics.client_auth_failures.labels(server.name, "throttled").inc()
            raise throttled(retry_after)

    async def _verify(
        self, server: ServerConfig, token: str, hint: str | None = None
    ) -> tuple[dict[str, Any] | None, str]:
        """What introspection says of a token of this server: an access token's claims,
        or a live refresh token's (RFC 7662 2.2, ``token_type: refresh_token``). The
        hint only says which kind to try first (RFC 7009 2.1)."""
        kinds = (self._verify_refresh, self._verify_access)
        if hint != "refresh_token":
            kinds = kinds[::-1]
        for verify in kinds:
            claims = await verify(server, token)
            if claims is not None:
                if claims.get("jti") and await self._store(self.store.is_revoked, claims["jti"]):
                    return None, "token_revoked"
                return claims, "ok"
        return None, "token_invalid"

    async def verify_access_token(
        self, server: ServerConfig, token: str
    ) -> tuple[dict[str, Any] | None, str]:
        """A live, unrevoked access token of this server: (claims, "ok"), or (None,
        why not). A failing store is an OAuthError (503)."""
        claims = await self._verify_access(server, token)
        if claims is None:
            return None, "token_invalid"
        if await self._store(self.store.is_revoked, claims["jti"]):
            return None, "token_revoked"
        return claims, "ok"

    async def _verify_access(self, server: ServerConfig, token: str) -> dict[str, Any] | None:
        if token.count(".") != 2:
            return None
        claims = self.verifier.verify(token, server, self.keyring.current(server.name))
        if claims is None:
            return None
        if "auth_time" in claims:  # a user's token: the user must still be allowed in
            client = self.authenticator.clients.get(str(claims.get("client_id")))
            if client is None or not may_use(client, await self.users.get(str(claims["sub"]))):
                return None
        return {**claims, "token_type": "Bearer"}

    async def _verify_refresh(self, server: ServerConfig, token: str) -> dict[str, Any] | None:
        if "." in token or len(token) > 128:
            return None
        now = int(self.clock())
        found = await self._store(self.store.refresh_grant, refresh_hash(token), now)
        if found is None:
            return None
        grant, exp = found
        client = self.authenticator.clients.get(grant.client_id)
        user = await self.users.get(grant.user_id)
        if grant.server != server.name or client is None or not may_use(client, user):
            return None
        if not grant.offline and not await self._store(
            self.store.session_alive, grant.session_id, now
        ):
            return None
        assert user is not None
        return {
            "token_type": "refresh_token",
            "iss": server.issuer,
            "sub": user.id,
            "username": user.username,
            "client_id": grant.client_id,
            "scope": " ".join(grant.scopes),
            "exp": exp,
            "auth_time": grant.auth_time,
        }

    async def _revoke(self, server: ServerConfig, token: str, claims: dict[str, Any]) -> None:
        """Revoke what introspection found: an access token by its jti; a refresh
        token with its whole family (RFC 7009 2.1: the grant's access tokens too)."""
        if claims.get("token_type") != "refresh_token":
            await self._store(self.store.revoke, claims["jti"], server.name, int(claims["exp"]))
            return
        now = int(self.clock())
        found = await self._store(self.store.refresh_grant, refresh_hash(token), now)
        if found is not None:
            await self._store(self.store.revoke_family, found[0].family, now)

    async def _store(self, fn: Callable[..., T], *args: Any) -> T:
        """A store call off the event loop; a failing store is a 503 to retry."""
        try:
            return await self.io.call(fn, *args)
        except StoreUnavailable as exc:
            raise self.store_failed(exc) from None

    def store_failed(self, exc: StoreUnavailable) -> OAuthError:
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
    "access_denied",  # an access policy refused the request
    "invalid_request",
    "invalid_client",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_grant",
    "invalid_scope",
    "invalid_target",
    "temporarily_unavailable",
    "server_error",
    RATE_LIMITED,  # the 429 of a client over authserver.rate_limits.token
)


def declare_series(metrics: Metrics, server: str) -> None:
    """Create one authorization server's labelled series at 0."""
    metrics.tokens_issued.labels(server, GRANT_TYPE)
    metrics.tokens_issued.labels(server, CODE_GRANT)
    metrics.tokens_issued.labels(server, REFRESH_GRANT)
    metrics.tokens_issued.labels(server, PASSWORD_GRANT)
    for error in TOKEN_ERRORS:
        metrics.token_errors.labels(server, error)
    for result in ("failed", "throttled"):
        metrics.client_auth_failures.labels(server, result)
    for outcome in ("active", "inactive", "error"):
        metrics.introspections.labels(server, outcome)
    for outcome in ("revoked", "ignored", "error"):
        metrics.revocations.labels(server, outcome)
    for outcome in ("ok", "error"):
        metrics.revocation_feed.labels(server, outcome)


def _feed_cursor(value: str | None) -> int:
    """A feed cursor as :meth:`Endpoints.revocations` hands them out: a decimal
    sequence number (opaque to clients)."""
    if value is None:
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise invalid_request("cursor is not one this endpoint gave")
    return int(value)


def _feed_wait(value: str | None) -> float:
    if value is None:
        return 0.0
    if not value.isascii() or not value.isdigit() or int(value) > FEED_MAX_WAIT:
        raise invalid_request(f"wait must be a number of seconds from 0 to {FEED_MAX_WAIT}")
    return float(value)


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
