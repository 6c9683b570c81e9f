"""The echo upstream answers 204 and 304 the way HTTP frames them: no body."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tokengate.echo import EchoApp


def answer(query: bytes) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "query_string": query, "headers": []}
    asyncio.run(EchoApp()(scope, receive, send))
    return sent


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses_have_no_body_and_no_length(status: int) -> None:
    start, body = answer(b"status=%d" % status)
    assert start == {"type": "http.response.start", "status": status, "headers": []}
    assert body == {"type": "http.response.body", "body": b""}


def test_other_statuses_describe_the_request() -> None:
    start, body = answer(b"status=418")
    assert start["status"] == 418
    assert (b"content-length", str(len(body["body"])).encode()) in start["headers"]


def test_an_interim_status_is_not_an_answer() -> None:
    start, _ = answer(b"status=100")
    assert start["status"] == 200
