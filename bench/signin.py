"""Signing users in over real sockets: sign-ins/s, refresh grants/s, and what a flood
of sign-ins does to client-credentials latency, in one run.

    python bench/signin.py --workers 2

Starts ``tokengate run --workers N --only authserver`` in a scratch directory on a
generated config: an RS256 server, a confidential web app ``portal`` (authorization
code with PKCE, refresh tokens), a client-credentials client ``reporting``, and
``--users`` users whose argon2id hashes (OWASP parameters, as
``tokengate users hash-password`` makes them) are computed here with
``authserver.passwords.hash_password``. The load generator is this process (asyncio +
aiohttp) on the same cores as the workers.

1. Sign-ins: ``--signin-concurrency`` virtual users loop over the whole flow, each with
   a cookie jar of its own that is emptied before every sign-in (no session, so every
   sign-in verifies a password): GET authorize (code, PKCE S256, state, nonce) -> 303
   to the sign-in page -> GET it -> POST its form (username, password, csrf_token,
   with the sign-in cookie) -> 303 to the redirect URI with a code -> POST the token
   endpoint (authorization_code, client_secret_basic, code_verifier) -> an ID token.
   Latency is the whole flow, first request to token response.
2. Refresh grants with rotation: ``--refresh-concurrency`` virtual users each hold
   ``--families-per-user`` refresh tokens (one password sign-in, then codes through
   the session, SSO) and refresh them in turn, carrying each new refresh token. Once
   with ``scope=orders:read`` (narrowed: one signature, the access token) and once
   with the granted scopes (openid: an ID token too, two signatures), on separate
   token families.
3. Code exchanges through a session (SSO): ``--refresh-concurrency`` virtual users each
   sign in once with the password, then loop over the flow with their session: GET
   authorize (a live session: a code at once) -> POST the token endpoint (the code, its
   PKCE verifier) -> access, ID and refresh tokens. No password is verified: the phase
   measures the code flow's store work (a code stored, redeemed, a token family
   started) and its two signatures. Latency is authorize to token response.
4. Client credentials: ``--probe-rate`` token requests a second from a separate
   process (open loop: latency counts from each request's scheduled time), with the
   server otherwise idle, then during a sign-in flood as in 1, ``--rounds`` times
   alternating, ending idle. Target ratio: the median of the flood rounds' p99s over
   the median of the idle rounds' p99s (a round disturbed by other work on the machine
   moves a pooled p99 much more than a median); the pooled figures are printed too.

"tokengate CPU" is the user + system time of tokengate's processes over the measured
seconds divided by what they completed, "loops" the part of it on the processes'
main threads (the event loops; argon2 and the store run on threads of their own),
"bench CPU" the same for this process. "cores busy" puts tokengate, this process and
the whole machine side by side: on a shared machine, what tokengate completes follows
the share of the cores it gets. ``--store URL`` keeps the store in PostgreSQL instead
of SQLite in the scratch directory: in a schema of its own created for the run and
dropped after, with a random ``key_encryption_key``. ``--phase`` runs some phases
only. ``--profile FILE`` runs the server as one worker under cProfile (its main
thread only) for the sign-in phase and prints the top functions: a diagnosis aid, not
a figure to compare (cProfile's clock is wall time, so on a busy machine it charges
waits to functions).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import hashlib
import json
import os
import platform
import pstats
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import aiohttp
import httpx
import jwt
import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_issuance import cpu_seconds, family, free_port, percentile

from authserver.passwords import hash_password, verify_password
from authserver.pg_store import redact

PORTAL_SECRET = "portal-secret-0123456789abcdefghijklmnop"  # noqa: S105 - throwaway
REPORTING_SECRET = "reporting-secret-0123456789abcdefghijkl"  # noqa: S105 - throwaway
CALLBACK = "https://portal.example.com/callback"
SCOPES = "openid profile email offline_access orders:read"
TARGETS = {"signin": 60.0, "refresh": 1500.0, "cc_ratio": 2.0}


def password_of(i: int) -> str:
    return f"bench-password-{i:05d}"


def username_of(i: int) -> str:
    return f"user{i:05d}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def basic_auth(client_id: str, secret: str) -> dict[str, str]:
    """client_secret_basic (the id and secret need no form-encoding here)."""
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


class Form(HTMLParser):
    """The sign-in page's form: its action and its inputs' names and values."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.action = a.get("action") or ""
        elif tag == "input" and a.get("name"):
            self.fields[a["name"] or ""] = a.get("value") or ""


class Unexpected(Exception):
    """A response the flow did not expect."""


