"""Calling the API through the gateway with the user's access token, and turning the
answer into something a page can show (status, and the body: JSON pretty-printed,
anything else as text, cut at :data:`MAX_SHOWN` bytes)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

MAX_SHOWN = 64 * 1024  # bytes of an answer's body the page shows


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    status: int | None  # None: no answer at all (the gateway is down)
    body: str  # for the page (it escapes it); or why there was no answer
    refreshed: bool = False  # the access token was refreshed before this call


def shown(body: bytes, content_type: str, truncated: bool) -> str:
    """A body as the page shows it."""
    if content_type.split(";")[0].strip().lower().endswith("json") and not truncated:
        try:
            return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    text = body.decode("utf-8", errors="replace")
    return text + "\n[... cut]" if truncated else text


async def call_api(http: httpx.AsyncClient, url: str, access_token: str) -> ApiAnswer:
    """``GET url`` with ``Authorization: Bearer``; the body read up to MAX_SHOWN."""
    request = httpx.Request(
        "GET", url, headers={"Authorization": f"Bearer {access_token}", "Accept": "*/*"}
    )
    try:
        response = await http.send(request, stream=True)
    except httpx.HTTPError as exc:
        return ApiAnswer(None, f"no answer from {url}: {type(exc).__name__}")
    body = bytearray()
    truncated = False
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_SHOWN:
                del body[MAX_SHOWN:]
                truncated = True
                break
    except httpx.HTTPError as exc:
        return ApiAnswer(None, f"the answer from {url} broke off: {type(exc).__name__}")
    finally:
        await response.aclose()
    content_type = response.headers.get("content-type", "")
    return ApiAnswer(response.status_code, shown(bytes(body), content_type, truncated))
