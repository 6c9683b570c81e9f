"""The ``limits`` block every listener takes (``gateway``, ``authserver``, ``admin``).

What one client may cost a listener: bytes and time for a request head, time
between request body bytes, time without taking any response bytes, and open
connections per worker. :mod:`tokengate.httpserver` enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokengate.yamlconf import ConfigError, Node, as_duration, positive_int

MIN_HEADER_BYTES = 1024  # below this, ordinary clients could not send a request at all


@dataclass(frozen=True, slots=True)
class Limits:
    max_header_bytes: int = 64 * 1024  # request line + headers (trailers too), in bytes
    header_timeout: float = 10.0  # seconds to receive a whole request head
    body_idle_timeout: float = 30.0  # seconds a request body may stall
    max_connections: int = 4096  # open connections per worker; beyond: 503 and close
    send_timeout: float = 60.0  # seconds a client may take no response bytes at all


DEFAULT_LIMITS = Limits()
# The admin listener serves probes and scrapes; the echo upstream is for demos.
ADMIN_LIMITS = Limits(max_connections=256)
ECHO_LIMITS = Limits(max_connections=1024)


def as_limits(node: Node, d: Limits = DEFAULT_LIMITS) -> Limits:
    f = node.fields(
        optional=(
            "max_header_bytes",
            "header_timeout",
            "body_idle_timeout",
            "max_connections",
            "send_timeout",
        )
    )
    max_header_bytes = f.get("max_header_bytes", positive_int, d.max_header_bytes)
    if max_header_bytes is not None and max_header_bytes < MIN_HEADER_BYTES:
        f.node.report.errors.append(
            ConfigError(
                f.node.key_path("max_header_bytes"),
                f"must be at least {MIN_HEADER_BYTES}, got {max_header_bytes}",
            )
        )
    return Limits(
        max_header_bytes=max_header_bytes or d.max_header_bytes,
        header_timeout=f.get("header_timeout", as_duration, d.header_timeout) or d.header_timeout,
        body_idle_timeout=(
            f.get("body_idle_timeout", as_duration, d.body_idle_timeout) or d.body_idle_timeout
        ),
        max_connections=f.get("max_connections", positive_int, d.max_connections)
        or d.max_connections,
        send_timeout=f.get("send_timeout", as_duration, d.send_timeout) or d.send_timeout,
    )
