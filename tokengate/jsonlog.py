"""JSON lines: one object per line, written whole.

Audit lines go to the audit sink (stdout or a file); operational events (startup,
key changes, fetch failures) go to stderr. Neither ever carries a token, a secret
or a client assertion: callers pass identifiers such as a token's ``jti``.

Every operational event has a ``level`` (debug, info, warning, error), from
:data:`EVENT_LEVELS` unless its call says otherwise; ``TOKENGATE_LOG_LEVEL`` drops
the events below it. Audit lines have no level and are never dropped.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import select
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any


class _Rfc3339Clock:
    """The current UTC time in RFC 3339 with milliseconds; formats each second once."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"


rfc3339_now = _Rfc3339Clock()


def rfc3339(ts: float) -> str:
    """A Unix time as RFC 3339 UTC, whole seconds: ``2026-12-04T18:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# An audit line is at most this long, newline included: below PIPE_BUF (4096 bytes on
# Linux), so one write() of it is atomic on a pipe shared by several workers.
MAX_LINE = 4095
TRUNCATED = "...[truncated]"


def encode_line(fields: dict[str, Any]) -> bytes:
    """One JSON line. A string that is not valid Unicode (a lone surrogate from a
    client's JSON) is written as its JSON escape, never refused."""
    return (_ENCODER.encode(fields) + "\n").encode("utf-8", "backslashreplace")


def fit_line(fields: dict[str, Any], limit: int = MAX_LINE) -> bytes:
    """:func:`encode_line`, with the longest values cut short (marked ``TRUNCATED``)
    until the line is at most ``limit`` bytes."""
    line = encode_line(fields)
    if len(line) <= limit:
        return line
    fields = dict(fields)
    for _ in range(4 * len(fields) + 8):  # each round shrinks the largest value
        excess = len(line) - limit
        if excess <= 0:
            return line
        name, size = max(((k, _encoded_size(v)) for k, v in fields.items()), key=lambda x: x[1])
        fields[name] = _shrink(fields[name], size, excess + len(TRUNCATED) + 8)
        line = encode_line(fields)
    return line if len(line) <= limit else encode_line({k: None for k in fields})


def _encoded_size(value: Any) -> int:
    return len(_ENCODER.encode(value).encode("utf-8", "backslashreplace"))


def _shrink(value: Any, size: int, by: int) -> Any:
    """``value`` (of encoded ``size`` bytes) made at least ``by`` bytes smaller."""
    if isinstance(value, str):
        per_char = max(1.0, size / max(1, len(value)))  # escapes and multi-byte characters
        keep = max(0, len(value) - int(by / per_char) - 1)
        return value[:keep] + TRUNCATED
    if isinstance(value, list):
        budget, kept = size - by - 32, 0  # 32: room for the marker
        for item in value:
            budget -= _encoded_size(item) + 1
            if budget < 0:
                break
            kept += 1
        return [*value[:kept], f"{TRUNCATED} {len(value) - kept} more"]
    if isinstance(value, dict):
        return TRUNCATED
    return None


class LineSink:
    """Whole JSON lines to stdout or a file, written by a thread, never by the caller.

    ``write`` encodes the line and queues it; a writer thread drains the queue every
    ``interval`` seconds in batches of whole lines. A file is opened ``O_APPEND``, and
    on a pipe a batch never exceeds ``PIPE_BUF``, so lines from several worker
    processes never interleave.

    A failed write (full disk, closed pipe) or a full queue loses lines; they are
    never raised into a request. Every lost line is counted in ``lost`` and passed to
    ``on_lost``; a loss episode is reported on stderr when it starts
    (``audit.write_failed``) and when writes succeed again (``audit.write_recovered``,
    with how many lines it cost), and :meth:`problems` names it meanwhile. On a file,
    a write cut short by a full disk is undone to its last whole line (under an
    exclusive ``flock`` that every worker's writer takes), so the file never holds a
    torn line: a line is written whole or not at all.
    """

    MAX_PENDING = 100_000

    def __init__(
        self,
        path: str,
        *,
        interval: float = 0.02,
        on_lost: Callable[[int], None] = lambda count: None,
    ) -> None:
        self.path = path
        self.interval = interval
        self.on_lost = on_lost
        self.lost = 0
        self.failures = 0
        self.failing_since: float | None = None  # wall-clock start of the current episode
        self._episode_lost = 0
        self._pending: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()  # one drainer at a time: thread, flush(), close()
        if path == "-":
            self._fd = sys.stdout.fileno()
            self._owned = False
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._owned = True
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._batch = 256 * 1024 if self._regular else select.PIPE_BUF
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def write(self, fields: dict[str, Any]) -> None:
        self.write_line(fit_line(fields))

    def write_line(self, line: bytes) -> None:
        """Queue one encoded line, ending in a newline."""
        if len(self._pending) >= self.MAX_PENDING:
            self._lose(1)
            return
        self._pending.append(line)

    def problems(self) -> list[str]:
        """What is wrong with the audit log now (for /readyz); empty when writes work."""
        since = self.failing_since
        if since is None:
            return []
        started = rfc3339(since)
        return [
            f"audit: writes to {self.path} failing since {started}; "
            f"{self._episode_lost} lines lost so far"
        ]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> None:
        """Write everything queued so far."""
        with self._lock:
            while self._pending:
                batch = [self._pending.popleft()]
                size = len(batch[0])
                while self._pending and size + len(self._pending[0]) <= self._batch:
                    line = self._pending.popleft()
                    batch.append(line)
                    size += len(line)
                self._write(b"".join(batch), len(batch))

    def _write(self, data: bytes, lines: int) -> None:
        written = 0
        try:
            if self._regular:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                start = os.lseek(self._fd, 0, os.SEEK_END) if self._regular else 0
                view = memoryview(data)
                while written < len(data):
                    written += os.write(self._fd, view[written:])
            except OSError as exc:
                whole = data.rfind(b"\n", 0, written) + 1  # what ends in a newline stays
                if self._regular and whole < written:
                    self._undo(start + whole)
                self._failed(exc, lines - data.count(b"\n", 0, whole))
                return
            finally:
                if self._regular:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:  # flock or lseek themselves failed: nothing was written
            self._failed(exc, lines)
            return
        if self.failing_since is not None:
            log_event(
                "audit.write_recovered",
                path=self.path,
                lost=self._episode_lost,
                seconds=round(time.time() - self.failing_since, 3),
            )
            self.failing_since = None
            self._episode_lost = 0

    def _undo(self, size: int) -> None:
        """Cut a torn last line off the file (the lock keeps other workers out)."""
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            log_event("audit.truncate_failed", path=self.path, error=str(exc))

    def _failed(self, exc: OSError, lines: int) -> None:
        self.failures += 1
        if self.failing_since is None:
            self.failing_since = time.time()
            log_event("audit.write_failed", path=self.path, error=str(exc), lost=lines)
        self._lose(lines)

    def _lose(self, lines: int) -> None:
        self.lost += lines
        self._episode_lost += lines
        self.on_lost(lines)

    def reopen(self) -> None:
        """Write to a fresh file at ``path`` (after logrotate moved the old one away)."""
        if not self._owned:
            return
        self.flush()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:  # keep writing where we were rather than lose lines
            log_event("audit.reopen_failed", path=self.path, error=str(exc))
            return
        with self._lock:
            old, self._fd = self._fd, fd
            os.close(old)
        log_event("audit.reopened", path=self.path)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self.flush()
        if self._owned:
            os.close(self._fd)
            self._owned = False


class AuditLog:
    """Structured audit events: ``emit("token.issued", client_id=..., jti=...)``."""

    def __init__(self, sink: LineSink) -> None:
        self.sink = sink

    def emit(self, event: str, **fields: Any) -> None:
        self.sink.write({"ts": rfc3339_now(), "event": event, **fields})


class EventLimiter:
    """Says when an event that may repeat fast (an attacker's doing, a failing peer) is
    due on stderr again: at most once per ``every`` seconds per key."""

    def __init__(self, every: float = 10.0, clock: Any = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._state: dict[Any, tuple[float, int]] = {}  # key -> last report, since then

    def due(self, key: Any) -> int | None:
        """None if ``key`` was reported within ``every`` seconds (this one is counted);
        otherwise how many went unreported since the last report."""
        now = self.clock()
        last, unreported = self._state.get(key, (now - self.every, 0))
        if now - last < self.every:
            self._state[key] = (last, unreported + 1)
            return None
        self._state[key] = (now, 0)
        return unreported


# --------------------------------------------------------------------------- levels

LOG_LEVEL_ENV = "TOKENGATE_LOG_LEVEL"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
DEFAULT_LEVEL = "info"

# The level of each operational event that is not ``info``. An event missing here is
# ``info``; a call may still pass ``level=`` where one event name covers several.
EVENT_LEVELS: dict[str, str] = {
    # something is broken: requests fail, lines are lost, a process cannot start
    "startup_failed": "error",
    "worker.failed_to_start": "error",
    "authserver.internal_error": "error",
    "gateway.internal_error": "error",
    "portal.internal_error": "error",
    "authserver.store_unavailable": "error",
    "audit.write_failed": "error",
    "audit.truncate_failed": "error",
    "audit.reopen_failed": "error",
    "keys.reload_failed": "error",
    "config.reload_failed": "error",
    "metrics.publish_failed": "error",
    # worth a look; tokengate carries on (stale keys, a refused client, a new worker)
    "jwks.fetch_failed": "warning",
    "gateway.revocation_feed_failed": "warning",
    "client_jwks.fetch_failed": "warning",
    "gateway.upstream_failed": "warning",
    "gateway.issuer_not_ready": "warning",
    "portal.issuer_unavailable": "warning",
    "portal.id_token_refused": "warning",
    "portal.cookie_too_large": "warning",
    "portal.userinfo_failed": "warning",
    "portal.revoke_failed": "warning",
    "listener.refused": "warning",
    "limits.fd_limit_low": "warning",
    "worker.replaced": "warning",
    "shutdown.forced": "warning",
    # routine detail
    "keys.reloaded": "debug",
}


def log_level_problem(value: str | None) -> str | None:
    """What is wrong with ``value`` as a ``TOKENGATE_LOG_LEVEL``, if anything (unset
    or empty is the default, ``info``; any case is fine)."""
    if not value or value.strip().lower() in LEVELS:
        return None
    return f"{LOG_LEVEL_ENV}: must be one of {', '.join(LEVELS)}; got {value!r}"


def level_from_env(environ: Any = None) -> str:
    """The level ``TOKENGATE_LOG_LEVEL`` names; ``info`` when unset or invalid (the
    command line refuses an invalid one before anything logs)."""
    value = (os.environ if environ is None else environ).get(LOG_LEVEL_ENV)
    if not value or log_level_problem(value) is not None:
        return DEFAULT_LEVEL
    return str(value).strip().lower()


_threshold = LEVELS[level_from_env()]  # worker processes read it from the environment too


def set_log_level(level: str) -> None:
    """Drop operational events below ``level`` from now on."""
    global _threshold
    _threshold = LEVELS[level]


def log_level() -> str:
    """The level in effect."""
    return next(name for name, number in LEVELS.items() if number == _threshold)


def log_event(event: str, *, level: str | None = None, **fields: Any) -> None:
    """An operational event on stderr as one JSON line, unless it is below the level
    in effect. ``level``: this event's, when it differs from :data:`EVENT_LEVELS`."""
    level = level or EVENT_LEVELS.get(event, DEFAULT_LEVEL)
    if LEVELS[level] < _threshold:
        return
    line = encode_line({"ts": rfc3339_now(), "event": event, "level": level, **fields}).decode()
    try:
        sys.stderr.write(line)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def traceback_frames(exc: BaseException) -> str:
    """The traceback's frames (file, line, function, code) and the exception type, but
    not its message: a message may quote request data such as a token or a secret."""
    frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
    return f"Traceback (most recent call last):\n{frames}{type(exc).__qualname__}"


class JsonFormatter(logging.Formatter):
    """Library log records (uvicorn, asyncio) as JSON lines like our own."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": rfc3339_now(),
            "event": "log",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            fields["error"] = f"{type(exc).__name__}: {exc}"
            fields["traceback"] = self.formatException(record.exc_info)
        return _ENCODER.encode(fields)


def uvicorn_log_level() -> str:
    """uvicorn's logging level for the level in effect. Its info messages (started,
    waiting for application startup, finished) repeat tokengate's own ``listening``
    and ``shutdown`` events once per listener and worker: they show at ``debug`` only."""
    if _threshold <= logging.DEBUG:
        return "debug"
    return "error" if _threshold >= logging.ERROR else "warning"


def configure_logging() -> None:
    """Library loggers as JSON lines on stderr: uvicorn's at :func:`uvicorn_log_level`,
    every other library's warnings and errors (or errors only, at ``error``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_threshold, logging.WARNING))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
        logging.getLogger(name).setLevel(uvicorn_log_level().upper())
