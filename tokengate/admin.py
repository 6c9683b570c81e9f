"""The admin listener: ``/healthz`` (alive), ``/readyz`` (ready to serve), ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from tokengate.asgi import (
    JSON_TYPE,
    Receive,
    Scope,
    Send,
    json_bytes,
    send_bytes,
    stateless_lifespan,
)
from tokengate.metrics import Metrics

NotReady = Callable[[], list[str]]  # names what is not ready; empty when ready


class AdminApp:
    """``/readyz`` lists what keeps the process from serving (``not_ready``: 503) and
    what is wrong while it serves anyway (``degraded``: still 200)."""

    def __init__(
        self, metrics: Metrics, checks: Iterable[NotReady], degraded: Iterable[NotReady] = ()
    ) -> None:
        self.metrics = metrics
        self.checks = tuple(checks)
        self.degraded = tuple(degraded)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await stateless_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        no_store = (b"cache-control", b"no-store")
        if method not in ("GET", "HEAD"):
            body = json_bytes({"error": "method_not_allowed"})
            await send_bytes(send, 405, body, [JSON_TYPE, (b"allow", b"GET, HEAD")])
        elif path == "/healthz":
            await send_bytes(send, 200, json_bytes({"status": "ok"}), [JSON_TYPE, no_store])
        elif path == "/readyz":
            problems = [problem for check in self.checks for problem in check()]
            degraded = [problem for check in self.degraded for problem in check()]
            body = json_bytes({"ready": not problems, "not_ready": problems, "degraded": degraded})
            await send_bytes(send, 503 if problems else 200, body, [JSON_TYPE, no_store])
        elif path == "/metrics":
            body, content_type = self.metrics.exposition()
            await send_bytes(send, 200, body, [(b"content-type", content_type.encode()), no_store])
        else:
            await send_bytes(send, 404, json_bytes({"error": "not_found"}), [JSON_TYPE])
