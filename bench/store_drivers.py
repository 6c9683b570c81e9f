"""PostgreSQL drivers on the refresh grant's store transaction: ops/s, p50, p99.

    python bench/store_drivers.py --url postgresql://postgres@127.0.0.1:5432/test

Measures what ``SqlStore.use_refresh`` does, in one transaction: the
family's grant row locked by a no-op ``UPDATE ... RETURNING`` (found through the token
hash), the token's row read, UPDATE of the old token to 'used', INSERT of its successor,
INSERT into grant_tokens and the conditional UPDATE of grants.keep_until; and one plain
read, the ``is_revoked`` SELECT by primary key. Four ways, each driven by asyncio tasks:

- ``psycopg-sync``: what tokengate does: ``PostgresStore`` (psycopg 3 and
  ``psycopg_pool.ConnectionPool``) called through ``StoreWorker`` (``run_in_executor``
  on ``--threads`` threads). Its ``use_refresh`` is one statement, the server-side
  function ``tokengate_use_refresh`` (migration 7), which does all of the above;
- ``psycopg-statements``: the same pool and threads running the statements themselves
  in a transaction (``SqlStore.use_refresh``, as on SQLite; what tokengate did on
  PostgreSQL before migration 7);
- ``psycopg-async``: ``psycopg.AsyncConnection`` from ``psycopg_pool.AsyncConnectionPool``,
  the same SQL;
- ``asyncpg``: ``asyncpg.create_pool``, the same SQL with ``$1`` placeholders; its pool
  resets every connection it takes back (``pg_advisory_unlock_all(); CLOSE ALL;
  UNLISTEN *; RESET ALL``: one more round trip per checkout);
- ``asyncpg-noreset``: the same with that reset turned off (``reset=`` a no-op), which
  tokengate could do as it keeps no session state.

Every pool has ``--pool`` connections (tokengate's default, 8). The schema is the
store's own (``authserver.migrations.POSTGRES``, applied by ``PostgresStore``) in a
schema of its own (``--schema``), dropped at the end. ``--families`` token families are
seeded (the rows ``start_family`` writes, loaded with COPY); each refresh takes the
next family in turn and carries its successor, so every refresh uses a distinct live
token. For each operation and each concurrency (``--concurrency``, asyncio tasks), the
drivers run one after the other, ``--warmup`` s unmeasured then ``--duration`` s
measured, their order rotated from one cell to the next to share the machine's noise.

"CPU/op" is this process's user + system time (every thread) per operation, "pg
CPU/op" that of the PostgreSQL server's processes alive through the cell (read from
/proc; blank when they cannot be read; every client's backends count, not only
this benchmark's). The load generator, the drivers and PostgreSQL share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import io
import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import psycopg
from psycopg_pool import AsyncConnectionPool

from authserver.pg_store import POOL_SIZE, PostgresStore
from authserver.sqlstore import SqlStore, grant_from_json
from authserver.store import Grant, StoreWorker

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_issuance import percentile

DRIVERS = ("psycopg-sync", "psycopg-statements", "psycopg-async", "asyncpg", "asyncpg-noreset")
ACCESS_TTL = 300  # the access token each refresh issues
IDLE_TTL = 7 * 86400  # refresh_tokens.idle_ttl's default
MAX_TTL = 90 * 86400  # refresh_tokens.max_ttl's default: the family's end

# The statements of SqlStore.use_refresh and is_revoked, in psycopg's placeholders:
# the family's grant row locked (and read), then the token's row.
LOCK = (
    "UPDATE grants SET revoked = revoked "
    "WHERE family = (SELECT family FROM refresh_tokens WHERE token_hash = %s) "
    "RETURNING record, revoked, keep_until"
)
SELECT = "SELECT state, idle_expires_at FROM refresh_tokens WHERE token_hash = %s"
RETIRE = "UPDATE refresh_tokens SET state = 'used' WHERE token_hash = %s"
SUCCESSOR = "INSERT INTO refresh_tokens VALUES (%s, %s, 'active', %s)"
ISSUED = "INSERT INTO grant_tokens VALUES (%s, %s, %s)"
KEEP = "UPDATE grants SET keep_until = %s WHERE family = %s"
REVOKED = "SELECT 1 FROM revoked_tokens WHERE jti = %s"


def dollar(sql: str) -> str:
    """``sql`` with asyncpg's numbered placeholders."""
    parts = sql.split("%s")
    return "".join(f"{p}${i}" if i < len(parts) else p for i, p in enumerate(parts, 1))