# --------------------------------------------------------------------------- the server


def make_config(work: Path, port: int, hashes: list[str]) -> dict[str, Any]:
    users = [
        {
            "username": username_of(i),
            "password_hash": phc,
            "profile": {
                "email": f"{username_of(i)}@example.com",
                "email_verified": True,
                "name": f"User {i}",
            },
            "groups": ["staff"],
        }
        for i, phc in enumerate(hashes)
    ]
    return {
        "authserver": {
            "listen": f"127.0.0.1:{port}",
            "data_dir": str(work / "data"),
            "users": users,
            "servers": [
                {
                    "name": "default",
                    "audience": "api://default",
                    "signing_alg": "RS256",
                    "scopes": ["orders:read"],
                }
            ],
            "clients": [
                {
                    "client_id": "portal",
                    "secret": PORTAL_SECRET,
                    "grant_types": ["authorization_code", "refresh_token"],
                    "redirect_uris": [CALLBACK],
                    "scopes": ["openid", "profile", "email", "offline_access", "orders:read"],
                },
                {
                    "client_id": "reporting",
                    "secret": REPORTING_SECRET,
                    "scopes": ["orders:read"],
                },
            ],
        },
        "audit": {"path": str(work / "audit.log")},
    }


def hash_users(count: int) -> list[str]:
    """``count`` argon2id hashes, made on 2 threads (argon2 releases the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda i: hash_password(password_of(i)), range(count)))


def argon2_cost() -> tuple[float, float]:
    """Milliseconds of one verification on one thread, and verifications/s on 2 threads;
    the best of a few tries, as the machine is shared."""
    phc = hash_password(password_of(0))
    singles = []
    for _ in range(10):
        start = time.perf_counter()
        verify_password(phc, password_of(0))
        singles.append((time.perf_counter() - start) * 1000)
    rates = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(lambda _: verify_password(phc, password_of(0)), range(20)))
            rates.append(20 / (time.perf_counter() - start))
    return min(singles), max(rates)


class Server:
    """``tokengate run`` on the generated config, from this checkout or ``--source``."""

    def __init__(self, args: argparse.Namespace, work: Path, config_path: Path) -> None:
        env = dict(os.environ)
        if args.source is not None:
            env["PYTHONPATH"] = str(args.source.resolve())
        command = [sys.executable, "-m", "tokengate", "run", "--only", "authserver"]
        workers = args.workers
        if args.profile is not None:
            command = [sys.executable, "-m", "cProfile", "-o", str(args.profile.resolve())]
            command += ["-m", "tokengate", "run", "--only", "authserver"]
            workers = 1
        self.stderr = work / "tokengate.err"
        self.proc = subprocess.Popen(
            [*command, "-c", str(config_path), "--workers", str(workers)],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr.open("wb"),
            cwd=work,  # python -m puts the working directory first on sys.path
            env=env,
        )
        self.pids: list[int] = []

    def wait_ready(self, url: str, workers: int) -> None:
        deadline = time.monotonic() + 120  # the first start stores every declared user
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"tokengate did not start; see {self.stderr}")
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while len(family(self.proc.pid)) < 1 + workers and workers > 1:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        time.sleep(1)  # every worker serving
        self.pids = family(self.proc.pid)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of every tokengate process, and of their main threads alone (the
        event loops; argon2 and the store run on threads of their own)."""
        return cpu_seconds(self.pids), sum(_thread_cpu(pid, pid) for pid in self.pids)

    def threads(self) -> dict[tuple[int, int], float]:
        """CPU seconds of each thread of each tokengate process, by (pid, tid)."""
        found = {}
        for pid in self.pids:
            try:
                tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
            except FileNotFoundError:
                continue
            for tid in tids:
                found[pid, tid] = _thread_cpu(pid, tid)
        return found

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- the clients


