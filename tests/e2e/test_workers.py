"""``tokengate run --workers 2`` under faults of its processes: a drain that refuses
new connections at once, workers that die with a killed supervisor, and metric
tallies that outlive a killed worker. Real processes on loopback sockets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Tokengate
from tests.e2e.test_gateway_process import Stack, start_stack

METRICS_PREFIX = "tokengate-metrics-"

# --------------------------------------------------------------------------- processes


def wait_for(condition: Callable[[], bool], timeout: float, every: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a zombie holds no socket)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()  # not the resource tracker
    ]


def processes_under(directory: Path) -> list[int]:
    """Every process whose working directory is in ``directory``: each process these
    tests start runs in one below tmp_path, and workers inherit it, orphans too."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "cwd")).is_relative_to(directory):
                found.append(int(entry.name))
    return found


@pytest.fixture
def workers_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start ``--workers 2`` stacks whose temporary files (the metrics directory) go to
    ``tmp_path / "tmp"``; at the end, kill every process started here, orphans too."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    started: list[Stack] = []

    def make(**kwargs: Any) -> Stack:
        stack = start_stack(tmp_path, "--workers", "2", **kwargs)
        started.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in started:
            for process in (stack.main, stack.upstream):
                if process.proc is not None and process.proc.poll() is None:
                    process.proc.kill()
                    process.proc.wait()
        for pid in processes_under(tmp_path):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def events(process: Tokengate, name: str) -> list[dict[str, Any]]:
    """Its stderr events called ``name``, from whole lines only (it may be writing)."""
    lines = process.stderr().splitlines(keepends=True)
    whole = [json.loads(x) for x in lines if x.startswith("{") and x.endswith("\n")]
    return [e for e in whole if e["event"] == name]


def ready(stack: Stack) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{stack.admin}/readyz", timeout=1).status_code == 200
    return False


def metrics_dirs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "tmp").glob(METRICS_PREFIX + "*"))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- a drain


def connect_during_drain(port: int) -> tuple[str, float]:
    """One new connection with a request on it: what became of it, and how long it took."""
    began = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            try:
                outcome = "answered" if sock.recv(64) else "closed"
            except ConnectionResetError:
                outcome = "reset"
            except TimeoutError:
                outcome = "hung"
    except ConnectionRefusedError:
        outcome = "refused"
    return outcome, time.monotonic() - began


def slow_request(stack: Stack, token: str, seconds: float, result: list[Any]) -> threading.Thread:
    """A request the upstream answers after ``seconds``, in a thread; its status (or the
    error) is appended to ``result``."""

    def call() -> None:
        try:
            response = httpx.get(
                f"{stack.gateway}/bulk/x?delay={seconds}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=15,
            )
            result.append(response.status_code)
        except httpx.HTTPError as exc:
            result.append(repr(exc))

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)  # the request is with the upstream
    return thread


def shutdowns(stack: Stack) -> list[dict[str, Any]]:
    return events(stack.main, "shutdown")


def test_a_drain_refuses_new_connections_at_once(workers_stack: Any) -> None:
    """SIGTERM to the supervisor: it passes it on at once, and from then on a new
    connection is refused by the kernel (not accepted by it for nobody, then reset),
    while the request in flight finishes."""
    stack = workers_stack()
    assert stack.main.proc is not None
    workers = worker_pids(stack.main.proc.pid)
    result: list[Any] = []
    in_flight = slow_request(stack, stack.token(), 3, result)

    signalled = time.monotonic()
    stack.main.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: len(shutdowns(stack)) == 2, 5), stack.main.stderr()
    forwarded_after = time.monotonic() - signalled
    assert sorted(e["pid"] for e in shutdowns(stack)) == sorted(workers)

    time.sleep(0.05)
    outcomes = [connect_during_drain(port_of(stack.gateway)) for _ in range(40)]
    assert [o for o, _ in outcomes] == ["refused"] * 40, outcomes
    assert max(s for _, s in outcomes) < 0.5, outcomes
    assert stack.main.proc.poll() is None  # still draining: the test saw the drain
    assert forwarded_after < 0.3, forwarded_after  # not on the supervisor's next poll

    in_flight.join()
    assert result == [200]
    assert stack.main.proc.wait(timeout=10) == 0


