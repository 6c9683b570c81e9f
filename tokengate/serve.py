"""``tokengate run``: serve every configured listener, in one process or N workers.

Sockets are bound once by the parent, so workers share them and a port conflict
is reported before any worker starts. Each process runs every listener in one
event loop; SIGTERM/SIGINT stop accepting, let in-flight requests finish, exit 0.

With workers, the supervisor keeps its copies of the listening sockets only to hand
them to a replacement worker: a drain starts by closing them, so that once the
workers have closed theirs too, a new connection is refused at once instead of
being completed by the kernel for nobody to accept. Workers die with their
supervisor (``PR_SET_PDEATHSIG`` where there is one, and a check of the parent pid
every second everywhere): a ``kill -9`` of the supervisor leaves no worker holding
the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
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
import stat
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
from tokengate.httpserver import REFUSAL_REASONS, GuardedProtocol
from tokengate.jsonlog import (
    AuditLog,
    EventLimiter,
    LineSink,
    configure_logging,
    log_event,
    uvicorn_log_level,
)
from tokengate.limits import ECHO_LIMITS, Limits
from tokengate.metrics import MULTIPROC_ENV, Metrics
from tokengate.ratelimit import RateLimiter
from tokengate.reload import Apply, ConfigWatcher
from tokengate.yamlconf import ConfigErrors, Listen

GC_THRESHOLD = 20_000  # allocations between young-generation collections (default 700)
DRAIN_TIMEOUT = 30  # seconds in-flight requests get after SIGTERM
STARTUP_FAILURE = 3
EARLY_EXIT_WINDOW = 10  # a worker exiting with an error this soon failed to start
FD_RESERVE = 256  # descriptors kept for files, the store, JWKS fetches and the like
REPORT_EVERY = 10.0  # seconds between stderr reports of one listener's refusals
PARENT_CHECK_EVERY = 1.0  # seconds between a worker's checks that its supervisor lives
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
METRICS_DIR_PREFIX = "tokengate-metrics-"
SUPERVISOR_PID_FILE = "supervisor.pid"  # in the metrics directory: whose it is


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
    if config.echo is not None and only in (None, "gateway"):  # the gateway's demo upstream
        out.append(Listener("echo", config.echo.listen))
    if config.portal is not None and only is None:
        out.append(Listener("portal", config.portal.listen))
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
        for reason in REFUSAL_REASONS:  # every series at 0 from the start
            metrics.listener_refusals.labels(listener, reason)

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
    # one per process, for every listener's limits
    limiter = RateLimiter(config.redis, on_fallback=metrics.ratelimit_fallbacks.inc)
    degraded.append(limiter.degraded)  # Redis down: limits per process, still serving
    if "authserver" in names and config.authserver is not None:
        from authserver.app import create_app as authserver_app
        from authserver.throttle import throttle_link

        # failed authentications, counted across processes in the same Redis
        throttle_redis = throttle_link(config.redis)
        authserver = authserver_app(
            config.authserver,
            audit=audit,
            metrics=metrics,
            limiter=limiter,
            throttle_redis=throttle_redis,
        )
        apps["authserver"] = authserver
        checks.append(authserver.services.not_ready)
        degraded.append(throttle_redis.degraded)
    if "gateway" in names and config.gateway is not None:
        from gateway.app import create_app as gateway_app

        gateway = gateway_app(config.gateway, audit=audit, metrics=metrics, limiter=limiter)
        apps["gateway"] = gateway
        checks.append(gateway.not_ready)
        degraded.append(gateway.degraded)
    if "admin" in names:
        apps["admin"] = AdminApp(metrics, checks, degraded)
    if "echo" in names:
        from tokengate.echo import EchoApp

        apps["echo"] = EchoApp()
    if "portal" in names and config.portal is not None:
        from tokengate.portal.app import PortalApp

        apps["portal"] = PortalApp(config.portal)
    return apps, audit, metrics


def applier(current: Config, apps: dict[str, Any]) -> Apply:
    """How a reloaded config reaches the running apps; names what needs a restart."""
    state = {"config": current}

    async def apply(new: Config) -> list[str]:
        old = state["config"]
        restart = []
        for name in ("authserver", "gateway", "admin", "echo", "portal"):
            before, after = getattr(old, name), getattr(new, name)
            if (before is None) != (after is None):
                restart.append(f"{name}: adding or removing a section needs a restart")
            elif before is not None and before.listen != after.listen:
                restart.append(f"{name}.listen: changing a listen address needs a restart")
            elif before is not None and getattr(before, "limits", None) != getattr(
                after, "limits", None
            ):
                restart.append(f"{name}.limits: changing listener limits needs a restart")
        if old.portal is not None and new.portal is not None and old.portal != new.portal:
            restart.append("portal: changing the portal section needs a restart")
        if old.audit != new.audit:
            restart.append("audit.path: changing the audit sink needs a restart")
        if old.redis != new.redis:
            restart.append("redis: changing the Redis URL needs a restart")
        if "authserver" in apps and new.authserver is not None:
            await apps["authserver"].reconfigure(new.authserver)
        if "gateway" in apps and new.gateway is not None:
            await apps["gateway"].reconfigure(new.gateway)
        state["config"] = new
        return restart

    return apply


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def bind_all(plan: list[Listener]) -> dict[str, socket.socket] | None:
    """Every listener's socket; or None, once each one that could not be bound is a
    ``startup_failed`` event naming the listener, its address and why (nothing is left
    bound then)."""
    sockets: dict[str, socket.socket] = {}
    failed = False
    for item in plan:
        try:
            sockets[item.name] = bind(item.listen)
        except OSError as exc:
            failed = True
            log_event(
                "startup_failed",
                listener=item.name,
                address=str(item.listen),
                error=f"cannot listen: {_os_error(exc)}",
                errno=errno.errorcode.get(exc.errno or 0),
            )
    if failed:
        for sock in sockets.values():
            sock.close()
        return None
    return sockets


def _os_error(exc: OSError) -> str:
    """``address already in use``: an OSError's reason, without its ``[Errno N]``."""
    if isinstance(exc, socket.gaierror):  # a host name that does not resolve
        return f"cannot resolve the host ({exc.strerror or exc})"
    return (exc.strerror or str(exc)).lower()