@dataclass
class Tally:
    """What one measured phase completed: latencies (ms), finish times, errors."""

    latencies: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)
    steps: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0
    first_error: str = ""
    server_cpu: float = 0.0
    loop_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_busy: float = 0.0  # CPU seconds of every process on the machine
    threads: dict[int, list[float]] = field(default_factory=dict)  # not main, by pid
    processes: list[float] = field(default_factory=list)  # CPU seconds of each process
    seconds: float = 0.0

    def error(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"[:300]

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def halves(self, start: float) -> tuple[float, float]:
        """The rate over the first and the second half of the measured seconds."""
        middle = start + self.seconds / 2
        first = sum(1 for t in self.finished if t < middle)
        return first / (self.seconds / 2), (len(self.finished) - first) / (self.seconds / 2)

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies)
        return {
            "completed": done,
            "seconds": round(self.seconds, 2),
            "rate": round(self.rate, 1),
            "p50_ms": round(percentile(self.latencies, 50), 2),
            "p99_ms": round(percentile(self.latencies, 99), 2),
            "server_cpu_ms_each": round(self.server_cpu / max(1, done) * 1000, 3),
            "loop_cpu_ms_each": round(self.loop_cpu / max(1, done) * 1000, 3),
            "client_cpu_ms_each": round(self.client_cpu / max(1, done) * 1000, 3),
            "cores_busy": {
                "tokengate": round(self.server_cpu / self.seconds, 2),
                "bench": round(self.client_cpu / self.seconds, 2),
                "machine": round(self.machine_busy / self.seconds, 2),
                "each_tokengate_process": [
                    round(used / self.seconds, 2) for used in self.processes if used >= 0.01
                ],
            },
            "other_threads_ms_each": [
                sorted((round(t / max(1, done) * 1000, 2) for t in used if t), reverse=True)
                for used in self.threads.values()
                if any(used)
            ],
            "steps_p50_ms": {k: round(percentile(v, 50), 2) for k, v in self.steps.items()},
            "errors": self.errors,
            "first_error": self.first_error,
        }


class Flow:
    """The browser's and the web app's parts of the authorization code flow."""

    def __init__(self, base: str, issuer: str, app: aiohttp.ClientSession) -> None:
        self.base = base
        self.issuer = issuer
        self.authorize_url = f"{issuer}/v1/authorize"
        self.token_url = f"{issuer}/v1/token"
        self.app = app
        self.portal = basic_auth("portal", PORTAL_SECRET)
        self.next_user = 0

    @staticmethod
    def browser() -> aiohttp.ClientSession:
        """A virtual user's browser: its own cookie jar (IP-literal hosts allowed)."""
        return aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            timeout=aiohttp.ClientTimeout(total=120),
        )

    async def sign_in(
        self, browser: aiohttp.ClientSession, user: int | None, steps: dict[str, float]
    ) -> dict[str, Any]:
        """One authorization code flow, to the token response. ``user``: the user whose
        password the sign-in page gets (None: the browser's session must answer, SSO)."""
        verifier = secrets.token_urlsafe(48)
        state = secrets.token_urlsafe(16)
        nonce = secrets.token_urlsafe(16)
        params = {
            "response_type": "code",
            "client_id": "portal",
            "redirect_uri": CALLBACK,
            "scope": SCOPES,
            "state": state,
            "nonce": nonce,
            "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()),
            "code_challenge_method": "S256",
        }
        t = time.perf_counter()
        async with browser.get(self.authorize_url, params=params, allow_redirects=False) as r:
            await r.read()
            location = _expect_redirect(r)
        steps["authorize"], t = (time.perf_counter() - t) * 1000, time.perf_counter()
        if not location.startswith(CALLBACK + "?"):
            if user is None:
                raise Unexpected(f"no session: sent to {location}")
            async with browser.get(urljoin(self.base, location), allow_redirects=False) as r:
                html = await r.text()
                if r.status != 200:
                    raise Unexpected(f"sign-in page: {r.status} {html[:200]}")
            form = Form(html)
            steps["page"], t = (time.perf_counter() - t) * 1000, time.perf_counter()
            data = {**form.fields, "username": username_of(user), "password": password_of(user)}
            async with browser.post(
                urljoin(self.base, form.action), data=data, allow_redirects=False
            ) as r:
                await r.read()
                location = _expect_redirect(r)
            steps["password"], t = (time.perf_counter() - t) * 1000, time.perf_counter()
        returned = parse_qs(urlsplit(location).query)
        if not location.startswith(CALLBACK + "?") or "code" not in returned:
            raise Unexpected(f"not a code: {location[:300]}")
        if returned.get("state") != [state] or returned.get("iss") != [self.issuer]:
            raise Unexpected(f"state or iss differ: {location[:300]}")
        exchange = {
            "grant_type": "authorization_code",
            "code": returned["code"][0],
            "redirect_uri": CALLBACK,
            "code_verifier": verifier,
        }
        async with self.app.post(self.token_url, data=exchange, headers=self.portal) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise Unexpected(f"token endpoint: {r.status} {body}")
        steps["token"] = (time.perf_counter() - t) * 1000
        id_token = body.get("id_token")
        if not id_token or "refresh_token" not in body:
            raise Unexpected(f"no ID token or refresh token: {sorted(body)}")
        claims = json.loads(base64.urlsafe_b64decode(id_token.split(".")[1] + "=="))
        if claims.get("nonce") != nonce:
            raise Unexpected("the ID token's nonce differs")
        return body

    def pick_user(self, users: int) -> int:
        self.next_user = (self.next_user + 1) % users
        return self.next_user


