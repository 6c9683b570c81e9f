"""A process's link to the shared Redis: scripts run within a timeout, or a fallback.

State that several replicas and workers share (rate limits, the failed-authentication
throttle) lives in Redis when ``redis:`` is configured, each operation one Lua script
(registered once, run by EVALSHA). :class:`RedisLink` runs those scripts and tells the
caller to decide in its own process instead (:class:`RedisUnavailable`) when there is
no answer within ``timeout``. Requests are never refused because Redis is down.

A refused connection or an error starts an episode at once, timeouts once they have
gone on for :data:`SLOW_EPISODE` with no answer between them. An episode is said once
on stderr (``{name}.redis_unavailable``), listed as degraded in ``/readyz``, and a
background task retries with backoff until ``{name}.redis_recovered``; until then no
script is tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from tokengate.jsonlog import log_event

REDIS_TIMEOUT = 0.05  # seconds one operation may wait for Redis before falling back
SLOW_EPISODE = 0.25  # seconds of nothing but timeouts before Redis counts as down
RETRY_FIRST = 0.5  # seconds before the first background retry; doubles up to RETRY_MAX
RETRY_MAX = 10.0


class RedisUnavailable(Exception):
    """No answer from Redis for this operation: decide it in this process."""


class RedisLink:
    """One process's client of the shared Redis, for one user of it (``name``: the
    prefix of its log events). ``redis_url`` None: never shared, every run falls back."""

    def __init__(
        self,
        redis_url: str | None,
        *,
        name: str,
        degraded: str,
        down_action: str,
        up_action: str,
        timeout: float = REDIS_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.redis_url = redis_url
        self.name = name
        self.degraded_text = degraded
        self.down_action = down_action
        self.up_action = up_action
        self.timeout = timeout
        self.clock = clock
        self.retry_first = retry_first
        self.retry_max = retry_max
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self.redis_down = False  # an episode of Redis failures is in progress
        self._slow_since: float | None = None  # first timeout since Redis last answered
        self._retry: asyncio.Task[None] | None = None

    @property
    def configured(self) -> bool:
        return self.redis_url is not None

    @property
    def shared(self) -> bool:
        """Whether operations are cluster-wide right now."""
        return self.redis_url is not None and not self.redis_down

    def _connect(self) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._client = aioredis.Redis.from_url(
            self.redis_url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),  # never retried inline: the fallback answers
            health_check_interval=0,
        )
        self._scripts = {}

    async def run(self, lua: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's answer; :class:`RedisUnavailable` when the caller must decide
        alone (not configured, in an episode, or no answer now). Never anything else
        for Redis."""
        if self.redis_url is None or self.redis_down:
            raise RedisUnavailable
        if self._client is None:
            self._connect()
        script = self._scripts.get(lua)
        if script is None:
            script = self._scripts[lua] = self._client.register_script(lua)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await script(keys=list(keys), args=list(args))
        except (TimeoutError, RedisTimeout) as exc:
            # A slow answer is decided alone; only timeouts that go on for SLOW_EPISODE
            # with no answer in between make an episode (a loaded event loop stalls too).
            now = self.clock()
            if self._slow_since is None:
                self._slow_since = now
            elif now - self._slow_since >= SLOW_EPISODE:
                self._went_down(exc)
            raise RedisUnavailable from None
        except (OSError, RedisError) as exc:  # refused, reset, an error reply
            self._went_down(exc)
            raise RedisUnavailable from None
        self._slow_since = None
        return answer

    def _went_down(self, exc: BaseException) -> None:
        if self.redis_down:
            return
        self.redis_down = True
        self._slow_since = None
        log_event(
            f"{self.name}.redis_unavailable",
            error=type(exc).__name__,
            action=self.down_action,
        )
        self._retry = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Retry Redis with backoff until it answers; then scripts go back to it."""
        delay = self.retry_first
        while True:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(max(self.timeout, 0.5)):
                    await self._client.ping()
            except (TimeoutError, OSError, RedisError):
                delay = min(delay * 2, self.retry_max)
                continue
            break
        self.redis_down = False
        log_event(f"{self.name}.redis_recovered", action=self.up_action)

    def degraded(self) -> list[str]:
        """For ``/readyz``: what is wrong while requests are still served."""
        return [self.degraded_text] if self.redis_down else []

    async def aclose(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
