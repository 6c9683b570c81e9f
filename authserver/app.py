"""The authorization server as a raw ASGI app: services, routes, lifespan. Wiring only."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from authserver import access
from authserver.clientauth import ClientAuthenticator, ClientKeyFetcher
from authserver.config import AuthServerConfig, ServerConfig
from authserver.cors import server_origins, with_cors
from authserver.endpoints import Endpoints, declare_series
from authserver.errors import not_found, send_error, server_error
from authserver.keyring import KeyRing
from authserver.keys import RELOAD_INTERVAL, KeyFiles, KeyManager
from authserver.logout import Logout
from authserver.metadata import authorization_server_metadata, openid_configuration
from authserver.passwords import PasswordWorker
from authserver.signin import SignIn
from authserver.sqlstore import SqlStore
from authserver.store import Store, StoreUnavailable, StoreWorker
from authserver.stores import open_store
from authserver.throttle import AuthThrottle, make_throttle
from authserver.tokens import TokenVerifier
from authserver.userinfo import UserInfo
from authserver.users import UserDirectory
from tokengate.asgi import ClientDisconnected, Message, Receive, Scope, Send, json_bytes
from tokengate.jsonlog import AuditLog, log_event, traceback_frames
from tokengate.metrics import Metrics
from tokengate.ratelimit import RateLimiter
from tokengate.redislink import RedisLink

Handler = Callable[[ServerConfig, Scope, Receive, Send], Awaitable[None]]
Route = tuple[Handler, ServerConfig, str | None]
PURGE_INTERVAL = 60


@dataclass
class AuthServices:
    """Everything the endpoints use, built once per process from the config."""

    config: AuthServerConfig
    store: Store
    keyring: KeyRing
    endpoints: Endpoints
    http: httpx.AsyncClient
    clock: Callable[[], float]
    audit: AuditLog
    metrics: Metrics
    throttle: AuthThrottle
    io: StoreWorker
    passwords: PasswordWorker
    users: UserDirectory
    signin: SignIn
    throttle_redis: RedisLink | None = None  # the throttles' state, shared when configured

    @classmethod
    def build(
        cls,
        config: AuthServerConfig,
        *,
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
        http: httpx.AsyncClient | None = None,
        store: Store | None = None,
        metrics: Metrics | None = None,
        throttle: AuthThrottle | None = None,
        io: StoreWorker | None = None,
        passwords: PasswordWorker | None = None,
        users: UserDirectory | None = None,
        signin_throttle: AuthThrottle | None = None,
        limiter: RateLimiter | None = None,
        throttle_redis: RedisLink | None = None,
    ) -> AuthServices:
        if store is None:
            store = open_store(config)
            log_migration(store)
        manager = KeyManager(
            store,
            KeyFiles(config.data_dir),
            jwks_max_age=config.jwks_max_age,
            leeway=config.leeway,
            clock=clock,
            kek=config.key_encryption_key,
        )
        keyring = KeyRing(manager, config.servers, clock=clock)
        http = http or httpx.AsyncClient(follow_redirects=False, trust_env=False)
        metrics = metrics or Metrics()
        io = io or StoreWorker(getattr(store, "threads", 1))
        passwords = passwords or PasswordWorker()
        users = users or UserDirectory(store, io, passwords, clock=clock)
        authenticator = ClientAuthenticator(config, store, ClientKeyFetcher(http), io, clock=clock)
        if throttle is None or throttle.policy != config.client_auth_throttle:
            throttle = make_throttle(
                config.client_auth_throttle, throttle_redis, "client", clock=clock
            )
        signin = SignIn(
            config=config,
            store=store,
            io=io,
            users=users,
            keyring=keyring,
            # sign-in failures, per username and per address: the client policy's numbers
            throttle=signin_throttle
            if signin_throttle is not None and signin_throttle.policy == config.client_auth_throttle
            else make_throttle(config.client_auth_throttle, throttle_redis, "signin", clock=clock),
            audit=audit,
            metrics=metrics,
            proxies=config.trusted_proxies,
            clock=clock,
        )
        endpoints = Endpoints(
            keyring=keyring,
            authenticator=authenticator,
            throttle=throttle,
            verifier=TokenVerifier(leeway=config.leeway, clock=clock),
            store=store,
            io=io,
            audit=audit,
            max_body_bytes=config.max_body_bytes,
            jwks_max_age=config.jwks_max_age,
            metrics=metrics,
            proxies=config.trusted_proxies,
            users=users,
            credentials=signin,  # the password grant checks passwords as the page does
            clock=clock,
            limiter=limiter,
            token_rate=config.rate_limits.token_per_client,
        )
        for server in config.servers:
            declare_series(metrics, server.name)
            access.declare_series(metrics, server)
        return cls(
            config,
            store,
            keyring,
            endpoints,
            http,
            clock,
            audit,
            metrics,
            throttle,
            io,
            passwords,
            users,
            signin,
            throttle_redis,
        )

    def reconfigure(self, config: AuthServerConfig) -> None:
        """Take new servers, clients and users: :meth:`prepare`, then :meth:`switch`."""
        self.switch(self.prepare(config))

    def prepare(self, config: AuthServerConfig) -> AuthServices:
        """Services for ``config``: keys for new servers created and loaded, and the
        config's users applied to the store. Blocking (store, key generation, password
        hashing): a running server calls it off the event loop. The store stays: its
        directory cannot change live."""
        if config.data_dir != self.config.data_dir:
            raise ValueError("authserver.data_dir: changing the data dir needs a restart")
        if config.store != self.config.store:
            raise ValueError("authserver.store: changing the store needs a restart")
        if config.key_encryption_key != self.config.key_encryption_key:
            raise ValueError("authserver.key_encryption_key: changing it needs a restart")
        new = AuthServices.build(
            config,
            audit=self.audit,
            clock=self.clock,
            http=self.http,
            store=self.store,
            metrics=self.metrics,
            throttle=self.throttle,  # failures so far still count, unless the policy changed
            io=self.io,
            passwords=self.passwords,
            users=self.users,
            signin_throttle=self.signin.throttle,
            limiter=self.endpoints.limiter,  # budgets spent so far still count
            throttle_redis=self.throttle_redis,
        )
        try:
            new.start()
        except StoreUnavailable as exc:
            raise RuntimeError(f"authserver: the store could not be updated ({exc})") from exc
        return new

    def switch(self, new: AuthServices) -> None:
        """Serve with what :meth:`prepare` made (on the event loop: nothing here waits)."""
        self.config, self.keyring, self.endpoints = new.config, new.keyring, new.endpoints
        self.throttle = new.throttle
        self.signin = new.signin

    def not_ready(self) -> list[str]:
        """What keeps this authorization server from serving: named for /readyz."""
        return [f"authserver: no signing key loaded for {name}" for name in self.keyring.missing()]

    def start(self) -> None:
        """Signing keys for every server, and the config's users in the store. Waits
        for both (at start, and in a reload before it switches)."""
        for record in self.keyring.start():
            log_event("keys.created", server=record.server, kid=record.kid, alg=record.alg)
        sync = self.users.apply_config(self.config.users)
        for username, user_id in sync.adopted:
            log_event(
                "users.adopted",
                level="warning",
                username=username,
                user_id=user_id,
                detail="a user made with `tokengate users add` is now declared in the "
                "config, which manages it from now on (same id)",
            )
        if sync.created or sync.updated or sync.deleted:
            log_event(
                "users.synced",
                created=len(sync.created),
                updated=len(sync.updated),
                deleted=len(sync.deleted),
            )

    async def maintain(self) -> None:
        """Pick up key changes from other processes; forget expired state. On the
        store's thread: the event loop never waits for the store."""
        last_purge = 0.0
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            now = self.clock()
            purge = now - last_purge >= PURGE_INTERVAL
            try:
                for name in await self.io.call(self._maintain, int(now), purge):
                    log_event("keys.reloaded", server=name)
                if purge:
                    last_purge = now
            except (StoreUnavailable, ValueError, RuntimeError) as exc:
                log_event("keys.reload_failed", error=f"{type(exc).__name__}: {exc}")

    def _maintain(self, now: int, purge: bool) -> list[str]:
        every = self.config.rotation_every
        for server in self.config.servers if every else ():
            record = self.keyring.manager.rotate_if_due(server, every)
            if record is not None:
                log_event(
                    "keys.rotated",
                    server=record.server,
                    kid=record.kid,
                    alg=record.alg,
                    activate_at=record.activate_at,
                    scheduled=True,
                )
        changed = self.keyring.reload()
        if purge:
            self.store.purge(now)
        self.metrics.sessions_active.set(self.store.count_sessions(now))
        return changed

    async def aclose(self) -> None:
        await self.endpoints.limiter.aclose()
        if self.throttle_redis is not None:
            await self.throttle_redis.aclose()
        await self.http.aclose()
        self.passwords.close()
        self.io.close()
        self.store.close()