def _expect_redirect(r: aiohttp.ClientResponse) -> str:
    if r.status not in (302, 303) or "location" not in r.headers:
        raise Unexpected(f"{r.method} {r.url.path}: {r.status}, not a redirect")
    return r.headers["location"]


async def measure(
    workers: list[Callable[[float, float, Tally], Awaitable[None]]],
    server: Server,
    warmup: float,
    seconds: float,
) -> tuple[Tally, float]:
    """Run ``workers`` (coroutines taking the measured start and stop, on the loop's
    clock, and the tally) for warm-up + seconds; they record into the tally only what
    finishes inside the measured seconds. Returns the tally and the measured start."""
    tally = Tally()
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    stop = start + seconds

    async def sample() -> None:
        await asyncio.sleep(max(0.0, start - loop.time()))
        (cpu0, loop0), own0, machine0 = server.cpu(), time.process_time(), machine_busy()
        threads0 = server.threads()
        per_process0 = {pid: cpu_seconds([pid]) for pid in server.pids}
        await asyncio.sleep(max(0.0, stop - loop.time()))
        cpu1, loop1 = server.cpu()
        tally.processes = [cpu_seconds([pid]) - used for pid, used in per_process0.items()]
        for (pid, tid), used in server.threads().items():
            if pid != tid:  # a worker's other threads: argon2's, the store's
                tally.threads.setdefault(pid, []).append(used - threads0.get((pid, tid), 0.0))
        tally.server_cpu, tally.loop_cpu = cpu1 - cpu0, loop1 - loop0
        tally.client_cpu = time.process_time() - own0
        tally.machine_busy = machine_busy() - machine0

    tally.seconds = seconds
    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(w(start, stop, tally) for w in workers))
    await sampler
    return tally, start


def record(
    tally: Tally, start: float, stop: float, began: float, steps: dict[str, float] | None = None
) -> None:
    """A completion that began at ``began`` (perf_counter) and finished now."""
    now = asyncio.get_running_loop().time()
    if start <= now <= stop:
        tally.latencies.append((time.perf_counter() - began) * 1000)
        tally.finished.append(now)
        for name, ms in (steps or {}).items():
            tally.steps.setdefault(name, []).append(ms)


async def signin_flood(
    flow: Flow, args: argparse.Namespace, server: Server, warmup: float, seconds: float
) -> tuple[Tally, float]:
    """Sign-ins with the password every time (each browser's cookies cleared first)."""
    browsers = [Flow.browser() for _ in range(args.signin_concurrency)]
    try:
        return await flows(
            flow, server, browsers, lambda: flow.pick_user(args.users), warmup, seconds
        )
    finally:
        await asyncio.gather(*(b.close() for b in browsers))


async def flows(
    flow: Flow,
    server: Server,
    browsers: list[aiohttp.ClientSession],
    user: Callable[[], int | None],
    warmup: float,
    seconds: float,
) -> tuple[Tally, float]:
    """Each browser loops over the code flow: with the password of ``user()`` (its
    cookies cleared first: no session), or (None) through its session."""

    def worker(browser: aiohttp.ClientSession) -> Callable[[float, float, Tally], Awaitable[None]]:
        async def run(start: float, stop: float, tally: Tally) -> None:
            loop = asyncio.get_running_loop()
            while loop.time() < stop:
                who = user()
                if who is not None:
                    browser.cookie_jar.clear()  # no session: the password every time
                steps: dict[str, float] = {}
                began = time.perf_counter()
                try:
                    await flow.sign_in(browser, who, steps)
                except (TimeoutError, Unexpected, aiohttp.ClientError) as exc:
                    if start <= loop.time() <= stop:
                        tally.error(exc)
                    await asyncio.sleep(0.05)
                    continue
                record(tally, start, stop, began, steps)

        return run

    return await measure([worker(b) for b in browsers], server, warmup, seconds)


async def refresh_families(
    flow: Flow, args: argparse.Namespace, first_user: int
) -> list[list[str]]:
    """Per virtual user, ``--families-per-user`` refresh tokens: one password sign-in,
    then codes through the session (SSO), each exchanged for a new token family."""

    async def one(vu: int) -> list[str]:
        async with Flow.browser() as browser:
            user = (first_user + vu) % args.users
            tokens = [(await flow.sign_in(browser, user, {}))["refresh_token"]]
            while len(tokens) < args.families_per_user:
                tokens.append((await flow.sign_in(browser, None, {}))["refresh_token"])
            return tokens

    return list(await asyncio.gather(*(one(vu) for vu in range(args.refresh_concurrency))))


