"""``tokengate run``: serve every configured listener, in one process or N workers.

Sockets are bound once by the parent, so workers share them and a port conflict
is reported before any worker starts. Each process runs every listener in one
event loop; SIGTERM/SIGINT stop accepting, let in-flight requests finish, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from prometheus_client.multiprocess import mark_process_dead

from tokengate.admin import AdminApp, NotReady
from tokengate.asgi import ASGIApp
from tokengate.config import Config, load_config
from tokengate.httpserver import GuardedProtocol
from tokengate.jsonlog import AuditLog, EventLimiter, LineSink, configure_logging, log_event
from tokengate.limits import ECHO_LIMITS, Limits
from tokengate.metrics import MULTIPROC_ENV, Metrics
from tokengate.reload import Apply, ConfigWatcher
from tokengate.yamlconf import ConfigErrors, Listen

GC_THRESHOLD = 20_000  # allocations between young-generation collections (default 700)
DRAIN_TIMEOUT = 30  # seconds in-flight requests get after SIGTERM
STARTUP_FAILURE = 3
EARLY_EXIT_WINDOW = 10  # a worker exiting with an error this soon failed to start
FD_RESERVE = 256  # descriptors kept for files, the store, JWKS fetches and the like
REPORT_EVERY = 10.0  # seconds between stderr reports of one listener's refusals


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    listen: Listen


def listeners(config: Config, only: str | None) -> list[Listener]:
    out = []
    if config.authserver is not None and only in (None, "authserver"):
        out.append(Listener("authserver", config.authserver.listen))
    if config.gateway is not None and only in (None, "gateway"):
        out.append(Listener("gateway", config.gateway.listen))
    if config.admin is not None:
        out.append(Listener("admin", config.admin.listen))
    if config.echo is not None and only is None:
        out.append(Listener("echo", config.echo.listen))
    return out


def listener_limits(config: Config, name: str) -> Limits:
    section = {"authserver": config.authserver, "gateway": config.gateway, "admin": config.admin}
    return getattr(section.get(name), "limits", ECHO_LIMITS)  # the echo has no section of its own


def descriptors_needed(config: Config, names: list[str]) -> int:
    """File descriptors every listener at its connection cap would hold: a gateway
    connection also holds one to its upstream."""
    caps = (
        listener_limits(config, n).max_connections * (2 if n == "gateway" else 1) for n in names
    )
    return sum(caps) + FD_RESERVE


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit; the soft limit in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def fitted_limits(config: Config, names: list[str], fd_limit: int) -> dict[str, Limits]:
    """Each listener's limits, connection caps scaled down to what ``fd_limit`` allows,
    so that a flood is answered 503 instead of failing at the descriptor limit."""
    limits = {name: listener_limits(config, name) for name in names}
    needed = descriptors_needed(config, names) - FD_RESERVE
    room = fd_limit - FD_RESERVE
    if needed <= room:
        return limits
    return {
        name: dataclasses.replace(lim, max_connections=max(1, lim.max_connections * room // needed))
        for name, lim in limits.items()
    }


class RefusalReporter:
    """Counts a listener's refusals, and says so on stderr at most every REPORT_EVERY s."""

    def __init__(self, listener: str, metrics: Metrics) -> None:
        self.listener = listener
        self.metrics = metrics
        self.reports = EventLimiter(REPORT_EVERY)

    def __call__(self, reason: str) -> None:
        self.metrics.listener_refusals.labels(self.listener, reason).inc()
        unreported = self.reports.due(reason)
        if unreported is not None:
            log_event(
                "listener.refused", listener=self.listener, reason=reason, unreported=unreported
            )


def build_apps(config: Config, names: list[str]) -> tuple[dict[str, ASGIApp], AuditLog, Metrics]:
    """One app per listener; each side is imported only when it is served."""
    metrics = Metrics()
    audit = AuditLog(LineSink(config.audit.path, on_lost=metrics.audit_lines_lost.inc))
    apps: dict[str, ASGIApp] = {}
    checks: list[NotReady] = []
    degraded: list[NotReady] = []
    (checks if config.audit.required else degraded).append(audit.sink.problems)
    if "authserver" in names and config.authserver is not None:
        from authserver.app import create_app as authserver_app

        authserver = authserver_app(config.authserver, audit=audit, metrics=metrics)
        apps["authserver"] = authserver
        checks.append(authserver.services.not_ready)
    if "gateway" in names and config.gateway is not None:
        from gateway.app import create_app as gateway_app

        gateway = gateway_app(config.gateway, audit=audit, metrics=metrics)
        apps["gateway"] = gateway
        checks.append(gateway.not_ready)
    if "admin" in names:
        apps["admin"] = AdminApp(metrics, checks, degraded)
    if "echo" in names:
        from tokengate.echo import EchoApp

        apps["echo"] = EchoApp()
    return apps, audit, metrics