def new_hash() -> str:
    return hashlib.sha256(secrets.token_bytes(32)).hexdigest()


class Families:
    """The current refresh token of every seeded family, handed out in turn."""

    def __init__(self, count: int) -> None:
        self.names = [new_hash() for _ in range(count)]
        self.tokens = [new_hash() for _ in range(count)]
        self.next = 0

    def take(self) -> int:
        i = self.next
        self.next = (i + 1) % len(self.tokens)
        return i


@dataclasses.dataclass(frozen=True)
class Refresh:
    """One use_refresh call's arguments."""

    token: str
    now: int
    successor: str
    idle: int
    jti: str
    exp: int

    @classmethod
    def of(cls, token: str) -> Refresh:
        now = int(time.time())
        return cls(token, now, new_hash(), now + IDLE_TTL, secrets.token_hex(16), now + ACCESS_TTL)


class Failed(Exception):
    pass


def check_row(locked: Any, row: Any, r: Refresh) -> tuple[Grant, int]:
    """use_refresh's checks on the grant and token rows: the grant and keep_until, or
    Failed."""
    if locked is None or row is None:
        raise Failed("no such refresh token")
    record, revoked, keep_until = locked
    state, idle_end = row
    grant = grant_from_json(record)
    if revoked or state != "active" or idle_end <= r.now or grant.expires_at <= r.now:
        raise Failed(f"refresh token not live: {state}, revoked={revoked}")
    return grant, keep_until


# --------------------------------------------------------------------------- the drivers


class SyncStore:
    """tokengate's own path: PostgresStore on StoreWorker's threads (``statements``:
    the portable statements instead of the server-side function)."""

    def __init__(self, url: str, pool: int, threads: int, *, statements: bool = False) -> None:
        self.store = PostgresStore(url, pool_size=pool, migrate=False)
        self.worker = StoreWorker(threads)
        self.use_refresh = (
            functools.partial(SqlStore.use_refresh, self.store)
            if statements
            else self.store.use_refresh
        )

    async def open(self) -> None:
        pass

    async def refresh(self, r: Refresh) -> str:
        use = await self.worker.call(
            self.use_refresh, r.token, r.now, r.successor, r.idle, r.jti, r.exp
        )
        if use is None or use.status != "ok":
            raise Failed(f"use_refresh: {use}")
        return use.grant.family

    async def read(self, jti: str) -> bool:
        return await self.worker.call(self.store.is_revoked, jti)

    async def close(self) -> None:
        self.worker.close()
        self.store.close()


class PsycopgAsync:
    name = "psycopg-async"

    def __init__(self, url: str, pool: int) -> None:
        self.pool = AsyncConnectionPool(
            url, min_size=pool, max_size=pool, kwargs={"autocommit": True}, open=False
        )

    async def open(self) -> None:
        await self.pool.open(wait=True)

    async def refresh(self, r: Refresh) -> str:
        async with self.pool.connection() as conn, conn.transaction():
            locked = await (await conn.execute(LOCK, (r.token,))).fetchone()
            cur = await conn.execute(SELECT, (r.token,))
            grant, keep_until = check_row(locked, await cur.fetchone(), r)
            await conn.execute(RETIRE, (r.token,))
            idle = min(r.idle, grant.expires_at)
            await conn.execute(SUCCESSOR, (r.successor, grant.family, idle))
            await conn.execute(ISSUED, (grant.family, r.jti, r.exp))
            if r.exp > keep_until:
                await conn.execute(KEEP, (r.exp, grant.family))
        return grant.family

    async def read(self, jti: str) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute(REVOKED, (jti,))
            return await cur.fetchone() is not None

    async def close(self) -> None:
        await self.pool.close()


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


