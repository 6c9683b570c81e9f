"""Run ``tokengate`` as a real process on loopback sockets."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ADMIN_SECRET, REPORTING_SECRET

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Tokengate:
    """A ``tokengate run`` process and its files."""

    def __init__(self, workdir: Path, config: dict[str, Any], *args: str) -> None:
        self.workdir = workdir
        self.config_path = workdir / "tokengate.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.args = args
        self.stdout_path = workdir / "stdout.log"
        self.stderr_path = workdir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tokengate", *args, "-c", str(self.config_path)],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self, ready_url: str, timeout: float = 30) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokengate", "run", "-c", str(self.config_path), *self.args],
            cwd=self.workdir,
            stdout=self.stdout_path.open("wb"),
            stderr=self.stderr_path.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tokengate exited {self.proc.returncode}: {self.stderr()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"tokengate did not become ready: {self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.stderr().splitlines() if x.startswith("{")]


def health_route(upstream: str) -> dict[str, Any]:
    """A public route, /health, to ``upstream``: traffic that needs no token."""
    return {"name": "health", "match": {"path": "/health"}, "upstream": upstream, "public": True}


def e2e_config(data_dir: Path, port: int, **authserver: Any) -> dict[str, Any]:
    return {
        "authserver": {
            "listen": f"127.0.0.1:{port}",
            "data_dir": str(data_dir),
            "servers": [
                {
                    "name": "default",
                    "audience": "api://default",
                    "access_token_ttl": "5m",
                    "scopes": ["orders:read", "orders:write"],
                }
            ],
            "clients": [
                {"client_id": "reporting", "secret": REPORTING_SECRET, "scopes": ["orders:read"]},
                {"client_id": "admin", "secret": ADMIN_SECRET, "introspect": "any"},
            ],
            **authserver,
        }
    }


@pytest.fixture
def tokengate(tmp_path: Path) -> Iterator[Any]:
    started: list[Tokengate] = []

    def make(config: dict[str, Any], *args: str) -> Tokengate:
        process = Tokengate(tmp_path, config, *args)
        started.append(process)
        return process

    yield make
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()