async def exchange_loop(
    flow: Flow, args: argparse.Namespace, server: Server, first_user: int
) -> tuple[Tally, float]:
    """Code exchanges through a session: each browser signs in once, then SSO."""
    browsers = [Flow.browser() for _ in range(args.refresh_concurrency)]
    try:
        for vu, browser in enumerate(browsers):
            await flow.sign_in(browser, (first_user + vu) % args.users, {})
        return await flows(flow, server, browsers, lambda: None, args.warmup, args.duration)
    finally:
        await asyncio.gather(*(b.close() for b in browsers))


async def refresh_loop(
    flow: Flow,
    server: Server,
    families: list[list[str]],
    narrowed: bool,
    warmup: float,
    seconds: float,
) -> tuple[Tally, float]:
    def worker(tokens: list[str]) -> Callable[[float, float, Tally], Awaitable[None]]:
        async def run(start: float, stop: float, tally: Tally) -> None:
            loop = asyncio.get_running_loop()
            i = 0
            while loop.time() < stop:
                data = {"grant_type": "refresh_token", "refresh_token": tokens[i]}
                if narrowed:
                    data["scope"] = "orders:read"
                began = time.perf_counter()
                try:
                    async with flow.app.post(flow.token_url, data=data, headers=flow.portal) as r:
                        body = await r.json(content_type=None)
                        if r.status != 200:
                            raise Unexpected(f"refresh: {r.status} {body}")
                    if ("id_token" in body) == narrowed or "refresh_token" not in body:
                        raise Unexpected(f"refresh answered {sorted(body)}")
                except (TimeoutError, Unexpected, aiohttp.ClientError) as exc:
                    if start <= loop.time() <= stop:
                        tally.error(exc)
                    tokens.pop(i)  # a refused token is gone; carry on with the others
                    if not tokens:
                        return
                    i %= len(tokens)
                    continue
                tokens[i] = body["refresh_token"]
                i = (i + 1) % len(tokens)
                record(tally, start, stop, began)

        return run

    return await measure([worker(t) for t in families], server, warmup, seconds)


# --------------------------------------------------------------------------- the probe


async def probe(url: str, rate: float, seconds: float, warmup: float) -> dict[str, Any]:
    """Open loop: ``rate`` client-credentials requests a second, each timed from when it
    was due, so a stalled server is not hidden by requests sent later."""
    loop = asyncio.get_running_loop()
    auth = basic_auth("reporting", REPORTING_SECRET)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(url, data={"grant_type": "client_credentials"}, headers=auth) as r:
            await r.read()  # a first connection
        begin = loop.time() + 0.1
        total = int((warmup + seconds) * rate)

        async def one(i: int) -> None:
            due = begin + i / rate
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                async with session.post(
                    url, data={"grant_type": "client_credentials"}, headers=auth
                ) as r:
                    await r.read()
                    status = r.status
            except aiohttp.ClientError:
                status = 0
            if i >= warmup * rate:
                latencies.append((loop.time() - due) * 1000)
                statuses[status] = statuses.get(status, 0) + 1

        async def window() -> float:
            await asyncio.sleep(max(0.0, begin + warmup - loop.time()))
            busy = machine_busy()
            await asyncio.sleep(max(0.0, begin + warmup + seconds - loop.time()))
            return (machine_busy() - busy) / seconds

        busy, *_ = await asyncio.gather(window(), *(one(i) for i in range(total)))
    return {"latencies_ms": latencies, "statuses": statuses, "machine_cores_busy": round(busy, 2)}


def run_probe(args: argparse.Namespace, url: str) -> subprocess.Popen[str]:
    command = [sys.executable, __file__, "--probe", url, "--probe-rate", str(args.probe_rate)]
    command += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def probe_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit("the client-credentials probe failed")
    result: dict[str, Any] = json.loads(out)
    return result


# --------------------------------------------------------------------------- main