def log_migration(store: SqlStore) -> None:
    """Say on stderr what opening the store did to its schema."""
    result = store.migration
    if result is None:
        return
    if result.applied:
        log_event("store.migrated", store=str(store), applied=list(result.applied))
    if result.ahead:
        log_event(
            "store.ahead",
            level="warning",
            store=str(store),
            version=result.version,
            known=result.known,
            detail="a newer tokengate migrated this store; migrations only add, so this "
            "release still works on it: upgrade it",
        )


class StartTracking:
    """``send`` that remembers whether the response has started: after that, a failure
    can only end the connection, not answer 500."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)


class AuthServerApp:
    """Routes ``{issuer}/...`` paths of every configured authorization server."""

    def __init__(self, services: AuthServices) -> None:
        self.services = services
        self.routes = build_routes(services.config.servers, services.endpoints, services.signin)
        self.pages = services.signin.routes()

    def _wake_feed(self) -> None:
        """Another process revoked something: held feed requests read the store now."""
        self.services.endpoints.wake_feed()

    def drain(self) -> None:
        """The process is shutting down: end held (long-poll) requests now."""
        self.services.endpoints.drain()

    async def reconfigure(self, config: AuthServerConfig) -> None:
        """A reload: the slow part on a thread, then the switch on the event loop."""
        prepared = await asyncio.to_thread(self.services.prepare, config)
        self.services.switch(prepared)
        self.routes = build_routes(
            self.services.config.servers, self.services.endpoints, self.services.signin
        )
        self.pages = self.services.signin.routes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            page = self.pages.get(scope["path"])
            if page is not None:
                await self._page(page, scope, receive, send)
                return
            route = self.routes.get(scope["path"])
            if route is None:
                await send_error(send, not_found("no such endpoint"))
                return
            await self._handle(route, scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _handle(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the handler; a failing store is a 503 to retry (handlers that audit
        convert it themselves, to say so in their line); an unexpected exception is a
        logged, audited 500, never a traceback for the client."""
        handler, server, audit_event = route
        tracked = StartTracking(send)
        try:
            await handler(server, scope, receive, tracked)
        except ClientDisconnected:
            pass
        except StoreUnavailable as exc:  # a store read no handler converted: 503, retry
            if tracked.started:
                raise
            await send_error(send, self.services.endpoints.store_failed(exc))
        except Exception as exc:  # the safety net: bugs are 500s, logged with their traceback
            log_event(
                "authserver.internal_error",
                server=server.name,
                path=scope["path"],
                error=type(exc).__name__,
                traceback=traceback_frames(exc),
            )
            if audit_event is not None:
                self.services.endpoints.internal_error(audit_event, server, scope)
            if tracked.started:
                raise  # the server ends the half-sent response
            await send_error(send, server_error())

    async def _page(
        self,
        page: Callable[[Scope, Receive, Send], Awaitable[None]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """An org-wide sign-in page, under the same safety net as the endpoints."""
        tracked = StartTracking(send)
        try:
            await page(scope, receive, tracked)
        except ClientDisconnected:
            pass
        except Exception as exc:  # the safety net: bugs are 500s, logged with their traceback
            log_event(
                "authserver.internal_error",
                path=scope["path"],
                error=type(exc).__name__,
                traceback=traceback_frames(exc),
            )
            if tracked.started:
                raise
            await send_error(send, server_error())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        task: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.services.start()
                except (OSError, sqlite3.Error, StoreUnavailable, ValueError, RuntimeError) as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                self.services.store.follow_revocations(
                    functools.partial(
                        asyncio.get_running_loop().call_soon_threadsafe, self._wake_feed
                    )
                )
                task = asyncio.create_task(self.services.maintain())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await self.services.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def build_routes(
    servers: tuple[ServerConfig, ...], endpoints: Endpoints, signin: SignIn
) -> dict[str, Route]:
    """Path -> (handler, server, the audit event its requests write)."""
    routes: dict[str, Route] = {}
    clients = signin.config.clients
    userinfo = UserInfo(
        verify=endpoints.verify_access_token,
        users=endpoints.users,
        clients=signin.clients,
        max_body_bytes=signin.config.max_body_bytes,
    )
    logout = Logout(
        signin=signin, keyring=endpoints.keyring, audit=endpoints.audit, clock=endpoints.clock
    )
    for server in servers:
        base = urlsplit(server.issuer).path
        metadata = endpoints.document(json_bytes(authorization_server_metadata(server, clients)))
        oidc = endpoints.document(json_bytes(openid_configuration(server, clients)))
        origins = server_origins(server, clients)
        for path, handler, audit_event, cors in (
            (f"{base}/.well-known/oauth-authorization-server", metadata, None, True),
            (f"/.well-known/oauth-authorization-server{base}", metadata, None, True),  # RFC 8414
            (f"{base}/.well-known/openid-configuration", oidc, None, True),
            (f"{base}/v1/keys", endpoints.keys, None, True),
            (f"{base}/v1/authorize", signin.authorize, None, False),
            (f"{base}/v1/token", endpoints.token, "token.denied", True),
            (f"{base}/v1/introspect", endpoints.introspect, "token.introspected", False),
            (f"{base}/v1/revoke", endpoints.revoke, "token.revoked", True),
            (f"{base}/v1/revocations", endpoints.revocations, None, False),
            (f"{base}/v1/userinfo", userinfo, None, True),
            (f"{base}/v1/logout", logout, None, False),
        ):
            routes[path] = (with_cors(handler, origins) if cors else handler, server, audit_event)
    return routes


def create_app(
    config: AuthServerConfig,
    *,
    audit: AuditLog,
    metrics: Metrics,
    limiter: RateLimiter | None = None,
    throttle_redis: RedisLink | None = None,
) -> AuthServerApp:
    return AuthServerApp(
        AuthServices.build(
            config, audit=audit, metrics=metrics, limiter=limiter, throttle_redis=throttle_redis
        )
    )
