"""Hot reload: notice a changed config file (or SIGHUP), validate it, swap it in.

The file is polled by its stat signature (device, inode, mtime, size, resolved
path), which also catches Kubernetes ConfigMap updates: those swap a symlink rather
than write the file. An invalid file is refused: its ``path: problem`` lines go to
stderr, ``tokengate_config_reloads_total{result="error"}`` counts it, and the running
configuration keeps serving.

Reading and validating a file runs in a thread, so a big file never stalls requests;
only applying the result runs on the event loop. Whatever goes wrong in a reload, even
a bug, is logged and counted as a refused reload: the watcher keeps watching.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from tokengate.config import Config, load_config
from tokengate.jsonlog import log_event, traceback_frames
from tokengate.metrics import Metrics
from tokengate.yamlconf import ConfigErrors

POLL_INTERVAL = 2.0

Apply = Callable[[Config], Awaitable[list[str]]]  # returns what needs a restart


def signature(path: Path) -> tuple[str, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class ConfigWatcher:
    def __init__(
        self, path: Path, apply: Apply, metrics: Metrics, *, interval: float = POLL_INTERVAL
    ) -> None:
        self.path = path
        self.apply = apply
        self.metrics = metrics
        self.interval = interval
        self._signature = signature(path)
        self._lock = asyncio.Lock()
        self._requested: set[asyncio.Task[bool]] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                if signature(self.path) != self._signature:
                    await self.reload()
            except Exception as exc:  # never expected (reload refuses everything itself)
                self._refused([f"{self.path}: {_UNEXPECTED}"], exc)

    def request(self) -> None:
        """SIGHUP: reload now, whether or not the file changed."""
        task = asyncio.ensure_future(self.reload())
        self._requested.add(task)
        task.add_done_callback(self._requested.discard)

    async def reload(self) -> bool:
        """Load, validate and apply the file; False (logged and counted) if refused."""
        async with self._lock:
            self._signature = signature(self.path)  # a write from now on triggers again
            try:
                config = await asyncio.to_thread(load_config, self.path)
            except ConfigErrors as exc:
                self._refused([str(e) for e in exc.errors])
                return False
            except Exception as exc:  # a bug: refused all the same, never the watcher's end
                self._refused([f"{self.path}: {_UNEXPECTED}"], exc)
                return False
            try:
                restart_needed = await self.apply(config)
            except (OSError, ValueError, RuntimeError) as exc:
                self._refused([str(exc)])
                return False
            except Exception as exc:
                self._refused([f"{self.path}: could not be applied: a bug in tokengate"], exc)
                return False
            self.metrics.config_reloads.labels("ok").inc()
            log_event("config.reloaded", path=str(self.path), restart_needed=restart_needed)
            return True

    def _refused(self, problems: list[str], exc: BaseException | None = None) -> None:
        self.metrics.config_reloads.labels("error").inc()
        details = (
            {}
            if exc is None  # by type and frames: a message could quote a secret
            else {"error": type(exc).__name__, "traceback": traceback_frames(exc)}
        )
        log_event(
            "config.reload_failed",
            path=str(self.path),
            problems=problems,
            action="the previous configuration keeps serving",
            **details,
        )


_UNEXPECTED = "could not be loaded: a bug in tokengate, please report it"
