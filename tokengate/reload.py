"""Hot reload: notice a changed config file (or SIGHUP), validate it, swap it in.

The file is polled by its stat signature (device, inode, mtime, size, resolved
path), which also catches Kubernetes ConfigMap updates: those swap a symlink rather
than write the file. An invalid file is refused: its ``path: problem`` lines go to
stderr, ``tokengate_config_reloads_total{result="error"}`` counts it, and the running
configuration keeps serving.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from tokengate.config import Config, load_config
from tokengate.jsonlog import log_event
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
            if signature(self.path) != self._signature:
                await self.reload()

    def request(self) -> None:
        """SIGHUP: reload now, whether or not the file changed."""
        task = asyncio.ensure_future(self.reload())
        self._requested.add(task)
        task.add_done_callback(self._requested.discard)

    async def reload(self) -> bool:
        async with self._lock:
            self._signature = signature(self.path)  # a write from now on triggers again
            try:
                config = load_config(self.path)
            except ConfigErrors as exc:
                self._refused([str(e) for e in exc.errors])
                return False
            try:
                restart_needed = await self.apply(config)
            except (OSError, ValueError, RuntimeError) as exc:
                self._refused([str(exc)])
                return False
            self.metrics.config_reloads.labels("ok").inc()
            log_event("config.reloaded", path=str(self.path), restart_needed=restart_needed)
            return True

    def _refused(self, problems: list[str]) -> None:
        self.metrics.config_reloads.labels("error").inc()
        log_event(
            "config.reload_failed",
            path=str(self.path),
            problems=problems,
            action="the previous configuration keeps serving",
        )
