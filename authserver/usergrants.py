"""The grants that issue a user's tokens: ``authorization_code`` (RFC 6749 4.1.3,
RFC 7636 4.5, OIDC Core 3.1.3) and ``refresh_token`` (RFC 6749 section 6, RFC 9700
4.14: rotated on every use, the whole family revoked when a retired one comes back).

A refresh token is 256 random bits; the store keeps only its SHA-256. Every token
descended from one authorization code is one family (a :class:`Grant`, keyed by the
code's hash): a code used twice, a refresh token used twice, a revocation of any
refresh token, a logout (for tokens without ``offline_access``) and a disabled user
end the family and revoke the access tokens it gave.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from authserver import access
from authserver.authorize import client_scopes, default_user_scopes
from authserver.codes import code_hash
from authserver.config import ClientConfig, ServerConfig
from authserver.errors import OAuthError, invalid_request
from authserver.forms import Form
from authserver.grants import requested_scopes
from authserver.keyring import KeyRing
from authserver.oidc import SignIn, id_token_claims, user_access_token_claims
from authserver.pkce import verifier_matches
from authserver.policies import PolicyRequest
from authserver.store import CodeRecord, Grant, RefreshUse, Store
from authserver.tokens import new_jti
from authserver.users import User, UserDirectory
from tokengate.jsonlog import AuditLog
from tokengate.metrics import Metrics

CODE_GRANT = "authorization_code"
REFRESH_GRANT = "refresh_token"
OFFLINE_ACCESS = "offline_access"
REFRESH_BYTES = 32  # 256 bits of randomness

PASSWORD_GRANT = "password"  # noqa: S105 - a grant type's name
StoreCall = Callable[..., Awaitable[Any]]


class Credentials(Protocol):
    """How a username and password are checked (the hosted page's rules)."""

    async def check_credentials(
        self,
        server: ServerConfig,
        client: ClientConfig,
        username: str,
        password: str,
        ip: str | None,
    ) -> tuple[User | None, dict[str, Any]]: ...

    def not_assigned(
        self, server: ServerConfig, client: ClientConfig, user: User, ip: str | None
    ) -> None: ...

    def second_factor_required(self, client: ClientConfig, user: User) -> bool:
        """Whether the sign-on policy asks this user for a second factor on this client
        (which a password grant cannot give)."""


def new_refresh_token() -> str:
    return secrets.token_urlsafe(REFRESH_BYTES)


def refresh_hash(token: str) -> str:
    """The store's key for a refresh token: its SHA-256, hex (as for codes)."""
    return code_hash(token)


def is_assigned(client: ClientConfig, user: User) -> bool:
    """Okta's app assignment: a client with ``groups`` serves only their members."""
    return client.groups is None or not client.groups.isdisjoint(user.groups)


def may_use(client: ClientConfig, user: User | None) -> bool:
    """Whether ``user`` may still have tokens for ``client``."""
    return user is not None and not user.disabled and is_assigned(client, user)


@dataclass(frozen=True, slots=True)
class Issued:
    body: dict[str, Any]  # the token response
    jti: str
    scopes: tuple[str, ...]


class UserGrants:
    """Redeems codes and refresh tokens for an authenticated (or public) client."""

    def __init__(
        self,
        *,
        keyring: KeyRing,
        store: Store,
        call: StoreCall,
        users: UserDirectory,
        audit: AuditLog,
        metrics: Metrics,
        credentials: Credentials | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credentials = credentials  # the password grant's; None: no password grant
        self.keyring = keyring
        self.store = store
        self.call = call  # a store call off the event loop; StoreUnavailable as a 503
        self.users = users
        self.audit = audit
        self.metrics = metrics
        self.clock = clock

    # -- authorization_code --------------------------------------------------------

    async def code(
        self, server: ServerConfig, client: ClientConfig, form: Form, event: dict[str, Any]
    ) -> dict[str, Any]:
        """Redeem a code: the client that asked for it, the same redirect_uri, the PKCE
        verifier, a user still allowed in. A second use revokes what the first gave."""
        if CODE_GRANT not in client.grant_types:
            raise OAuthError("unauthorized_client", f"the client may not use {CODE_GRANT}")
        key = code_hash(_required(form, "code"))
        now = int(self.clock())
        redemption = await self.call(self.store.redeem_code, key, now)
        if redemption is None:
            raise OAuthError("invalid_grant", "the code is invalid or expired")
        record = redemption.record
        if redemption.reused:
            await self._revoke_code_tokens(server, record, key, redemption.jtis, now, event)
            raise OAuthError("invalid_grant", "the code was used already")
        if record.client_id != client.client_id or record.server != server.name:
            raise OAuthError("invalid_grant", "the code was issued to another client")
        if form.get("redirect_uri") != record.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
        verifier_matches(record.code_challenge, form.get("code_verifier"))
        user = await self.users.get(record.user_id)
        if not may_use(client, user):
            raise OAuthError("invalid_grant", "the user may no longer sign in")
        if not await self.call(self.store.session_alive, record.session_id, now):
            raise OAuthError("invalid_grant", "the session has ended; sign in again")
        assert user is not None
        event.update(user_id=user.id, username=user.username, scopes=list(record.scopes))
        server, scopes, refresh = self._decide(
            server, client, CODE_GRANT, record.scopes, user, event
        )
        event["scopes"] = list(scopes)
        sign_in = SignIn(
            user=user, auth_time=record.auth_time, session_id=record.session_id, amr=record.amr
        )
        jti = new_jti()
        issued = self._tokens(
            server, client, sign_in, scopes, record.nonce, now, jti, record.id_token_claims
        )
        exp = now + server.access_token_ttl
        if refresh:
            token = new_refresh_token()
            grant = Grant(
                family=key,
                server=server.name,
                client_id=client.client_id,
                user_id=user.id,
                session_id=record.session_id,
                scopes=scopes,
                auth_time=record.auth_time,
                offline=OFFLINE_ACCESS in scopes,
                expires_at=now + server.refresh_tokens.max_ttl,
                amr=record.amr,
            )
            idle = min(now + server.refresh_tokens.idle_ttl, grant.expires_at)
            if not await self.call(
                self.store.start_family, grant, refresh_hash(token), idle, jti, exp
            ):
                raise OAuthError("invalid_grant", "the code was used already")
            issued.body["refresh_token"] = token  # the code recorded jti with its family
        elif not await self.call(self.store.code_issued, key, jti, exp):
            raise OAuthError("invalid_grant", "the code was used already")  # reused meanwhile
        self._issued(server, event, jti, CODE_GRANT)
        return issued.body

    async def _revoke_code_tokens(
        self,
        server: ServerConfig,
        record: CodeRecord,
        key: str,
        jtis: tuple[str, ...],
        now: int,
        event: dict[str, Any],
    ) -> None:
        """RFC 6749 10.5: a code used twice; what it gave the first time is revoked,
        its refresh tokens and what they gave included."""
        revoked = set(await self.call(self.store.revoke_family, key, now))
        for jti in jtis:
            # the tokens were issued at most access_token_ttl ago: gone by then
            await self.call(self.store.revoke, jti, record.server, now + server.access_token_ttl)
            revoked.add(jti)
        event.update(user_id=record.user_id)
        for jti in sorted(revoked):
            self.audit.emit(
                "token.revoked",
                **{**event, "jti": jti, "grant_type": CODE_GRANT},
                outcome="revoked",
                reason="code_reused",
            )

    # -- password (RFC 6749 4.3; RFC 9700 deprecates it: opt-in per client) ----------

    async def password(
        self, server: ServerConfig, client: ClientConfig, form: Form, event: dict[str, Any]
    ) -> dict[str, Any]:
        """Tokens for a username and password sent by the client itself, checked and
        throttled as on the hosted page. No browser session: its refresh tokens do not
        end with one."""
        if PASSWORD_GRANT not in client.grant_types or self.credentials is None:
            raise OAuthError("unauthorized_client", f"the client may not use {PASSWORD_GRANT}")
        username = _required(form, "username")
        password = _required(form, "password")
        requested = requested_scopes(form)
        offered = client_scopes(server, client)
        if requested and any(s not in offered for s in requested):
            raise OAuthError("invalid_scope", "a scope is not allowed for this client")
        scopes = requested or default_user_scopes(server, offered)
        ip = event["remote_addr"]
        user, signin = await self.credentials.check_credentials(
            server, client, username, password, ip
        )
        event.update(user_id=signin["user_id"], username=signin["username"])
        if user is None:
            raise OAuthError("invalid_grant", "the username or password is incorrect")
        if not is_assigned(client, user):
            self.credentials.not_assigned(server, client, user, ip)
            raise OAuthError("invalid_grant", "the user is not assigned to this client")
        if self.credentials.second_factor_required(client, user):
            self.audit.emit("user.signin", **signin, outcome="failure", reason="mfa_required")
            self.metrics.signins.labels("failure").inc()
            raise OAuthError(
                "invalid_grant",
                "the sign-on policy asks this user for a second factor: use the hosted "
                "sign-in page (authorization code flow)",
            )
        self.audit.emit("user.signin", **signin, outcome="success", reason="ok")
        self.metrics.signins.labels("success").inc()
        now = int(self.clock())
        event["scopes"] = list(scopes)
        server, scopes, refresh = self._decide(server, client, PASSWORD_GRANT, scopes, user, event)
        event["scopes"] = list(scopes)
        sign_in = SignIn(user=user, auth_time=now, session_id="")
        jti = new_jti()
        issued = self._tokens(server, client, sign_in, scopes, None, now, jti)
        if refresh:
            token = new_refresh_token()
            grant = Grant(
                family="p" + new_refresh_token(),  # no code: a family of its own
                server=server.name,
                client_id=client.client_id,
                user_id=user.id,
                session_id="",
                scopes=scopes,
                auth_time=now,
                offline=OFFLINE_ACCESS in scopes,
                expires_at=now + server.refresh_tokens.max_ttl,
            )
            idle = min(now + server.refresh_tokens.idle_ttl, grant.expires_at)
            exp = now + server.access_token_ttl
            await self.call(self.store.start_family, grant, refresh_hash(token), idle, jti, exp)
            issued.body["refresh_token"] = token
        self._issued(server, event, jti, PASSWORD_GRANT)
        return issued.body

    # -- refresh_token -----------------------------------------------------------

    async def refresh(
        self, server: ServerConfig, client: ClientConfig, form: Form, event: dict[str, Any]
    ) -> dict[str, Any]:
        """Exchange a refresh token for new tokens and its successor. Everything that
        can refuse is checked before the token is retired, so a refused request costs
        the client nothing; then retiring it and storing the successor is one atomic
        step, and of two uses at once exactly one wins (the other is reuse)."""
        if REFRESH_GRANT not in client.grant_types:
            raise OAuthError("unauthorized_client", f"the client may not use {REFRESH_GRANT}")
        presented = refresh_hash(_required(form, "refresh_token"))
        requested = requested_scopes(form)
        now = int(self.clock())
        successor = new_refresh_token()
        jti = new_jti()
        decided = server  # with the deciding policy rule's lifetimes
        granted: tuple[str, ...] | None = None  # the scopes that rule grants

        def exchange() -> tuple[RefreshUse | None, User | None]:  # on the store's thread
            nonlocal decided, granted
            live = self.store.refresh_grant(presented, now)
            user: User | None = None  # read once: disabling a user revokes their families
            if live is not None:
                grant = live[0]
                if grant.client_id != client.client_id or grant.server != server.name:
                    raise OAuthError(
                        "invalid_grant", "the refresh token was issued to another client"
                    )
                _narrowed(grant, requested)
                record = self.store.user(grant.user_id)
                user = User.of(record) if record is not None else None
                if not may_use(client, user):
                    self.store.revoke_family(grant.family, now)
                    raise OAuthError("invalid_grant", "the user may no longer sign in")
                if (
                    not grant.offline
                    and grant.session_id  # the password grant's tokens have no session
                    and not self.store.session_alive(grant.session_id, now)
                ):
                    self.store.revoke_family(grant.family, now)
                    raise OAuthError("invalid_grant", "the session has ended; sign in again")
                if server.access_policies and user is not None:  # refused: the token stays
                    event.update(user_id=user.id, username=user.username)
                    asked = PolicyRequest(
                        client.client_id,
                        REFRESH_GRANT,
                        _narrowed(grant, requested),
                        frozenset(user.groups),
                    )
                    decided, decision = access.check(server, asked, event, self.metrics)
                    granted = decision.scopes
            idle = now + decided.refresh_tokens.idle_ttl
            exp = now + decided.access_token_ttl
            use = self.store.use_refresh(presented, now, refresh_hash(successor), idle, jti, exp)
            # a token that was not live above cannot be "ok" now: no user, refused below
            return use, user if use is not None and use.status == "ok" else None

        use, user = await self.call(exchange)
        if use is None:
            raise OAuthError("invalid_grant", "the refresh token is invalid or expired")
        grant = use.grant
        event.update(user_id=grant.user_id)
        if use.status == "reused":  # whoever presented it: the family is revoked already
            self._reuse_detected(server, event, use)
            raise OAuthError("invalid_grant", "the refresh token was used already")
        if grant.client_id != client.client_id or grant.server != server.name:
            raise OAuthError("invalid_grant", "the refresh token was issued to another client")
        if use.status != "ok" or user is None:
            raise OAuthError("invalid_grant", "the refresh token is invalid or expired")
        scopes = _narrowed(grant, requested) if granted is None else granted
        event.update(username=user.username, scopes=list(scopes))
        sign_in = SignIn(
            user=user, auth_time=grant.auth_time, session_id=grant.session_id, amr=grant.amr
        )
        issued = self._tokens(decided, client, sign_in, scopes, None, now, jti)
        issued.body["refresh_token"] = successor
        self._issued(server, event, jti, REFRESH_GRANT)
        return issued.body

    def _reuse_detected(self, server: ServerConfig, event: dict[str, Any], use: RefreshUse) -> None:
        self.audit.emit(
            "token.reuse_detected",
            **{**event, "grant_type": REFRESH_GRANT},
            outcome="revoked",
            reason="refresh_token_reused",
            revoked=len(use.jtis),
        )
        for jti in use.jtis:
            self.audit.emit(
                "token.revoked",
                **{**event, "jti": jti, "grant_type": REFRESH_GRANT},
                outcome="revoked",
                reason="refresh_token_reused",
            )

    # -- shared ------------------------------------------------------------------

    def _tokens(
        self,
        server: ServerConfig,
        client: ClientConfig,
        sign_in: SignIn,
        scopes: tuple[str, ...],
        nonce: str | None,
        now: int,
        jti: str,
        requested: tuple[str, ...] = (),
    ) -> Issued:
        claims = user_access_token_claims(server, client, sign_in, scopes, now, jti)
        signer = self.keyring.current(server.name).signer
        access_token = signer.sign(claims)
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": server.access_token_ttl,
            "scope": claims["scope"],
        }
        if "openid" in scopes:
            id_claims = id_token_claims(
                server, client.client_id, sign_in, scopes, nonce, now, access_token, requested
            )
            body["id_token"] = signer.sign_id_token(id_claims)
        return Issued(body, jti, scopes)

    def _decide(
        self,
        server: ServerConfig,
        client: ClientConfig,
        grant_type: str,
        scopes: tuple[str, ...],
        user: User,
        event: dict[str, Any],
    ) -> tuple[ServerConfig, tuple[str, ...], bool]:
        """The server's access policies on a user's token request: the server with the
        deciding rule's lifetimes, the scopes granted, and whether a refresh token goes
        with them (the client may refresh, and the policies would allow its first use)."""
        refresh = REFRESH_GRANT in client.grant_types
        if not server.access_policies:
            return server, scopes, refresh
        groups = frozenset(user.groups)
        asked = PolicyRequest(client.client_id, grant_type, scopes, groups)
        decided, decision = access.check(server, asked, event, self.metrics)
        refresh = refresh and access.allows(
            server, PolicyRequest(client.client_id, REFRESH_GRANT, decision.scopes, groups)
        )
        return decided, decision.scopes, refresh

    def _issued(self, server: ServerConfig, event: dict[str, Any], jti: str, grant: str) -> None:
        event["jti"] = jti
        self.audit.emit("token.issued", **event, outcome="issued", reason="ok")
        self.metrics.tokens_issued.labels(server.name, grant).inc()


def _narrowed(grant: Grant, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """RFC 6749 section 6: the scopes asked for, none beyond the original grant."""
    if not requested:
        return grant.scopes
    refused = [s for s in requested if s not in grant.scopes]
    if refused:
        raise OAuthError("invalid_scope", "a refresh may narrow the granted scopes, not widen them")
    return requested


def _required(form: Form, name: str) -> str:
    value = form.get(name)
    if value is None:
        raise invalid_request(f"{name} is required")
    return value
