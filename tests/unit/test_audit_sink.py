"""The audit sink: whole lines, written by a thread; failures counted, never raised."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tokengate.jsonlog import LineSink


def test_lines_are_written_whole_by_the_writer_thread(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = LineSink(str(path), interval=0.005)
    writers = [
        threading.Thread(
            target=lambda n=n: [
                sink.write({"writer": n, "i": i, "pad": "x" * 300}) for i in range(500)
            ]
        )
        for n in range(4)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2000
    assert sorted((x["writer"], x["i"]) for x in lines) == [
        (n, i) for n in range(4) for i in range(500)
    ]


def test_a_full_disk_is_counted_and_reported_not_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    sink = LineSink("/dev/full")  # every write fails with ENOSPC
    for i in range(10):
        sink.write({"i": i})  # never raises into the caller
    sink.flush()
    sink.close()
    assert sink.lost == 10 and sink.failures >= 1
    reported = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert reported[0]["event"] == "audit.write_failed"
    assert reported[0]["path"] == "/dev/full" and reported[0]["lost"] >= 1


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    sink = LineSink(str(tmp_path / "a.log"), interval=3600)  # the thread never drains
    sink.MAX_PENDING = 5
    for i in range(8):
        sink.write({"i": i})
    assert sink.lost == 3
    sink.close()
    assert len((tmp_path / "a.log").read_text().splitlines()) == 5


def test_a_loss_episode_is_named_counted_and_can_make_the_process_unready() -> None:
    import asyncio

    import httpx

    from tokengate.admin import AdminApp
    from tokengate.metrics import Metrics

    counted: list[int] = []
    sink = LineSink("/dev/full", on_lost=counted.append)
    assert sink.problems() == []
    for i in range(3):
        sink.write({"i": i})
    sink.flush()
    assert sum(counted) == 3 and sink.lost == 3
    (problem,) = sink.problems()
    assert problem.startswith("audit: writes to /dev/full failing since ")
    assert problem.endswith("; 3 lines lost so far")

    async def readyz(app: AdminApp) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            return await client.get("/readyz")

    required = asyncio.run(readyz(AdminApp(Metrics(), [sink.problems])))
    assert required.status_code == 503
    assert required.json() == {"ready": False, "not_ready": [problem], "degraded": []}
    tolerated = asyncio.run(readyz(AdminApp(Metrics(), [], [sink.problems])))
    assert tolerated.status_code == 200
    assert tolerated.json() == {"ready": True, "not_ready": [], "degraded": [problem]}
    sink.close()
