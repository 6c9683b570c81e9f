"""The gateway as a raw ASGI app. Wiring only:

request -> canonical path -> route -> bearer token -> authorize -> forward
        \\-> every outcome: one audit line
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httpx

from gateway.audit import NO_IDENTITY, NO_ROUTE, request_line
from gateway.authn import Authenticator, Principal, bearer_token
from gateway.authz import authorize
from gateway.config import GatewayConfig, RouteRateLimit
from gateway.errors import Denied, Reason, send_denial
from gateway.forward import Exchange, Forwarder
from gateway.headers import SPOOFABLE, RequestIds, upstream_headers
from gateway.jwks import JwksCache
from gateway.paths import BadPath, canonical_path
from gateway.revocations import STARTUP_WAIT as FEED_STARTUP_WAIT
from gateway.revocations import Revocations
from gateway.routing import Route, RouteTable, request_host
from gateway.upstream import Origin, UpstreamClient, UpstreamError
from tokengate.asgi import Receive, Scope, Send
from tokengate.httpserver import ABORT_EXTENSION
from tokengate.jsonlog import AuditLog, EventLimiter, log_event, rfc3339_now, traceback_frames
from tokengate.metrics import Metrics
from tokengate.proxies import TrustedProxies
from tokengate.ratelimit import RateLimiter, ratelimit_headers

_UNSAFE_IN_QUERY = re.compile(rb"[\x00-\x20\x7f#]")  # would end or split the request line
STARTUP_WAIT = 10.0  # seconds the first start waits for every issuer's keys


@dataclass(frozen=True, slots=True)
class Upstream:
    """Per-route forwarding settings, built once."""

    origin: Origin
    base_path: bytes  # the upstream URL's path, percent-encoded; "" for none
    timeout: float

    @classmethod
    def of(cls, url: str, timeout: float) -> Upstream:
        path = quote(urlsplit(url).path, safe="/%!$&'()*+,;=:@-._~")
        return cls(Origin.of(url), path.encode("ascii"), timeout)


@dataclass(frozen=True, slots=True)
class GatewayState:
    """Everything one configuration decides, swapped whole on reload: a request uses
    the state it started with until it ends."""

    config: GatewayConfig
    routes: RouteTable
    upstreams: dict[str, Upstream]
    jwks: JwksCache
    revocations: Revocations
    authenticator: Authenticator
    match_hosts: bool
    strip: frozenset[bytes]  # request headers never forwarded, normalized names
    proxies: TrustedProxies  # whose X-Forwarded-For/-Proto and Forwarded are believed


def build_state(
    config: GatewayConfig,
    jwks: JwksCache,
    clock: Callable[[], float],
    revocations: Revocations,
) -> GatewayState:
    return GatewayState(
        config=config,
        routes=RouteTable(config.routes),
        upstreams={r.name: Upstream.of(r.upstream, r.timeout) for r in config.routes},
        jwks=jwks,
        revocations=revocations,
        authenticator=Authenticator(config, jwks, clock=clock),
        match_hosts=any(r.host is not None for r in config.routes),
        strip=SPOOFABLE | {name.encode("ascii") for name in config.strip_headers},
        proxies=config.trusted_proxies,
    )


class GatewayApp:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        audit: AuditLog,
        http: httpx.AsyncClient | None = None,
        client_factory: Callable[[], UpstreamClient] = UpstreamClient,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.audit = audit
        self.limiter = limiter or RateLimiter()  # routes' rate limits; per process by default
        self.metrics = metrics or Metrics()
        self.http = http or httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self.clock = clock
        self.monotonic = monotonic
        jwks = JwksCache(config.issuers, self.http, clock=monotonic, metrics=self.metrics)
        revocations = Revocations(
            config.issuers, self.http, metrics=self.metrics, clock=clock, monotonic=monotonic
        )
        self.state = build_state(config, jwks, clock, revocations)
        self.client_factory = client_factory
        self.forwarder: Forwarder | None = None
        self.started = False
        self._draining = asyncio.Event()
        self.request_ids = RequestIds()
        self.internal_errors = EventLimiter()

    @property
    def config(self) -> GatewayConfig:
        return self.state.config

    @property
    def jwks(self) -> JwksCache:
        return self.state.jwks

    @property
    def revocations(self) -> Revocations:
        return self.state.revocations

    @property
    def authenticator(self) -> Authenticator:
        return self.state.authenticator

    async def reconfigure(self, config: GatewayConfig) -> None:
        """Swap in a new configuration; new issuers' keys are loaded first."""
        old = self.state
        jwks = JwksCache(
            config.issuers, self.http, clock=self.monotonic, metrics=self.metrics, reuse=old.jwks
        )
        revocations = Revocations(
            config.issuers,
            self.http,
            metrics=self.metrics,
            clock=self.clock,
            monotonic=self.monotonic,
            reuse=old.revocations,
        )
        jwks.start()
        revocations.start()
        for issuer in await jwks.wait_loaded(STARTUP_WAIT):
            log_event("gateway.issuer_not_ready", issuer=issuer)
        await revocations.wait_loaded(FEED_STARTUP_WAIT)
        self.state = build_state(config, jwks, self.clock, revocations)
        await old.jwks.stop(keep=jwks)
        await old.revocations.stop(keep=revocations)

    # -- lifecycle ---------------------------------------------------------------

    async def startup(self) -> None:
        self.forwarder = Forwarder(self.client_factory())
        self.jwks.start()
        self.revocations.start()
        loading = asyncio.gather(
            self.jwks.wait_loaded(STARTUP_WAIT), self.revocations.wait_loaded(FEED_STARTUP_WAIT)
        )
        draining = asyncio.ensure_future(self._draining.wait())
        await asyncio.wait((loading, draining), return_when=asyncio.FIRST_COMPLETED)
        draining.cancel()
        if not loading.done():  # told to drain while waiting: stop now, never start
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            return
        missing, _ = loading.result()
        for issuer in missing:
            log_event("gateway.issuer_not_ready", issuer=issuer)
        self.started = True

    def drain(self) -> None:
        """The process is shutting down: a start still waiting for keys waits no more
        (a worker told to stop while its issuers cannot answer goes at once)."""
        self._draining.set()

    def not_ready(self) -> list[str]:
        """What keeps this gateway from serving: named for /readyz."""
        if not self.started:
            return ["gateway: starting"]
        return [f"gateway: no keys for issuer {url}" for url in self.jwks.not_ready()]

    def degraded(self) -> list[str]:
        """What is wrong while this gateway serves anyway: named in /readyz."""
        return self.revocations.degraded()

    async def shutdown(self) -> None:
        await self.limiter.aclose()
        await self.state.jwks.stop()
        await self.state.revocations.stop()
        await self.http.aclose()
        if self.forwarder is not None:
            await self.forwarder.client.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.handle(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- requests ----------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        state = self.state
        self.metrics.request_started()
        headers = scope["headers"]
        host_header = sent_id = None
        authorization = []
        for name, value in headers:  # the one pass over the request headers here
            if name == b"host":
                host_header = value
            elif name == b"authorization":
                authorization.append(value)
            elif name == b"x-request-id":
                sent_id = value
        rid = self.request_ids.pick(sent_id)
        rid_bytes = rid.encode()
        source = state.proxies.origin_of(scope)
        route: Route | None = None
        principal: Principal | None = None
        path = scope["path"]
        exchange = Exchange()
        try:
            try:
                path = canonical_path(
                    scope.get("raw_path") or scope["path"].encode("utf-8"),
                    allow_path_parameters=state.config.allow_path_parameters,
                )
            except BadPath as exc:
                raise Denied(Reason.BAD_PATH, "the request path is not allowed") from exc
            host = request_host(host_header) if state.match_hosts else None
            route = state.routes.match(scope["method"], host, path)
            if route is None:
                raise Denied(Reason.NO_ROUTE, "no route matches this request")
            limit = route.config.rate_limit
            limited: list[tuple[bytes, bytes]] = []
            if limit is not None and not limit.needs_token:  # per route or address: first
                limited = await self._rate_limit(route, limit, None, source.client)
            if not route.config.public:
                principal = await state.authenticator.authenticate(bearer_token(authorization))
                # after the verified-token cache too: a revocation outranks it
                if principal.jti is not None and state.revocations.revoked(
                    principal.issuer.issuer, principal.jti
                ):
                    raise Denied(Reason.TOKEN_REVOKED, "the token has been revoked")
                authorize(principal, route, self.clock())
            if limit is not None and limit.needs_token:  # per client_id or sub: once known
                limited = await self._rate_limit(route, limit, principal, source.client)
            assert self.forwarder is not None, "the gateway has not started"
            upstream = state.upstreams[route.name]
            target = upstream.base_path + route.upstream_path(path).encode("ascii")
            query = scope.get("query_string")
            if query:
                if _UNSAFE_IN_QUERY.search(query):  # the server's parser lets none through
                    raise Denied(Reason.BAD_PATH, "the query string is not allowed")
                target += b"?" + query
            await self.forwarder.forward(
                scope,
                receive,
                send,
                origin=upstream.origin,
                target=target,
                headers=upstream_headers(
                    headers,
                    forwarded_for=", ".join(source.chain) if source.chain else None,
                    scheme=source.scheme,
                    host=host_header,
                    request_id=rid,
                    identity=principal.identity_headers if principal is not None else (),
                    forward_token=route.config.forward_token,
                    strip=state.strip,
                ),
                stall_timeout=upstream.timeout,
                request_id=rid_bytes,
                exchange=exchange,
                response_headers=limited,
            )
        except Denied as denied:
            exchange.reason = denied.reason
            exchange.status = denied.status
            exchange.bytes_out = await send_denial(send, denied, [(b"x-request-id", rid_bytes)])
        except UpstreamError:  # mid-response: only closing the client connection can say it
            abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
            if abort is None:
                raise  # another server: it closes the connection on an exception
            abort()  # already reported on stderr, rate-limited, by the forwarder
            exchange.status = exchange.reason.status  # counted as what it is: 502 or 504
        except Exception as exc:  # a bug: a logged, audited 500, never a traceback to the client
            exchange.reason = Reason.INTERNAL_ERROR
            self._report_internal(exc, route)
            if exchange.status:
                raise  # the response has started: the server closes the connection
            denied = Denied(Reason.INTERNAL_ERROR, "internal error")
            exchange.status = denied.status
            exchange.bytes_out = await send_denial(send, denied, [(b"x-request-id", rid_bytes)])
        finally:
            self._record(scope, rid, route, principal, path, exchange, started, source.client)

    async def _rate_limit(
        self,
        route: Route,
        limit: RouteRateLimit,
        principal: Principal | None,
        remote_addr: str | None,
    ) -> list[tuple[bytes, bytes]]:
        """Spend one request of the route's budget for this caller: the RateLimit
        headers of the response, or Denied (429) when the budget is spent."""
        if limit.per == "route":
            key = "-"
        elif limit.per == "remote_addr":
            key = remote_addr or "-"
        elif principal is None:  # not reached: the config refuses token keys on public routes
            key = "-"
        elif limit.per == "client_id":
            key = principal.client_id or principal.sub or "-"
        else:
            key = principal.sub or "-"
        decision = await self.limiter.decide(f"route:{route.name}", key, limit.rate)
        headers = ratelimit_headers(route.name, limit.rate, decision)
        if not decision.allowed:
            raise Denied(Reason.RATE_LIMITED, "rate limit exceeded; retry later", headers=headers)
        return headers

    def _report_internal(self, exc: Exception, route: Route | None) -> None:
        """The traceback on stderr, at most every 10 s per exception type and route. Its
        frames only: an exception's message may quote request data such as a token."""
        unreported = self.internal_errors.due((type(exc), route.name if route else None))
        if unreported is not None:
            log_event(
                "gateway.internal_error",
                route=route.name if route is not None else None,
                error=type(exc).__name__,
                traceback=traceback_frames(exc),
                unreported=unreported,
            )

    def _record(
        self,
        scope: Scope,
        rid: str,
        route: Route | None,
        principal: Principal | None,
        path: str,
        exchange: Exchange,
        started: float,
        remote_addr: str | None,
    ) -> None:
        """One metric update and one audit line per request."""
        elapsed = time.perf_counter() - started
        status = exchange.status or 500
        reason = exchange.reason
        decision = reason.decision
        method = scope["method"]
        self.metrics.request_finished(
            route.name if route is not None else "(none)",
            method,
            status,
            decision,
            reason,
            elapsed,
            exchange.upstream_seconds,
        )
        self.audit.sink.write_line(
            request_line(
                ts=rfc3339_now(),
                request_id=rid,
                route=route.audit_name if route is not None else NO_ROUTE,
                method=method,
                path=path,
                status=status,
                decision=decision,
                reason=reason,
                identity=principal.audit_identity if principal is not None else NO_IDENTITY,
                remote_addr=remote_addr,
                duration_ms=round(elapsed * 1000, 3),
                bytes_in=exchange.bytes_in,
                bytes_out=exchange.bytes_out,
            )
        )


def create_app(
    config: GatewayConfig,
    *,
    audit: AuditLog,
    metrics: Metrics,
    limiter: RateLimiter | None = None,
) -> GatewayApp:
    return GatewayApp(config, audit=audit, metrics=metrics, limiter=limiter)
