"""JSON lines: one object per line, written whole.

Audit lines go to the audit sink (stdout or a file); operational events (startup,
key changes, fetch failures) go to stderr. Neither ever carries a token, a secret
or a client assertion: callers pass identifiers such as a token's ``jti``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_line(fields: dict[str, Any]) -> bytes:
    return (json.dumps(fields, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


class LineSink:
    """Appends whole lines to a file descriptor with one ``write`` each.

    A file is opened ``O_APPEND`` so lines from several worker processes never
    interleave. A failed write (full disk, closed pipe) is counted, never raised
    into a request.
    """

    def __init__(self, path: str, *, stream: TextIO | None = None) -> None:
        self.path = path
        self.failures = 0
        self._lock = threading.Lock()
        if path == "-":
            stream = stream or sys.stdout
            self._fd = stream.fileno()
            self._owned = False
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owned = True

    def write(self, fields: dict[str, Any]) -> None:
        line = encode_line(fields)
        with self._lock:
            try:
                view = memoryview(line)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError:
                self.failures += 1

    def close(self) -> None:
        if self._owned:
            os.close(self._fd)
            self._owned = False


class AuditLog:
    """Structured audit events: ``emit("token.issued", client_id=..., jti=...)``."""

    def __init__(self, sink: LineSink) -> None:
        self.sink = sink

    def emit(self, event: str, **fields: Any) -> None:
        self.sink.write({"ts": rfc3339_now(), "event": event, **fields})


def log_event(event: str, **fields: Any) -> None:
    """An operational event on stderr as one JSON line."""
    line = encode_line({"ts": rfc3339_now(), "event": event, **fields}).decode()
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