def test_sigterm_to_every_process_at_once_still_drains(workers_stack: Any) -> None:
    """What systemd does by default (KillMode=control-group), and Ctrl-C in a terminal
    (to the process group): each worker gets the signal both directly and from the
    supervisor. The second SIGTERM must not cut the in-flight requests short."""
    stack = workers_stack()
    assert stack.main.proc is not None
    workers = worker_pids(stack.main.proc.pid)
    result: list[Any] = []
    in_flight = slow_request(stack, stack.token(), 1.5, result)
    for pid in [stack.main.proc.pid, *workers]:
        os.kill(pid, signal.SIGTERM)
    in_flight.join()
    assert result == [200]
    assert stack.main.proc.wait(timeout=10) == 0
    assert events(stack.main, "shutdown.forced") == []


# --------------------------------------------------------------------------- kill -9


NO_PDEATHSIG = """\
# Imported at the start of every Python process of the test (PYTHONPATH): workers
# then rely on their check of the parent pid alone, as where prctl is unavailable.
import tokengate.serve

tokengate.serve.set_parent_death_signal = lambda: None
"""


@pytest.mark.parametrize("how", ["pdeathsig", "parent_check"])
def test_workers_die_with_a_killed_supervisor(
    how: str, workers_stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the supervisor: the workers go too (no orphan keeps the ports), a
    new start can bind them, and it removes the dead supervisor's metrics directory."""
    if how == "parent_check":
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(NO_PDEATHSIG)
        monkeypatch.setenv(
            "PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
        )
    stack = workers_stack()
    assert stack.main.proc is not None
    supervisor = stack.main.proc.pid
    workers = worker_pids(supervisor)
    assert len(workers) == 2
    (old_dir,) = metrics_dirs(tmp_path)

    stack.main.proc.kill()
    stack.main.proc.wait()
    assert wait_for(lambda: not any(running(pid) for pid in workers), 6, every=0.05), [
        pid for pid in workers if running(pid)
    ]
    reasons = {e.get("reason", e.get("signal")) for e in shutdowns(stack)}
    if how == "parent_check":
        assert reasons == {"supervisor_exited"}
    else:  # the signal, unless a busy machine let a worker's own check notice first
        assert "SIGTERM" in reasons and reasons <= {"SIGTERM", "supervisor_exited"}
    assert old_dir.exists()  # nobody could remove it ...
    assert (old_dir / "supervisor.pid").read_text().split()[0] == str(supervisor)

    # ... until the next start, on the very same ports
    (tmp_path / "again").mkdir()
    config = yaml.safe_load(stack.main.config_path.read_text())
    again = Tokengate(tmp_path / "again", config, "--workers", "2")
    try:
        again.start(f"{stack.admin}/readyz")
        assert not old_dir.exists()
        (new_dir,) = metrics_dirs(tmp_path)
        assert again.proc is not None
        assert (new_dir / "supervisor.pid").read_text().split()[0] == str(again.proc.pid)
        removed = events(again, "metrics.stale_dir_removed")
        assert [e["path"] for e in removed] == [str(old_dir)]
        assert httpx.get(f"{stack.gateway}/health").status_code == 200
    finally:
        if again.proc is not None and again.proc.poll() is None:
            again.proc.kill()
            again.proc.wait()


# --------------------------------------------------------------------------- metrics


def requests_counted(stack: Stack) -> float:
    text = httpx.get(f"{stack.admin}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tokengate_gateway_requests_total"
    )


def test_a_killed_workers_published_tallies_survive(workers_stack: Any) -> None:
    """Workers publish their request tallies every second: a kill -9 loses at most the
    last second's. Both workers are killed, so whichever served a request, it counts."""
    stack = workers_stack()
    assert stack.main.proc is not None
    workers = worker_pids(stack.main.proc.pid)
    sent = 60
    for _ in range(sent):  # a new connection each: the kernel spreads them over workers
        assert httpx.get(f"{stack.gateway}/orders/1").status_code == 401
    time.sleep(1.5)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: len(events(stack.main, "worker.replaced")) == 2, 10, every=0.05)
    assert wait_for(lambda: ready(stack), 20, every=0.05)
    assert set(worker_pids(stack.main.proc.pid)).isdisjoint(workers)
    assert requests_counted(stack) == sent
    assert stack.main.stop() == 0
