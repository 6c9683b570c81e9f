"""Per-issuer JWKS cache: keys fetched over HTTP, never on the request path unless a
``kid`` is unknown, and never more than once per ``jwks_cache_min`` for that.

- Fetched at start; a gateway is not ready until every issuer's keys are loaded.
- Refreshed in the background before expiry (``Cache-Control: max-age`` clamped to
  ``[jwks_cache_min, jwks_cache_max]``), retried with backoff on failure.
- An unknown ``kid`` triggers one shared (single-flight) refetch at most once per
  ``jwks_cache_min``; unknown kids are then remembered for a short while, so a flood
  of random kids costs no fetches.
- On fetch failures the last keys keep serving until ``jwks_max_stale`` after the
  last success; then requests fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cachetools
import httpx

from gateway.config import IssuerConfig
from tokengate.jsonlog import log_event
from tokengate.jwk import PublicKey, load_public_jwk
from tokengate.metrics import Metrics

MAX_DOCUMENT_BYTES = 512 * 1024
FETCH_TIMEOUT = 5.0
MAX_BACKOFF = 30.0
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.IGNORECASE)


class KeyUnknown(Exception):
    """No key with this kid (after a refetch, if one was allowed)."""


class KeysUnavailable(Exception):
    """No usable key set: never fetched, or stale past ``jwks_max_stale``."""


@dataclass(frozen=True, slots=True)
class KeySet:
    keys: Mapping[str | None, PublicKey]
    fetched_at: float  # monotonic clock
    fetched_at_wall: float
    ttl: float


def parse_jwks(document: Any, algorithms: tuple[str, ...]) -> dict[str | None, PublicKey]:
    """Usable signature keys, by kid. Keys of other uses, types or algorithms are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK set")
    out: dict[str | None, PublicKey] = {}
    for jwk in document["keys"]:
        try:
            key = load_public_jwk(jwk, algorithms)
        except ValueError:
            continue  # a key we may not or cannot use, as any JWKS consumer skips it
        out[key.kid] = key
    return out


def max_age(cache_control: str | None) -> int | None:
    if not cache_control or "no-store" in cache_control.lower():
        return None
    m = _MAX_AGE.search(cache_control)
    return int(m.group(1)) if m else None