async def benchmark(args: argparse.Namespace, server: Server, base: str) -> dict[str, Any]:
    issuer = f"{base}/oauth2/default"
    results: dict[str, Any] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=120),
    ) as app:
        flow = Flow(base, issuer, app)
        # sanity: one sign-in, its ID token checked as a relying party does
        async with Flow.browser() as browser:
            body = await flow.sign_in(browser, 0, {})
        keys = jwt.PyJWKClient(f"{issuer}/v1/keys")
        claims = jwt.decode(
            body["id_token"],
            keys.get_signing_key_from_jwt(body["id_token"]).key,
            algorithms=["RS256"],
            audience="portal",
            issuer=issuer,
        )
        assert claims["email"] == f"{username_of(0)}@example.com", claims

        if "signin" in args.phases:
            print("sign-ins ...", file=sys.stderr, flush=True)
            tally, _ = await signin_flood(flow, args, server, args.warmup, args.duration)
            results["signin"] = tally.summary()
        if "refresh" in args.phases:
            print("refresh ...", file=sys.stderr, flush=True)
            await refresh_phase(flow, args, server, results)
        if "exchange" in args.phases:
            print("code exchanges ...", file=sys.stderr, flush=True)
            first = 1 + 2 * args.refresh_concurrency
            tally, _ = await exchange_loop(flow, args, server, first)
            results["exchange"] = tally.summary()
        if "cc" in args.phases:
            print("client credentials ...", file=sys.stderr, flush=True)
            await cc_phase(flow, args, server, results)
    return results


async def refresh_phase(
    flow: Flow, args: argparse.Namespace, server: Server, results: dict[str, Any]
) -> None:
    narrow_families = await refresh_families(flow, args, 1)
    full_families = await refresh_families(flow, args, 1 + args.refresh_concurrency)
    for name, families, narrowed in (
        ("refresh_narrowed", narrow_families, True),
        ("refresh_openid", full_families, False),
    ):
        tally, start = await refresh_loop(
            flow, server, families, narrowed, args.warmup, args.duration
        )
        results[name] = tally.summary()
        first, second = tally.halves(start)
        results[name]["halves"] = [round(first, 1), round(second, 1)]
        results[name]["families"] = sum(len(f) for f in families)


async def cc_phase(
    flow: Flow, args: argparse.Namespace, server: Server, results: dict[str, Any]
) -> None:
    token_url = flow.token_url
    idle_runs: list[dict[str, Any]] = []
    flood_runs: list[dict[str, Any]] = []
    floods: list[dict[str, Any]] = []
    for _ in range(args.rounds):  # idle, flood, idle, ...: both see the same machine
        idle_runs.append(await asyncio.to_thread(probe_result, run_probe(args, token_url)))
        proc = run_probe(args, token_url)
        # the flood starts with the probe process and outlasts its measured seconds
        flood, _ = await signin_flood(flow, args, server, args.warmup - 0.5, args.duration + 2.0)
        flood_runs.append(await asyncio.to_thread(probe_result, proc))
        floods.append(flood.summary())
    idle_runs.append(await asyncio.to_thread(probe_result, run_probe(args, token_url)))
    idle = [ms for run in idle_runs for ms in run["latencies_ms"]]
    during = [ms for run in flood_runs for ms in run["latencies_ms"]]
    cc: dict[str, Any] = {
        "rate": args.probe_rate,
        "idle_p50_ms": round(percentile(idle, 50), 2),
        "idle_p99_ms": round(percentile(idle, 99), 2),
        "flood_p50_ms": round(percentile(during, 50), 2),
        "flood_p99_ms": round(percentile(during, 99), 2),
        "flood_max_ms": round(max(during, default=float("nan")), 2),
        "idle_runs": [_probe_summary(run) for run in idle_runs],
        "flood_runs": [_probe_summary(run) for run in flood_runs],
        "floods": floods,
    }
    # per-round p99s, then their medians: one round disturbed by other work on the
    # machine (a stall of a second is a dozen samples above the pooled p99) moves the
    # pooled figure but not the median
    cc["idle_p99_median_ms"] = statistics.median(r["p99_ms"] for r in cc["idle_runs"])
    cc["flood_p99_median_ms"] = statistics.median(r["p99_ms"] for r in cc["flood_runs"])
    cc["ratio"] = round(cc["flood_p99_median_ms"] / cc["idle_p99_median_ms"], 2)
    results["cc"] = cc


def _probe_summary(run: dict[str, Any]) -> dict[str, Any]:
    latencies = run["latencies_ms"]
    return {
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
        "over_100ms": sum(1 for ms in latencies if ms > 100),
        "samples": len(latencies),
        "statuses": run["statuses"],
        "machine_cores_busy": run["machine_cores_busy"],
    }


