"""Following issuers' revocation feeds (tokengate's ``{issuer}/v1/revocations``).

One follower per issuer with ``revocations:`` in each gateway process: it long-polls
the feed with the cursor of its last answer, keeps the revoked ``jti``s with their
``exp`` in a bounded map (an entry leaves once its token could no longer pass, at
``exp`` plus the issuer's leeway), and after a failure resumes from the same cursor,
backing off up to :data:`MAX_BACKOFF`. The gateway refuses a token whose ``jti`` is in
the map, verified-token cache or not. Without a ``revocations:`` issuer, nothing here
runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable
from typing import Any

import httpx

from gateway.config import IssuerConfig, RevocationsConfig
from tokengate.jsonlog import log_event
from tokengate.metrics import Metrics

LONG_POLL = 25  # seconds the feed may hold a poll (the endpoint allows 30)
POLL_SLACK = 10.0  # seconds past the long poll before a poll counts as failed
MAX_BACKOFF = 10.0  # seconds between polls of a failing feed, at most
MAX_REVOKED = 100_000  # jtis kept per issuer; beyond, the soonest to expire go first
STARTUP_WAIT = 3.0  # seconds a starting gateway waits for each feed's first answer


class FeedError(Exception):
    """The feed's answer was not a feed page."""


class IssuerRevocations:
    """One issuer's revoked ``jti``s and the task that follows its feed."""

    def __init__(
        self,
        issuer: IssuerConfig,
        feed: RevocationsConfig,
        http: httpx.AsyncClient,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_REVOKED,
    ) -> None:
        self.issuer = issuer
        self.feed = feed
        self.endpoint = feed.endpoint or f"{issuer.issuer}/v1/revocations"
        self.http = http
        self.metrics = metrics
        self.clock = clock
        self.monotonic = monotonic
        self.max_entries = max_entries
        self.revoked: dict[str, float] = {}  # jti -> when it may be forgotten (Unix time)
        self._expiry: list[tuple[float, str]] = []  # heap of (forget at, jti)
        self.cursor: str | None = None  # None: from the start of what is still live
        self.failures = 0
        self.failing_since: float | None = None  # monotonic
        self.evicted = 0
        self.loaded = asyncio.Event()  # the first answer arrived
        self._task: asyncio.Task[None] | None = None
        if metrics is not None:
            metrics.feed_errors.labels(issuer.issuer)
            metrics.feed_last_success.labels(issuer.issuer)
            metrics.revoked_tokens.labels(issuer.issuer).set(0)

    # -- the request path ----------------------------------------------------------

    def is_revoked(self, jti: str) -> bool:
        until = self.revoked.get(jti)
        return until is not None and self.clock() < until

    # -- state -----------------------------------------------------------------------

    def add(self, entries: list[tuple[str, float]]) -> None:
        """Revoked ``(jti, exp)`` pairs from the feed; expired ones are dropped."""
        now = self.clock()
        self.sweep(now)
        for jti, exp in entries:
            until = exp + self.issuer.leeway  # a token passes until exp + leeway
            if until <= now or jti in self.revoked:
                continue
            self.revoked[jti] = until
            heapq.heappush(self._expiry, (until, jti))
        while len(self.revoked) > self.max_entries:  # bounded: the soonest to expire go
            until, jti = heapq.heappop(self._expiry)
            if self.revoked.get(jti) == until:
                del self.revoked[jti]
                self.evicted += 1
        if self.metrics is not None:
            self.metrics.revoked_tokens.labels(self.issuer.issuer).set(len(self.revoked))

    def sweep(self, now: float) -> None:
        """Forget entries whose tokens have expired."""
        while self._expiry and self._expiry[0][0] <= now:
            until, jti = heapq.heappop(self._expiry)
            if self.revoked.get(jti) == until:
                del self.revoked[jti]

    def down_for(self) -> float:
        """Seconds the feed has been failing; 0 when it answers."""
        if self.failing_since is None:
            return 0.0
        return self.monotonic() - self.failing_since

    # -- following -------------------------------------------------------------------

    async def poll(self, wait: int) -> int:
        """One feed request from the cursor; how many revocations it brought."""
        data = {"wait": str(wait)}
        if self.cursor is not None:
            data["cursor"] = self.cursor
        auth: Any = None
        if self.feed.auth_method == "client_secret_post":
            data.update(client_id=self.feed.client_id, client_secret=self.feed.secret)
        else:
            auth = httpx.BasicAuth(self.feed.client_id, self.feed.secret)
        response = await self.http.post(
            self.endpoint, data=data, auth=auth, timeout=wait + POLL_SLACK
        )
        if response.status_code != 200:
            raise FeedError(f"{self.endpoint} answered {response.status_code}")
        try:
            page = response.json()
            entries = [(str(e["jti"]), float(e["exp"])) for e in page["revocations"]]
            cursor = page["cursor"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FeedError(f"{self.endpoint} sent no feed page") from exc
        if not isinstance(cursor, str):
            raise FeedError(f"{self.endpoint} sent no cursor")
        self.add(entries)
        self.cursor = cursor
        self._succeeded()
        return len(entries)

    def _succeeded(self) -> None:
        if self.failures:
            log_event(
                "gateway.revocation_feed_recovered",
                issuer=self.issuer.issuer,
                failures=self.failures,
            )
        self.failures = 0
        self.failing_since = None
        self.loaded.set()
        if self.metrics is not None:
            self.metrics.feed_last_success.labels(self.issuer.issuer).set(self.clock())

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = self.monotonic()
        if self.metrics is not None:
            self.metrics.feed_errors.labels(self.issuer.issuer).inc()
        if self.failures & (self.failures - 1) == 0:  # 1st, 2nd, 4th, 8th, ... failure
            log_event(
                "gateway.revocation_feed_failed",
                issuer=self.issuer.issuer,
                error=f"{type(exc).__name__}: {exc}"[:300],
                consecutive_failures=self.failures,
            )

    async def run(self) -> None:
        """Follow the feed until cancelled: at once from the start, then long polls."""
        wait = 0
        while True:
            try:
                brought = await self.poll(wait)
            except (httpx.HTTPError, FeedError) as exc:
                self._failed(exc)
                await asyncio.sleep(min(MAX_BACKOFF, 0.5 * 2.0 ** (self.failures - 1)))
                wait = 0
                continue
            wait = 0 if brought else LONG_POLL  # a full page: more may be waiting

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Revocations:
    """The followers of every issuer with ``revocations:``. A new configuration takes
    over the followers (map and cursor) of issuers whose settings did not change."""

    def __init__(
        self,
        issuers: tuple[IssuerConfig, ...],
        http: httpx.AsyncClient,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        reuse: Revocations | None = None,
    ) -> None:
        previous = reuse.followers if reuse is not None else {}
        self.followers: dict[str, IssuerRevocations] = {}
        for issuer in issuers:
            if issuer.revocations is None:
                continue
            old = previous.get(issuer.issuer)
            if old is not None and old.issuer == issuer:
                self.followers[issuer.issuer] = old
            else:
                self.followers[issuer.issuer] = IssuerRevocations(
                    issuer,
                    issuer.revocations,
                    http,
                    metrics=metrics,
                    clock=clock,
                    monotonic=monotonic,
                )

    def revoked(self, issuer: str, jti: str) -> bool:
        follower = self.followers.get(issuer)
        return follower is not None and follower.is_revoked(jti)

    def start(self) -> None:
        for follower in self.followers.values():
            follower.start()

    async def wait_loaded(self, seconds: float) -> None:
        """Wait up to ``seconds`` for every feed's first answer."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await asyncio.gather(*(f.loaded.wait() for f in self.followers.values()))

    def degraded(self) -> list[str]:
        """Feeds failing for longer than their ``degraded_after``: named for /readyz."""
        out = []
        for url, follower in self.followers.items():
            down = follower.down_for()
            if down > follower.feed.degraded_after:
                out.append(
                    f"gateway: revocation feed of issuer {url} failing for {int(down)}s; "
                    "tokens revoked since are not known here"
                )
        return out

    async def stop(self, *, keep: Revocations | None = None) -> None:
        kept = {id(f) for f in keep.followers.values()} if keep is not None else set()
        for follower in self.followers.values():
            if id(follower) not in kept:
                await follower.stop()