class QuietServer(uvicorn.Server):
    """A uvicorn server whose signals are handled by :func:`serve_all`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_all(
    config: Config,
    sockets: dict[str, socket.socket],
    config_path: Path | None = None,
    parent: int | None = None,
) -> None:
    """Serve every listener until a signal, or until the supervisor ``parent`` is gone."""
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
            log_level=uvicorn_log_level(),  # TOKENGATE_LOG_LEVEL, see jsonlog
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

    def drain() -> None:
        """Stop accepting now, then let uvicorn finish the in-flight requests."""
        for app in apps.values():  # the authserver's held feed requests answer at once;
            told = getattr(app, "drain", None)  # a gateway still starting stops waiting
            if told is not None:
                told()
        for server, _ in servers:
            server.should_exit = True
            # uvicorn closes its listeners when its main loop next looks (every 0.1 s);
            # closing them here refuses new connections from this moment on.
            for listening in getattr(server, "servers", ()):
                listening.close()

    def stop(sig: signal.Signals) -> None:
        if any(server.should_exit for server, _ in servers):
            # Already draining. A second Ctrl-C means "now"; a second SIGTERM does not: a
            # worker gets SIGTERM both from its supervisor and from a kill of its whole
            # process group or cgroup (systemd's default), and must still drain.
            if sig == signal.SIGINT:
                log_event("shutdown.forced", signal=sig.name, pid=os.getpid())
                for server, _ in servers:
                    server.force_exit = True
            return
        log_event("shutdown", signal=sig.name, pid=os.getpid())
        drain()

    async def watch_parent(pid: int) -> None:
        """Drain once the supervisor is gone (where PR_SET_PDEATHSIG did not say so)."""
        while True:
            await asyncio.sleep(PARENT_CHECK_EVERY)
            if os.getppid() != pid:
                break
        if not any(server.should_exit for server, _ in servers):
            log_event("shutdown", reason="supervisor_exited", supervisor=pid, pid=os.getpid())
            drain()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    parent_task = None if parent is None else asyncio.create_task(watch_parent(parent))
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
        if parent_task is not None:
            parent_task.cancel()
        publisher.cancel()
        metrics.publish()
        audit.sink.close()


def run_process(
    config: Config,
    sockets: dict[str, socket.socket],
    config_path: Path | None = None,
    parent: int | None = None,
) -> None:
    """Serve until a signal; exits STARTUP_FAILURE if the data dir or store is unusable."""
    from authserver.store import StoreUnavailable  # stdlib only: cheap for a gateway too

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_all(config, sockets, config_path, parent))
    except (OSError, sqlite3.Error, StoreUnavailable) as exc:
        log_event("startup_failed", error=f"{type(exc).__name__}: {exc}")
        sys.exit(STARTUP_FAILURE)


def set_parent_death_signal() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _worker(config_path: str, sockets: dict[str, socket.socket], supervisor: int) -> None:
    # A worker dies with its supervisor: by PR_SET_PDEATHSIG at once where there is
    # one, and by serve_all's check of the parent pid every second everywhere.
    set_parent_death_signal()
    if os.getppid() != supervisor:  # it died before that took effect
        sys.exit(0)
    try:
        config = load_config(Path(config_path))
    except ConfigErrors as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    run_process(config, sockets, Path(config_path), parent=supervisor)


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, from /proc), to tell a reused pid."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat_line.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22, starttime


def _supervisor_record() -> str:
    return f"{os.getpid()} {_process_start(os.getpid()) or ''}".strip() + "\n"


def _supervisor_gone(record: str) -> bool:
    """Whether the supervisor a metrics directory's record names is no longer running."""
    pid_text, _, start = record.strip().partition(" ")
    try:
        pid = int(pid_text)
    except ValueError:
        return False  # not ours to judge
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    current = _process_start(pid)
    return bool(start) and current is not None and current != start  # the pid was reused


