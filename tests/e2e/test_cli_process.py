"""The ``tokengate`` console script as a real process: --version, exit codes, `keys`
run from another directory against a running server, a busy port as one JSON line,
TOKENGATE_LOG_LEVEL, and `tokengate schema`."""

from __future__ import annotations

import contextlib
import importlib.metadata
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

from tests.e2e.conftest import free_port
from tests.unit.test_cli import write_config
from tokengate.schema import config_schema

TOKENGATE = str(Path(sys.executable).parent / "tokengate")  # the installed console script


def tokengate(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOKENGATE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = text.splitlines()
    assert lines and all(line.startswith("{") for line in lines), text  # JSON lines only
    return [json.loads(line) for line in lines]


@contextlib.contextmanager
def serving(
    config: Path, ready_url: str, *, cwd: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """``tokengate run -c config`` from ``cwd``, until it answers ``ready_url``."""
    proc = subprocess.Popen(
        [TOKENGATE, "run", "-c", str(config)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "tokengate did not become ready"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def authserver_config(directory: Path, port: int, data_dir: str) -> Path:
    return write_config(directory, data_dir, listen=f"127.0.0.1:{port}", jwks_max_age="1s")


def test_version(tmp_path: Path) -> None:
    result = tokengate("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tokengate {importlib.metadata.version('tokengate')}\n"


def test_keys_from_another_directory_reach_the_running_server(tmp_path: Path) -> None:
    """The issue: a relative data_dir followed the working directory, so `keys rotate`
    run elsewhere made a new, empty store that the running server never saw."""
    port = free_port()
    etc, run_dir, shell = tmp_path / "etc", tmp_path / "run", tmp_path / "shell"
    config = authserver_config(etc, port, "data")
    run_dir.mkdir()
    shell.mkdir()
    jwks_uri = f"http://127.0.0.1:{port}/oauth2/default/v1/keys"
    with serving(Path("../etc/tokengate.yaml"), jwks_uri, cwd=run_dir) as proc:
        assert (etc / "data" / "tokengate.sqlite3").is_file()  # next to the config
        assert list(run_dir.iterdir()) == []
        (old_kid,) = {k["kid"] for k in httpx.get(jwks_uri).json()["keys"]}

        rotated = tokengate("keys", "rotate", "-c", str(config), cwd=shell)
        assert rotated.returncode == 0, rotated.stderr
        new_kid = rotated.stdout.split("next key ")[1].split()[0]
        deadline = time.monotonic() + 10
        published: set[str] = set()
        while new_kid not in published and time.monotonic() < deadline:
            published = {k["kid"] for k in httpx.get(jwks_uri).json()["keys"]}
            time.sleep(0.1)
        assert published == {old_kid, new_kid}  # the running server saw it

        listing = tokengate("keys", "list", "-c", "../etc/tokengate.yaml", cwd=shell)
        assert listing.returncode == 0, listing.stderr
        assert {row.split()[1] for row in listing.stdout.splitlines()[1:]} == published
        assert list(shell.iterdir()) == [] and not (tmp_path / "data").exists()
    assert proc.returncode == 0


@pytest.mark.parametrize("action", ["list", "rotate"])
def test_keys_refuse_to_create_a_store(tmp_path: Path, action: str) -> None:
    config = authserver_config(tmp_path / "etc", free_port(), "data")
    result = tokengate("keys", action, "-c", str(config), cwd=tmp_path)
    assert result.returncode == 3
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"authserver.data_dir: no store in {tmp_path / 'etc' / 'data'} ")
    assert not (tmp_path / "etc" / "data").exists() and not (tmp_path / "data").exists()


def test_run_still_creates_the_data_dir_on_first_start(tmp_path: Path) -> None:
    port = free_port()
    config = authserver_config(tmp_path / "etc", port, "nested/data")
    url = f"http://127.0.0.1:{port}/oauth2/default/v1/keys"
    with serving(config, url, cwd=tmp_path):
        assert (tmp_path / "etc" / "nested" / "data" / "tokengate.sqlite3").is_file()
    listing = tokengate("keys", "list", "-c", str(config), cwd=tmp_path)
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == 2


def test_a_busy_port_is_one_json_line_per_listener(tmp_path: Path) -> None:
    with socket.socket() as busy, socket.socket() as other:
        for sock in (busy, other):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        gateway_port, echo_port = busy.getsockname()[1], other.getsockname()[1]
        admin_port = free_port()
        path = tmp_path / "tokengate.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "gateway": {
                        "listen": f"127.0.0.1:{gateway_port}",
                        "routes": [
                            {
                                "name": "h",
                                "match": {"path": "/h"},
                                "upstream": "http://e",
                                "public": True,
                            }
                        ],
                    },
                    "admin": {"listen": f"127.0.0.1:{admin_port}"},
                    "echo": {"listen": f"127.0.0.1:{echo_port}"},
                }
            )
        )
        result = tokengate("run", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 3
    events = json_lines(result.stderr)
    assert [(e["event"], e["level"], e["listener"], e["address"]) for e in events] == [
        ("startup_failed", "error", "gateway", f"127.0.0.1:{gateway_port}"),
        ("startup_failed", "error", "echo", f"127.0.0.1:{echo_port}"),
    ]
    for event in events:
        assert event["error"] == "cannot listen: address already in use"
        assert event["errno"] == "EADDRINUSE"
    with socket.socket() as probe:  # the listener that could be bound was let go
        probe.bind(("127.0.0.1", admin_port))


def echo_config(tmp_path: Path) -> tuple[Path, str]:
    admin = free_port()
    path = tmp_path / "tokengate.yaml"
    config = {
        "echo": {"listen": f"127.0.0.1:{free_port()}"},
        "admin": {"listen": f"127.0.0.1:{admin}"},
    }
    path.write_text(yaml.safe_dump(config))
    return path, f"http://127.0.0.1:{admin}/healthz"


def test_an_invalid_log_level_is_refused_at_start(tmp_path: Path) -> None:
    path, _ = echo_config(tmp_path)
    for command in ("run", "check"):
        result = tokengate(
            command, "-c", str(path), cwd=tmp_path, env={"TOKENGATE_LOG_LEVEL": "chatty"}
        )
        assert result.returncode == 2
        assert result.stderr == (
            "TOKENGATE_LOG_LEVEL: must be one of debug, info, warning, error; got 'chatty'\n"
        )


@pytest.mark.parametrize(
    ("level", "shown"),
    [("", {"info"}), ("warning", set()), ("debug", {"info"})],
)
def test_the_log_level_filters_stderr(tmp_path: Path, level: str, shown: set[str]) -> None:
    path, ready = echo_config(tmp_path)
    with serving(path, ready, cwd=tmp_path, env={"TOKENGATE_LOG_LEVEL": level}) as proc:
        pass
    assert proc.returncode == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    if not shown:  # listening and shutdown are info: nothing at all
        assert err == ""
        return
    events = json_lines(err)
    ours = [e for e in events if e["event"] != "log"]
    assert {e["level"] for e in ours} == shown
    assert {e["event"] for e in ours} == {"listening", "shutdown"}
    uvicorn = [e for e in events if e["event"] == "log"]
    if level == "debug":  # uvicorn's own start and stop messages too
        assert uvicorn and {e["logger"] for e in uvicorn} == {"uvicorn.error"}
    else:
        assert uvicorn == []


def test_schema_prints_the_config_schema(tmp_path: Path) -> None:
    result = tokengate("schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == config_schema()