def applier(current: Config, apps: dict[str, Any]) -> Apply:
    """How a reloaded config reaches the running apps; names what needs a restart."""
    state = {"config": current}

    async def apply(new: Config) -> list[str]:
        old = state["config"]
        restart = []
        for name in ("authserver", "gateway", "admin", "echo"):
            before, after = getattr(old, name), getattr(new, name)
            if (before is None) != (after is None):
                restart.append(f"{name}: adding or removing a section needs a restart")
            elif before is not None and before.listen != after.listen:
                restart.append(f"{name}.listen: changing a listen address needs a restart")
            elif before is not None and getattr(before, "limits", None) != getattr(
                after, "limits", None
            ):
                restart.append(f"{name}.limits: changing listener limits needs a restart")
        if old.audit != new.audit:
            restart.append("audit.path: changing the audit sink needs a restart")
        if "authserver" in apps and new.authserver is not None:
            apps["authserver"].reconfigure(new.authserver)
        if "gateway" in apps and new.gateway is not None:
            await apps["gateway"].reconfigure(new.gateway)
        state["config"] = new
        return restart

    return apply


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((listen.host, listen.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class QuietServer(uvicorn.Server):
    """A uvicorn server whose signals are handled by :func:`serve_all`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_all(
    config: Config, sockets: dict[str, socket.socket], config_path: Path | None = None
) -> None:
    configure_logging()
    apps, audit, metrics = build_apps(config, list(sockets))
    limits = fitted_limits(config, list(sockets), raise_fd_limit())
    servers = []
    for name, sock in sockets.items():
        protocol = functools.partial(
            GuardedProtocol, limits=limits[name], on_refusal=RefusalReporter(name, metrics)
        )
        uv_config = uvicorn.Config(
            apps[name],
            http=protocol,  # type: ignore[arg-type]
            ws="none",
            lifespan="on",
            access_log=False,
            log_config=None,
            log_level="warning",
            server_header=False,
            proxy_headers=False,  # never trust X-Forwarded-* from a client, even on loopback
            timeout_graceful_shutdown=DRAIN_TIMEOUT,
            date_header=name != "gateway",  # proxied responses keep the upstream's Date
            timeout_keep_alive=30,
            backlog=2048,
        )
        servers.append((QuietServer(uv_config), sock))
    # Everything built so far lives as long as the process: keep it out of every
    # collection, and collect the young generation less often under load.
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
    loop = asyncio.get_running_loop()

    def stop(sig: signal.Signals) -> None:
        log_event("shutdown", signal=sig.name, pid=os.getpid())
        for server, _ in servers:
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    loop.add_signal_handler(signal.SIGUSR1, audit.sink.reopen)  # after logrotate moved it
    watcher_task = None
    if config_path is not None:
        watcher = ConfigWatcher(config_path, applier(config, apps), metrics)
        loop.add_signal_handler(signal.SIGHUP, watcher.request)
        watcher_task = asyncio.create_task(watcher.run())
    publisher = asyncio.create_task(metrics.publish_every())
    try:
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in servers))
    finally:
        if watcher_task is not None:
            watcher_task.cancel()
        publisher.cancel()
        metrics.publish()
        audit.sink.close()


def run_process(
    config: Config, sockets: dict[str, socket.socket], config_path: Path | None = None
) -> None:
    """Serve until a signal; exits STARTUP_FAILURE if the data dir or store is unusable."""
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_all(config, sockets, config_path))
    except (OSError, sqlite3.Error) as exc:
        log_event("startup_failed", error=f"{type(exc).__name__}: {exc}")
        sys.exit(STARTUP_FAILURE)


def _worker(config_path: str, sockets: dict[str, socket.socket]) -> None:
    try:
        config = load_config(Path(config_path))
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    run_process(config, sockets, Path(config_path))


def run(config_path: Path, config: Config, *, workers: int = 1, only: str | None = None) -> int:
    plan = listeners(config, only)
    if not plan:
        print(f"nothing to serve: the config has no {only or 'listener'} section", file=sys.stderr)
        return 2
    fd_limit = raise_fd_limit()  # workers inherit it
    needed = descriptors_needed(config, [item.name for item in plan])
    if needed > fd_limit:
        log_event("limits.fd_limit_low", fd_limit=fd_limit, needed=needed, scaled_down=True)
    try:
        sockets = {item.name: bind(item.listen) for item in plan}
    except OSError as exc:
        print(f"cannot listen: {exc}", file=sys.stderr)
        return STARTUP_FAILURE
    for name, sock in sockets.items():
        host, port = sock.getsockname()[:2]
        log_event("listening", listener=name, address=str(Listen(host, port)), workers=workers)
    if workers == 1:
        try:
            run_process(config, sockets, config_path)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0
    # Workers keep their metrics in files here, so /metrics on any of them sums all.
    metrics_dir = tempfile.mkdtemp(prefix="tokengate-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir
    try:
        return _supervise(str(config_path), sockets, workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(config_path: str, sockets: dict[str, socket.socket], workers: int) -> int:
    """Run ``workers`` processes; replace one that crashes; stop all on a signal."""
    ctx = multiprocessing.get_context("spawn")
    stopping: list[int] = []

    def spawn() -> tuple[Any, float]:
        proc = ctx.Process(target=_worker, args=(config_path, sockets), daemon=False)
        proc.start()
        return proc, time.monotonic()

    def on_signal(sig: int, _frame: object) -> None:
        stopping.append(sig)

    def forward(sig: int, _frame: object) -> None:  # SIGHUP, SIGUSR1: every worker acts
        for proc, _ in procs:
            if proc.is_alive():
                os.kill(proc.pid, sig)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        previous[sig] = signal.signal(sig, forward)
    procs = [spawn() for _ in range(workers)]
    exit_code = 0
    try:
        while not stopping:
            multiprocessing.connection.wait([p.sentinel for p, _ in procs], timeout=0.5)
            for i, (proc, started) in enumerate(procs):
                if proc.is_alive() or stopping:
                    continue
                code = proc.exitcode
                # An exit code > 0 is tokengate's own (2 config, 3 startup): restarting
                # would fail the same way. A signal (crash, OOM kill) gets a new worker.
                if code is not None and code > 0 and time.monotonic() - started < EARLY_EXIT_WINDOW:
                    log_event("worker.failed_to_start", pid=proc.pid, exitcode=code)
                    exit_code = code
                    stopping.append(0)
                    break
                log_event("worker.replaced", pid=proc.pid, exitcode=code)
                mark_process_dead(proc.pid)  # its live gauges no longer count
                procs[i] = spawn()
    finally:
        for proc, _ in procs:
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT + 5
        for proc, _ in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return exit_code