class Asyncpg:
    def __init__(self, dsn: str, schema: str, pool: int, *, reset: bool = True) -> None:
        self.dsn, self.schema, self.size, self.reset = dsn, schema, pool, reset
        self.sql = {s: dollar(s) for s in (LOCK, SELECT, RETIRE, SUCCESSOR, ISSUED, KEEP)}
        self.revoked = dollar(REVOKED)

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self.size,
            max_size=self.size,
            server_settings={"search_path": self.schema},
            **({} if self.reset else {"reset": _no_reset}),
        )

    async def refresh(self, r: Refresh) -> str:
        q = self.sql
        async with self.pool.acquire() as conn, conn.transaction():
            locked = await conn.fetchrow(q[LOCK], r.token)
            row = await conn.fetchrow(q[SELECT], r.token)
            grant, keep_until = check_row(locked, row, r)
            await conn.execute(q[RETIRE], r.token)
            idle = min(r.idle, grant.expires_at)
            await conn.execute(q[SUCCESSOR], r.successor, grant.family, idle)
            await conn.execute(q[ISSUED], grant.family, r.jti, r.exp)
            if r.exp > keep_until:
                await conn.execute(q[KEEP], r.exp, grant.family)
        return grant.family

    async def read(self, jti: str) -> bool:
        return await self.pool.fetchval(self.revoked, jti) is not None

    async def close(self) -> None:
        await self.pool.close()


# --------------------------------------------------------------------------- seeding


def seed(url: str, families: Families, revoked: list[str]) -> None:
    """The rows start_family writes for every family (grant, its first access token,
    its refresh token), and ``revoked`` in revoked_tokens, by COPY."""
    now = int(time.time())
    with psycopg.connect(url, autocommit=True) as conn:
        grants, tokens, refresh = io.StringIO(), io.StringIO(), io.StringIO()
        for i, (family, token) in enumerate(zip(families.names, families.tokens, strict=True)):
            grant = Grant(
                family=family,
                server="default",
                client_id="portal",
                user_id=f"user-{i % 1000:04d}",
                session_id=secrets.token_hex(16),
                scopes=("openid", "offline_access", "orders:read"),
                auth_time=now,
                offline=True,
                expires_at=now + MAX_TTL,
            )
            record = json.dumps(dataclasses.asdict(grant), sort_keys=True)
            exp = now + ACCESS_TTL
            grants.write(
                "\t".join(
                    map(
                        str,
                        (family, record, grant.session_id, grant.user_id, 1, 0, "[]"),
                    )
                )
                + f"\t{grant.expires_at}\t{max(grant.expires_at, exp)}\n"
            )
            tokens.write(f"{family}\t{secrets.token_hex(16)}\t{exp}\n")
            refresh.write(f"{token}\t{family}\tactive\t{now + IDLE_TTL}\n")
        with conn.transaction():
            for table, data in (("grants", grants), ("grant_tokens", tokens)):
                with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
                    copy.write(data.getvalue())
            with conn.cursor().copy("COPY refresh_tokens FROM STDIN") as copy:
                copy.write(refresh.getvalue())
            with conn.cursor().copy("COPY revoked_tokens FROM STDIN") as copy:
                copy.write("".join(f"{jti}\tdefault\t{now + 3600}\n" for jti in revoked))
        conn.execute("ANALYZE")


# --------------------------------------------------------------------------- measuring


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every process named postgres, by pid (empty if /proc hides them)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "postgres":
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(proc.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def postgres_cpu_since(before: dict[int, float]) -> float | None:
    """CPU seconds the PostgreSQL processes alive all along used since ``before``."""
    after = postgres_cpu()
    common = before.keys() & after.keys()
    return sum(after[p] - before[p] for p in common) if common else None


@dataclasses.dataclass
class Cell:
    op: str
    concurrency: int
    driver: str
    ops: int = 0
    seconds: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)
    cpu: float = 0.0
    pg_cpu: float | None = None
    errors: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def per_op(self, seconds: float | None) -> float | None:
        return None if seconds is None or not self.ops else seconds / self.ops * 1e6