class IssuerKeys:
    """One issuer's keys. All I/O goes through ``http``; time through ``clock``."""

    def __init__(
        self,
        issuer: IssuerConfig,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.issuer = issuer
        self.metrics = metrics
        if metrics is not None:  # both results at 0 from the start
            for result in ("success", "error"):
                metrics.jwks_fetches.labels(issuer.issuer, result)
        self.http = http
        self.clock = clock
        self.wall = wall
        self.keyset: KeySet | None = None
        self.jwks_uri = issuer.jwks_uri
        self.fetches: Counter[str] = Counter()  # result -> count
        self.failures = 0  # consecutive
        self._last_attempt = float("-inf")
        self._inflight: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None  # the background refresher
        self._unknown: cachetools.TTLCache[str | None, bool] = cachetools.TTLCache(
            maxsize=1024, ttl=issuer.jwks_cache_min, timer=clock
        )
        self.loaded = asyncio.Event()

    # -- request path ----------------------------------------------------------

    def current(self) -> KeySet | None:
        """The key set, if it may still be used (fail closed past max_stale)."""
        keyset = self.keyset
        if keyset is None or self.clock() - keyset.fetched_at > self.issuer.jwks_max_stale:
            return None
        return keyset

    async def key(self, kid: str | None) -> PublicKey:
        keyset = self.current()
        if keyset is not None:
            found = _lookup(keyset, kid)
            if found is not None:
                return found
            if kid in self._unknown:
                raise KeyUnknown(kid)
        if (
            self._inflight is not None
            or self.clock() - self._last_attempt >= self.issuer.jwks_cache_min
        ):
            await self.refresh()
            keyset = self.current()
            if keyset is not None and (found := _lookup(keyset, kid)) is not None:
                return found
        if keyset is None or self.failures:
            # While the JWKS cannot be fetched, a new kid may well be a good token's
            # (a rotation during the outage): unavailable, not unknown.
            raise KeysUnavailable(self.issuer.issuer)
        self._unknown[kid] = True
        raise KeyUnknown(kid)

    def has(self, kid: str | None) -> bool:
        keyset = self.current()
        return keyset is not None and _lookup(keyset, kid) is not None

    # -- fetching ----------------------------------------------------------------

    async def refresh(self) -> None:
        """Fetch now, or join the fetch already under way (single-flight)."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._done)
        await asyncio.shield(self._inflight)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved: _fetch never raises but on cancellation

    async def _fetch(self) -> None:
        self._last_attempt = self.clock()
        try:
            if self.jwks_uri is None:
                self.jwks_uri = await self._discover()
            response = await self._get(self.jwks_uri)
            keys = parse_jwks(response.json(), self.issuer.algorithms)
        except (httpx.HTTPError, ValueError) as exc:
            self.fetches["error"] += 1
            self.failures += 1
            if self.metrics is not None:
                self.metrics.jwks_fetches.labels(self.issuer.issuer, "error").inc()
            log_event(
                "jwks.fetch_failed",
                issuer=self.issuer.issuer,
                error=f"{type(exc).__name__}: {exc}"[:300],
                consecutive_failures=self.failures,
                serving_stale=self.current() is not None,
            )
            return
        age = max_age(response.headers.get("cache-control"))
        ttl = min(
            max(
                age if age is not None else self.issuer.jwks_cache_default,
                self.issuer.jwks_cache_min,
            ),
            self.issuer.jwks_cache_max,
        )
        self.keyset = KeySet(keys, self.clock(), self.wall(), float(ttl))
        self.fetches["success"] += 1
        self.failures = 0
        if self.metrics is not None:
            url = self.issuer.issuer
            self.metrics.jwks_fetches.labels(url, "success").inc()
            self.metrics.jwks_keys.labels(url).set(len(keys))
            self.metrics.jwks_last_success.labels(url).set(self.keyset.fetched_at_wall)
        self._unknown.clear()
        self.loaded.set()

    async def _discover(self) -> str:
        base = self.issuer.issuer
        last: Exception | None = None
        for suffix in ("openid-configuration", "oauth-authorization-server"):
            try:
                document = (await self._get(f"{base}/.well-known/{suffix}")).json()
            except (httpx.HTTPError, ValueError) as exc:
                last = exc
                continue
            if not isinstance(document, dict) or document.get("issuer") != base:
                raise ValueError(f"discovery document names another issuer than {base}")
            uri = document.get("jwks_uri")
            if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                raise ValueError("discovery document has no http(s) jwks_uri")
            return uri
        raise ValueError(f"no discovery document at {base}/.well-known/: {last}")

    async def _get(self, url: str) -> httpx.Response:
        response = await self.http.get(url, timeout=FETCH_TIMEOUT)
        if response.status_code != 200:
            raise ValueError(f"{url} answered {response.status_code}")
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"{url} sent more than {MAX_DOCUMENT_BYTES} bytes")
        return response

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """Keep the keys fresh: fetch now, then before each expiry; back off on failure."""
        while True:
            await self.refresh()
            keyset = self.keyset
            if self.failures:
                delay = min(MAX_BACKOFF, 2.0 ** (self.failures - 1))
            elif keyset is not None:
                delay = max(1.0, keyset.fetched_at + keyset.ttl * 0.9 - self.clock())
            else:
                delay = 1.0
            await asyncio.sleep(delay)


def _lookup(keyset: KeySet, kid: str | None) -> PublicKey | None:
    found = keyset.keys.get(kid)
    if found is None and kid is None and len(keyset.keys) == 1:
        return next(iter(keyset.keys.values()))  # an issuer that sets no kid
    return found


class JwksCache:
    """Every configured issuer's keys, and their background refreshers.

    A new configuration builds a new cache that takes over the ``IssuerKeys`` of
    every issuer whose settings did not change, keys and refresher included.
    """

    def __init__(
        self,
        issuers: tuple[IssuerConfig, ...],
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        reuse: JwksCache | None = None,
    ) -> None:
        previous = reuse.issuers if reuse is not None else {}
        self.issuers: dict[str, IssuerKeys] = {}
        for issuer in issuers:
            old = previous.get(issuer.issuer)
            if old is not None and old.issuer == issuer:
                self.issuers[issuer.issuer] = old
            else:
                self.issuers[issuer.issuer] = IssuerKeys(issuer, http, clock=clock, metrics=metrics)

    def __getitem__(self, issuer: str) -> IssuerKeys:
        return self.issuers[issuer]

    def start(self) -> None:
        for keys in self.issuers.values():
            keys.start()

    async def wait_loaded(self, seconds: float) -> list[str]:
        """Wait up to ``seconds`` for every issuer's first keys; name those still missing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.gather(*(k.loaded.wait() for k in self.issuers.values()))
        return self.not_ready()

    def not_ready(self) -> list[str]:
        return [url for url, k in self.issuers.items() if k.current() is None]

    async def stop(self, *, keep: JwksCache | None = None) -> None:
        """Stop the refreshers, except those ``keep`` took over."""
        kept = {id(k) for k in keep.issuers.values()} if keep is not None else set()
        for keys in self.issuers.values():
            if id(keys) not in kept:
                await keys.stop()