def report(args: argparse.Namespace, results: dict[str, Any], argon2: tuple[float, float]) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def errors(r: dict[str, Any]) -> str:
        return f"errors {r['errors']}" + (f" ({r['first_error']})" if r["errors"] else "")

    cores = os.cpu_count() or 1
    workers = args.workers if args.profile is None else 1
    print(
        f"machine: {_cpu_model()}, {cores} cores, Python {platform.python_version()}, "
        f"load average before {args.load_before}"
    )
    print(
        f"argon2id (m=19 MiB, t=2, p=1) in this process, best of a few: {argon2[0]:.1f} ms a "
        f"verification on one thread, {argon2[1]:.0f}/s on 2 threads"
    )
    print(
        f"tokengate run --workers {workers} --only authserver, RS256, {args.users} users; "
        f"{args.duration:g} s measured after {args.warmup:g} s warm-up per phase"
    )
    print(f"store: {'PostgreSQL, ' + redact(args.store) if args.store else 'SQLite'}")
    print()
    print(
        f"{'':<44}{'per s':>8}{'p50':>10}{'p99':>10}{'tokengate CPU':>15}{'loops':>8}"
        f"{'bench CPU':>11}  cores busy (tokengate/bench/all)  target"
    )

    def row(name: str, r: dict[str, Any], target: str = "") -> None:
        busy = r["cores_busy"]
        cells = f"{busy['tokengate']:.2f} / {busy['bench']:.2f} / {busy['machine']:.2f}"
        print(
            f"{name:<44}{r['rate']:>8,.1f}{r['p50_ms']:>8.1f}ms{r['p99_ms']:>8.1f}ms"
            f"{r['server_cpu_ms_each']:>13.2f}ms{r['loop_cpu_ms_each']:>6.2f}ms"
            f"{r['client_cpu_ms_each']:>9.2f}ms  {cells:<32}  {target}"
        )

    if "signin" in results:
        s = results["signin"]
        ok = s["rate"] >= TARGETS["signin"]
        name = f"sign-ins, whole flow ({args.signin_concurrency} virtual users)"
        row(name, s, f">= {TARGETS['signin']:.0f}/s {verdict(ok)}")
    if "refresh_narrowed" in results:
        r = results["refresh_narrowed"]
        ok = r["rate"] >= TARGETS["refresh"]
        name = f"refresh, scope=orders:read ({args.refresh_concurrency} v. users)"
        row(name, r, f">= {TARGETS['refresh']:,.0f}/s {verdict(ok)}")
        row("refresh, granted scopes (+ ID token)", results["refresh_openid"])
    if "exchange" in results:
        name = f"code exchanges via SSO ({args.refresh_concurrency} v. users)"
        row(name, results["exchange"])
    if "cc" in results:
        c = results["cc"]
        for i, f in enumerate(c["floods"], 1):
            row(f"sign-ins, flood {i} (with the probe)", f)
        label = f"client credentials ({c['rate']:g}/s)"
        print(
            f"{label + ', idle, all rounds':<44}{'':>8}{c['idle_p50_ms']:>8.1f}ms"
            f"{c['idle_p99_ms']:>8.1f}ms"
        )
        print(
            f"{label + ', floods, all rounds':<44}{'':>8}"
            f"{c['flood_p50_ms']:>8.1f}ms{c['flood_p99_ms']:>8.1f}ms"
        )
        ok = c["ratio"] <= TARGETS["cc_ratio"]
        print(
            f"{'  p99, median of the idle rounds':<44}{'':>8}{'':>10}"
            f"{c['idle_p99_median_ms']:>8.1f}ms"
        )
        print(
            f"{'  p99, median of the flood rounds':<44}{'':>8}{'':>10}"
            f"{c['flood_p99_median_ms']:>8.1f}ms{'':>66}"
            f"{c['ratio']:.2f}x idle, <= {TARGETS['cc_ratio']:.0f}x {verdict(ok)}"
        )
    print()
    if "signin" in results:
        s = results["signin"]
        print(
            f"sign-ins: {s['completed']}, {errors(s)}; steps p50: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in s["steps_p50_ms"].items())
            + f"; tokengate processes {s['cores_busy']['each_tokengate_process']} cores, "
            f"their other threads (argon2, store) {s['other_threads_ms_each']} ms a sign-in; "
            f"{cores} cores / tokengate CPU = {cores / s['server_cpu_ms_each'] * 1000:.0f}/s"
        )
    if "exchange" in results:
        x = results["exchange"]
        print(
            f"exchange: {x['completed']} codes, {errors(x)}; steps p50: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in x["steps_p50_ms"].items())
            + f"; tokengate processes {x['cores_busy']['each_tokengate_process']} cores"
        )
    for name in ("refresh_narrowed", "refresh_openid"):
        if name in results:
            r = results[name]
            print(
                f"{name}: {r['completed']} refreshes over {r['families']} token families, "
                f"{errors(r)}; first half {r['halves'][0]:,.0f}/s, second half "
                f"{r['halves'][1]:,.0f}/s; tokengate processes "
                f"{r['cores_busy']['each_tokengate_process']} cores; {cores} cores / "
                f"tokengate CPU = {cores / r['server_cpu_ms_each'] * 1000:,.0f}/s"
            )
    if "cc" in results:
        c = results["cc"]
        order = []
        for i, idle in enumerate(c["idle_runs"]):
            order.append(("idle", idle))
            if i < len(c["flood_runs"]):
                order.append(("flood", c["flood_runs"][i]))
        print(
            "client credentials, in order: "
            + "; ".join(
                f"{kind} p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} max {r['max_ms']:.0f} ms "
                f"({r['over_100ms']} of {r['samples']} over 100 ms, "
                f"statuses {r['statuses']}, machine {r['machine_cores_busy']:.2f} cores busy)"
                for kind, r in order
            )
        )
        print(
            "floods: "
            + "; ".join(
                f"{errors(f)}, tokengate processes {f['cores_busy']['each_tokengate_process']}"
                for f in c["floods"]
            )
        )
    print()
    print("rerun: " + " ".join(["python", "bench/signin.py", *sys.argv[1:]]))


