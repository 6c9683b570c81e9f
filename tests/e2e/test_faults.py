"""Faults a real deployment meets, against real ``tokengate run`` processes: a full
disk under the audit log (a small tmpfs in a mount namespace of the test's own), and
an outside lock on the store."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import REPORTING_SECRET
from tests.e2e.conftest import e2e_config, free_port, health_route

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to mount a small tmpfs in a private mount namespace",
)


class Contained:
    """``tokengate run`` in a mount namespace of its own, with a small tmpfs at
    ``mount``; the test reaches that filesystem through ``/proc/<pid>/root``."""

    def __init__(self, workdir: Path, config: dict[str, Any], mount: Path, size: str) -> None:
        self.workdir = workdir
        self.mount = mount
        mount.mkdir(parents=True, exist_ok=True)
        path = workdir / "tokengate.yaml"
        path.write_text(yaml.safe_dump(config))
        self.stderr_path = workdir / "stderr.log"
        script = (
            f"mount -t tmpfs -o size={size} tmpfs {mount} && "
            f"exec {sys.executable} -m tokengate run -c {path}"
        )
        self.proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", script],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr_path.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def inside(self, name: str) -> Path:
        """A file on the small filesystem, as the test can reach it."""
        return Path(f"/proc/{self.proc.pid}/root{self.mount}/{name}")

    def fill(self) -> None:
        """Take every free byte of the small filesystem."""
        fd = os.open(self.inside("filler"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)

    def free(self) -> None:
        self.inside("filler").unlink()

    def events(self) -> list[dict[str, Any]]:
        text = self.stderr_path.read_text()
        return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def contained(tmp_path: Path) -> Iterator[Any]:
    started: list[Contained] = []

    def make(config: dict[str, Any], size: str = "1m") -> Contained:
        process = Contained(tmp_path, config, tmp_path / "small", size)
        started.append(process)
        return process

    yield make
    for process in started:
        process.stop()


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tokengate exited"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError("tokengate did not become ready")


def lost_total(admin: str) -> float:
    for line in httpx.get(f"{admin}/metrics").text.splitlines():
        if line.startswith("tokengate_audit_lines_lost_total "):
            return float(line.split()[1])
    return 0.0


def test_a_full_disk_under_the_audit_log_loses_whole_lines_and_says_so(
    contained: Any, tmp_path: Path
) -> None:
    gw, echo, admin = free_port(), free_port(), free_port()
    config = {
        "gateway": {
            "listen": f"127.0.0.1:{gw}",
            "routes": [health_route(f"http://127.0.0.1:{echo}")],
        },
        "echo": {"listen": f"127.0.0.1:{echo}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "audit": {"path": str(tmp_path / "small" / "audit.log")},
    }
    tg = contained(config)
    admin_url = f"http://127.0.0.1:{admin}"
    wait_ready(f"{admin_url}/readyz", tg.proc)
    sent = 0
    with httpx.Client(base_url=f"http://127.0.0.1:{gw}") as client:

        def requests(count: int) -> None:
            nonlocal sent
            for i in range(count):
                # long paths fill pages fast, and make a line cut short likely
                assert client.get("/health", params={"pad": "p" * (100 + i * 7)}).status_code == 200
                sent += 1

        requests(20)
        time.sleep(0.2)
        tg.fill()
        requests(200)  # every one answered: a full disk never fails a request
        deadline = time.monotonic() + 5
        while lost_total(admin_url) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost_total(admin_url) > 0
        ready = httpx.get(f"{admin_url}/readyz").json()
        assert ready["ready"] is True  # audit.required is false: still serving, but said
        assert ready["degraded"] and ready["degraded"][0].startswith(
            f"audit: writes to {config['audit']['path']} failing since "
        )
        failed = [e for e in tg.events() if e["event"] == "audit.write_failed"]
        assert len(failed) == 1 and "No space left" in failed[0]["error"]
        tg.free()
        requests(20)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not [
            e for e in tg.events() if e["event"] == "audit.write_recovered"
        ]:
            time.sleep(0.05)
        recovered = [e for e in tg.events() if e["event"] == "audit.write_recovered"]
        assert len(recovered) == 1 and recovered[0]["lost"] == lost_total(admin_url)
        assert httpx.get(f"{admin_url}/readyz").json()["degraded"] == []
    lines = tg.inside("audit.log").read_bytes().splitlines()
    records = [json.loads(line) for line in lines]  # never a torn line
    requests_logged = [r for r in records if r["event"] == "gateway.request"]
    # every request is accounted for: written whole, or counted as lost
    assert len(requests_logged) + lost_total(admin_url) == sent
    assert requests_logged[-1]["status"] == 200


def test_an_outside_lock_on_the_store_stalls_neither_tokens_nor_the_gateway(
    tmp_path: Path,
) -> None:
    auth, gw, echo, admin = free_port(), free_port(), free_port(), free_port()
    data = tmp_path / "data"
    config = e2e_config(data, auth)
    config["gateway"] = {
        "listen": f"127.0.0.1:{gw}",
        "routes": [health_route(f"http://127.0.0.1:{echo}")],
    }
    config["echo"] = {"listen": f"127.0.0.1:{echo}"}
    config["admin"] = {"listen": f"127.0.0.1:{admin}"}
    config["audit"] = {"path": str(tmp_path / "audit.log")}
    (tmp_path / "tokengate.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokengate", "run", "-c", str(tmp_path / "tokengate.yaml")],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.log").open("wb"),
    )
    try:
        wait_ready(f"http://127.0.0.1:{admin}/readyz", proc)
        issuer = f"http://127.0.0.1:{auth}/oauth2/default"
        reporting = ("reporting", REPORTING_SECRET)

        def token() -> str:
            response = httpx.post(
                f"{issuer}/v1/token", data={"grant_type": "client_credentials"}, auth=reporting
            )
            assert response.status_code == 200
            return response.json()["access_token"]  # type: ignore[no-any-return]

        tokens = [token(), token()]
        locked, release = threading.Event(), threading.Event()

        def hold_lock() -> None:  # a backup or an sqlite3 shell holding the write lock
            db = sqlite3.connect(data / "tokengate.sqlite3", isolation_level=None)
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(10)
            db.execute("ROLLBACK")
            db.close()

        holder = threading.Thread(target=hold_lock)
        holder.start()
        assert locked.wait(10)
        revokes: list[int] = []
        revokers = [
            threading.Thread(
                target=lambda t=t: revokes.append(
                    httpx.post(
                        f"{issuer}/v1/revoke", data={"token": t}, auth=reporting, timeout=30
                    ).status_code
                )
            )
            for t in tokens
        ]
        for r in revokers:
            r.start()
        time.sleep(0.3)  # the revocations now wait on the lock, on the store's thread
        worst_token = worst_gateway = 0.0
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            started = time.monotonic()
            token()
            worst_token = max(worst_token, time.monotonic() - started)
            started = time.monotonic()
            assert httpx.get(f"http://127.0.0.1:{gw}/health").status_code == 200
            worst_gateway = max(worst_gateway, time.monotonic() - started)
        assert revokes == []  # still waiting for the lock
        release.set()
        holder.join()
        for r in revokers:
            r.join(30)
        assert revokes == [200, 200]  # done once the lock was released
        assert worst_token < 0.5 and worst_gateway < 0.5, (worst_token, worst_gateway)
    finally:
        proc.terminate()
        proc.wait(20)
