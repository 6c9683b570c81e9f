"""The gateway's audit line is exactly the JSON object DESIGN.md lists, whatever it holds."""

from __future__ import annotations

import json

import pytest

from gateway.audit import NO_IDENTITY, NO_ROUTE, identity_fields, quote, request_line

HOSTILE = ["plain", 'quo"te', "back\\slash", "new\nline", "\x00\x1f\x7f", "ünï©ødé 🙂", "</script>"]


def _line(text: str, identity: str, **extra: object) -> bytes:
    fields = {
        "ts": "2026-11-22T10:00:00.123Z",
        "request_id": text,
        "route": quote(text),
        "method": text,
        "path": text,
        "status": 200,
        "decision": "allow",
        "reason": "ok",
        "identity": identity,
        "remote_addr": text,
        "duration_ms": 1.25,
        "bytes_in": 3,
        "bytes_out": 4,
    }
    return request_line(**{**fields, **extra})  # type: ignore[arg-type]


@pytest.mark.parametrize("text", HOSTILE)
def test_any_string_round_trips(text: str) -> None:
    identity = identity_fields(text, text, text, text, [text, "read"])
    line = _line(text, identity)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever it holds
    assert json.loads(line) == {
        "ts": "2026-11-22T10:00:00.123Z",
        "event": "gateway.request",
        "request_id": text,
        "route": text,
        "method": text,
        "path": text,
        "status": 200,
        "decision": "allow",
        "reason": "ok",
        "client_id": text,
        "sub": text,
        "iss": text,
        "jti": text,
        "scopes": [text, "read"],
        "remote_addr": text,
        "duration_ms": 1.25,
        "bytes_in": 3,
        "bytes_out": 4,
    }


def test_no_route_no_identity_and_missing_values_are_null() -> None:
    line = json.loads(_line("x", NO_IDENTITY, route=NO_ROUTE, remote_addr=None, duration_ms=0.0))
    assert line["route"] == "(none)"
    assert [line[k] for k in ("client_id", "sub", "iss", "jti", "scopes")] == [
        None,
        None,
        None,
        None,
        [],
    ]
    assert line["remote_addr"] is None and line["duration_ms"] == 0.0
    partial = json.loads(_line("x", identity_fields(None, "s", "i", None, [])))
    assert (partial["client_id"], partial["sub"], partial["jti"]) == (None, "s", None)


def test_a_lone_surrogate_is_escaped_not_refused() -> None:
    line = _line("\udc80", NO_IDENTITY)
    assert json.loads(line)["path"] == "\udc80"