async def measure(
    op: Callable[[], Awaitable[None]], cell: Cell, concurrency: int, warmup: float, duration: float
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    stop = start + duration

    async def task() -> None:
        while True:
            t0 = loop.time()
            if t0 >= stop:
                return
            try:
                await op()
            except Exception as exc:  # counted, and the first one shown
                cell.errors += 1
                cell.first_error = cell.first_error or f"{type(exc).__name__}: {exc}"[:200]
                continue
            t1 = loop.time()
            if t0 >= start and t1 <= stop:
                cell.latencies.append((t1 - t0) * 1000)

    async def window() -> None:
        await asyncio.sleep(max(0.0, start - loop.time()))
        cpu0, pg0 = time.process_time(), postgres_cpu()
        await asyncio.sleep(max(0.0, stop - loop.time()))
        cell.cpu = time.process_time() - cpu0
        cell.pg_cpu = postgres_cpu_since(pg0)

    await asyncio.gather(window(), *(task() for _ in range(concurrency)))
    cell.ops = len(cell.latencies)
    cell.seconds = duration


async def benchmark(args: argparse.Namespace, url: str, families: Families) -> list[Cell]:
    drivers: dict[str, Any] = {
        "psycopg-sync": SyncStore(url, args.pool, args.threads),
        "psycopg-statements": SyncStore(url, args.pool, args.threads, statements=True),
        "psycopg-async": PsycopgAsync(url, args.pool),
        "asyncpg": Asyncpg(args.url, args.schema, args.pool),
        "asyncpg-noreset": Asyncpg(args.url, args.schema, args.pool, reset=False),
    }
    for name in DRIVERS[1:]:
        await drivers[name].open()
    revoked = args.revoked
    cells: list[Cell] = []
    try:
        k = 0
        for op in args.ops:
            for concurrency in args.concurrency:
                for _ in range(args.rounds):
                    order = DRIVERS[k % len(DRIVERS) :] + DRIVERS[: k % len(DRIVERS)]
                    k += 1
                    for name in order:
                        driver = drivers[name]
                        cell = Cell(op, concurrency, name)

                        async def refresh(driver: Any = driver) -> None:
                            i = families.take()
                            r = Refresh.of(families.tokens[i])
                            await driver.refresh(r)
                            families.tokens[i] = r.successor

                        async def read(driver: Any = driver) -> None:
                            await driver.read(revoked[secrets.randbelow(len(revoked))])

                        print(f"{op} x{concurrency} {name} ...", file=sys.stderr, flush=True)
                        await measure(
                            refresh if op == "refresh" else read,
                            cell,
                            concurrency,
                            args.warmup,
                            args.duration,
                        )
                        cells.append(cell)
    finally:
        for driver in drivers.values():
            await driver.close()
    return cells


def merged(cells: list[Cell]) -> list[Cell]:
    """One cell per (op, concurrency, driver): several rounds pooled."""
    out: dict[tuple[str, int, str], Cell] = {}
    for c in cells:
        m = out.setdefault((c.op, c.concurrency, c.driver), Cell(c.op, c.concurrency, c.driver))
        m.ops += c.ops
        m.seconds += c.seconds
        m.latencies += c.latencies
        m.cpu += c.cpu
        m.pg_cpu = None if c.pg_cpu is None else (m.pg_cpu or 0.0) + c.pg_cpu
        m.errors += c.errors
        m.first_error = m.first_error or c.first_error
    return list(out.values())


def report(cells: list[Cell]) -> str:
    def us(value: float | None) -> str:
        return "" if value is None else f"{value:,.0f} µs"

    lines = [
        "| op | tasks | driver | ops/s | p50 | p99 | CPU/op | pg CPU/op "
        "| ops/s vs sync | p50 vs sync | p99 vs sync | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base: dict[tuple[str, int], Cell] = {
        (c.op, c.concurrency): c for c in cells if c.driver == "psycopg-sync"
    }
    for c in cells:
        b = base.get((c.op, c.concurrency))
        p50, p99 = percentile(c.latencies, 50), percentile(c.latencies, 99)
        if b is not None and b.ops:
            ratios = (
                f"{c.rate / b.rate:.2f}",
                f"{p50 / percentile(b.latencies, 50):.2f}",
                f"{p99 / percentile(b.latencies, 99):.2f}",
            )
        else:
            ratios = ("", "", "")
        lines.append(
            f"| {c.op} | {c.concurrency} | {c.driver} | {c.rate:,.0f} | {p50:.2f} ms "
            f"| {p99:.2f} ms | {us(c.per_op(c.cpu))} | {us(c.per_op(c.pg_cpu))} "
            f"| {' | '.join(ratios)} | {c.errors} |"
        )
    return "\n".join(lines)


def summary(cells: list[Cell]) -> str:
    rates: dict[str, list[float]] = {d: [] for d in DRIVERS[1:]}
    base = {(c.op, c.concurrency): c.rate for c in cells if c.driver == "psycopg-sync"}
    refresh = [c for c in cells if c.op == "refresh" and c.driver != "psycopg-sync"]
    for c in refresh:
        if base.get((c.op, c.concurrency)):
            rates[c.driver].append(c.rate / base[c.op, c.concurrency])
    parts = [
        f"{d} {min(r):.2f}-{max(r):.2f}x (median {statistics.median(r):.2f}x)"
        for d, r in rates.items()
        if r
    ]
    return "refresh ops/s relative to psycopg sync on threads: " + "; ".join(parts)


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("TOKENGATE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test"),
        help="PostgreSQL to measure on (default $TOKENGATE_BENCH_PG or local test)",
    )
    parser.add_argument("--schema", default="bench_drivers", help="created, and dropped after")
    parser.add_argument("--families", type=int, default=20000, help="token families seeded")
    parser.add_argument("--concurrency", type=int, action="append", help="asyncio tasks")
    parser.add_argument("--op", action="append", dest="ops", choices=["refresh", "read"])
    parser.add_argument("--pool", type=int, default=POOL_SIZE, help="connections per driver")
    parser.add_argument(
        "--threads", type=int, default=None, help="StoreWorker threads (default --pool)"
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=1, help="seconds before measuring")
    parser.add_argument("--rounds", type=int, default=1, help="times each cell is measured")
    parser.add_argument("--json", action="store_true", help="the cells as JSON too")
    args = parser.parse_args()
    args.concurrency = args.concurrency or [1, 8, 32]
    args.ops = args.ops or ["refresh", "read"]
    args.threads = args.threads or args.pool
    if not args.schema.isidentifier():
        parser.error("--schema must be a plain identifier")

    url = with_search_path(args.url, args.schema)
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {args.schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {args.schema}")
    try:
        PostgresStore(url, pool_size=1).close()  # the store's migrations
        print(f"seeding {args.families} families ...", file=sys.stderr, flush=True)
        families = Families(args.families)
        present = [secrets.token_hex(16) for _ in range(args.families)]
        seed(url, families, present)
        # reads: half find a revoked jti, half do not
        args.revoked = present + [secrets.token_hex(16) for _ in range(args.families)]
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        cells = asyncio.run(benchmark(args, url, families))
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {args.schema} CASCADE")
    cells = merged(cells)
    after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(
        f"\n{len(os.sched_getaffinity(0))} cores; load average {load} before, {after} after; "
        f"pool {args.pool} connections, {args.threads} store threads; "
        f"{args.warmup:g} s warm-up + {args.duration:g} s per cell, {args.rounds} round(s)\n"
    )
    print(report(cells))
    print()
    print(summary(cells))
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "op": c.op,
                        "concurrency": c.concurrency,
                        "driver": c.driver,
                        "ops_per_s": c.rate,
                        "p50_ms": percentile(c.latencies, 50),
                        "p99_ms": percentile(c.latencies, 99),
                        "errors": c.errors,
                        "first_error": c.first_error,
                    }
                    for c in cells
                ]
            )
        )


if __name__ == "__main__":
    main()