def _thread_cpu(pid: int, tid: int) -> float:
    """utime + stime of one thread, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_profile(path: Path) -> None:
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)


def scratch_schema(url: str, schema: str) -> str:
    """Creates ``schema`` at the PostgreSQL ``url``; the URL with it as search_path."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--users", type=int, default=200, help="users in the config")
    parser.add_argument("--signin-concurrency", type=int, default=16, help="virtual users")
    parser.add_argument("--refresh-concurrency", type=int, default=32, help="virtual users")
    parser.add_argument("--families-per-user", type=int, default=16, help="refresh tokens each")
    parser.add_argument("--probe-rate", type=float, default=100, help="client-credentials req/s")
    parser.add_argument("--rounds", type=int, default=2, help="sign-in floods for the probe")
    parser.add_argument("--duration", type=float, default=12, help="seconds measured per phase")
    parser.add_argument("--warmup", type=float, default=3, help="seconds before measuring")
    parser.add_argument("--source", type=Path, help="run tokengate from this checkout")
    parser.add_argument(
        "--store", help="PostgreSQL URL: the store there, in a scratch schema (default SQLite)"
    )
    parser.add_argument(
        "--phase",
        action="append",
        dest="phases",
        choices=["signin", "refresh", "exchange", "cc"],
        help="run only this phase (repeatable; default: all; --profile: signin)",
    )
    parser.add_argument("--profile", type=Path, help="one worker under cProfile; sign-ins only")
    parser.add_argument("--json", action="store_true", help="the results as one JSON object")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the probe process's token URL
    args = parser.parse_args()
    if args.probe:
        out = asyncio.run(probe(args.probe, args.probe_rate, args.duration, args.warmup))
        print(json.dumps(out))
        return
    if args.profile is not None:
        args.phases = ["signin"]
    args.phases = args.phases or ["signin", "refresh", "exchange", "cc"]
    if {"refresh", "exchange"} & set(args.phases) and args.users < args.refresh_concurrency * 3 + 1:
        parser.error("--users must be more than three times --refresh-concurrency")
    args.load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    argon2 = argon2_cost()
    with tempfile.TemporaryDirectory(prefix="tokengate-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        print(f"hashing {args.users} passwords ...", file=sys.stderr, flush=True)
        config = make_config(work, port, hash_users(args.users))
        schema = f"bench_signin_{secrets.token_hex(4)}"
        if args.store:
            config["authserver"]["store"] = scratch_schema(args.store, schema)
            config["authserver"]["key_encryption_key"] = base64.b64encode(
                secrets.token_bytes(32)
            ).decode()
        (work / "tokengate.yaml").write_text(yaml.safe_dump(config))
        try:
            server = Server(args, work, work / "tokengate.yaml")
            try:
                server.wait_ready(f"{base}/oauth2/default/v1/keys", args.workers)
                results = asyncio.run(benchmark(args, server, base))
            finally:
                server.stop()
        finally:
            if args.store:
                with psycopg.connect(args.store, autocommit=True) as conn:
                    conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    if args.json:
        print(json.dumps({"argon2_ms": argon2[0], "argon2_per_s_2_threads": argon2[1], **results}))
    else:
        report(args, results, argon2)
    if args.profile is not None:
        print_profile(args.profile)


if __name__ == "__main__":
    main()
