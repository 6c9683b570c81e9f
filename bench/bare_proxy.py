"""A uvicorn + aiohttp proxy with no checks at all: a reference point.

bench/gateway_overhead.py measures it in the same run as tokengate: no token, no route
table, no header rules, no audit line, and aiohttp's ClientSession for the upstream
where tokengate uses its own client (gateway/upstream.py). tokengate's figures next to
it show what its checks cost and what its upstream client saves.

    BARE_PROXY_UPSTREAM=http://127.0.0.1:7000 uvicorn bare_proxy:app --app-dir bench
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp
from yarl import URL

UPSTREAM = os.environ.get("BARE_PROXY_UPSTREAM", "http://127.0.0.1:7000")
_session: list[aiohttp.ClientSession] = []


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _session.append(
                    aiohttp.ClientSession(
                        cookie_jar=aiohttp.DummyCookieJar(),
                        auto_decompress=False,
                        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                    )
                )
                await send({"type": "lifespan.startup.complete"})
            else:
                await _session[0].close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"]
    url = URL(UPSTREAM + scope["path"], encoded=True)
    upstream = await _session[0].request(
        scope["method"], url, headers=headers, allow_redirects=False
    )
    await send({"type": "http.response.start", "status": upstream.status, "headers": []})
    async for chunk in upstream.content.iter_any():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    upstream.release()