def remove_stale_metrics_dirs() -> None:
    """Remove the metrics directories of supervisors that died without cleaning up
    (``kill -9``): only this user's, and only those whose supervisor is gone."""
    for path in Path(tempfile.gettempdir()).glob(METRICS_DIR_PREFIX + "*"):
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            record = (path / SUPERVISOR_PID_FILE).read_text()
        except OSError:
            continue  # not a directory of ours, or one whose supervisor is just starting
        if _supervisor_gone(record):
            shutil.rmtree(path, ignore_errors=True)
            log_event("metrics.stale_dir_removed", path=str(path), supervisor=record.split()[0])


def run(config_path: Path, config: Config, *, workers: int = 1, only: str | None = None) -> int:
    plan = listeners(config, only)
    if not plan:
        print(f"nothing to serve: the config has no {only or 'listener'} section", file=sys.stderr)
        return 2
    fd_limit = raise_fd_limit()  # workers inherit it
    needed = descriptors_needed(config, [item.name for item in plan])
    if needed > fd_limit:
        log_event("limits.fd_limit_low", fd_limit=fd_limit, needed=needed, scaled_down=True)
    sockets = bind_all(plan)
    if sockets is None:
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
    remove_stale_metrics_dirs()
    # Workers keep their metrics in files here, so /metrics on any of them sums all.
    # The record of whose it is lets the next start remove it after a kill -9.
    metrics_dir = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)
    try:
        record = Path(metrics_dir) / SUPERVISOR_PID_FILE
        partial = record.with_suffix(".tmp")
        partial.write_text(_supervisor_record())
        partial.replace(record)  # whole or absent, never half-written
        os.environ[MULTIPROC_ENV] = metrics_dir
        return _supervise(str(config_path), sockets, workers)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(config_path: str, sockets: dict[str, socket.socket], workers: int) -> int:
    """Run ``workers`` processes; replace one that crashes; stop all on a signal.

    While serving, the supervisor keeps its copies of the listening sockets to hand to
    a replacement worker. A SIGTERM or SIGINT wakes it at once (a wakeup pipe, not a
    poll); the drain starts by closing those copies, then signals the workers, which
    close theirs: from then on the kernel refuses new connections (instead of
    completing handshakes that nobody accepts) while in-flight requests finish.
    """
    ctx = multiprocessing.get_context("spawn")
    stopping: list[int] = []
    procs: list[tuple[Any, float]] = []
    supervisor = os.getpid()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def spawn() -> tuple[Any, float]:
        proc = ctx.Process(target=_worker, args=(config_path, sockets, supervisor), daemon=False)
        proc.start()
        return proc, time.monotonic()

    def on_signal(sig: int, _frame: object) -> None:
        stopping.append(sig)  # acted upon by the loop below, woken by the wakeup fd

    def forward(sig: int, _frame: object) -> None:  # SIGHUP, SIGUSR1: every worker acts
        for proc, _ in procs:
            if proc.is_alive():
                os.kill(proc.pid, sig)

    def wait(workers: list[Any], timeout: float) -> None:
        """Until one of ``workers`` exits, a signal arrives, or ``timeout`` passes."""
        multiprocessing.connection.wait([wake_r, *(p.sentinel for p in workers)], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(wake_r, 512):
                pass

    def signal_workers(sig: int) -> None:
        for proc, _ in procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    for sig in (signal.SIGHUP, signal.SIGUSR1):
        previous[sig] = signal.signal(sig, forward)
    # Written to by the C-level handler, so a signal that arrives just before wait()
    # blocks still wakes it.
    previous_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    exit_code = 0
    try:
        for _ in range(workers):
            if stopping:
                break
            procs.append(spawn())
        while not stopping:
            wait([p for p, _ in procs], timeout=5.0)
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
        # First stop accepting, then tell the workers: once they have closed their
        # copies too, no new connection is completed by the kernel.
        for sock in sockets.values():
            sock.close()
        forwarded = len(stopping)
        signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT + 5
        while (alive := [p for p, _ in procs if p.is_alive()]) and time.monotonic() < deadline:
            wait(alive, timeout=max(0.0, deadline - time.monotonic()))
            for sig in stopping[forwarded:]:  # a second Ctrl-C forces the workers out
                signal_workers(sig)
            forwarded = len(stopping)
        for proc, _ in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        signal.set_wakeup_fd(previous_wakeup)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(wake_r)
        os.close(wake_w)
    return exit_code
