"""Calling the API through the gateway with the user's access token, and turning the
answer into something a page can show (status, and the body: JSON pretty-printed,
anything else as text, cut at :data:`MAX_SHOWN` bytes). A 401 that asks for a stronger
or more recent sign-in (RFC 9470 step-up) is recognised: its ``acr_values`` and
``max_age`` are what the next authorization request asks for."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import httpx

MAX_SHOWN = 64 * 1024  # bytes of an answer's body the page shows
MAX_CHALLENGE = 4096  # characters of a WWW-Authenticate header looked at
STEP_UP_ERROR = "insufficient_user_authentication"  # RFC 9470 section 3
# one auth-param of a challenge (RFC 9110 11.2): name=token or name="quoted string"
_PARAM = re.compile(r'([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]+))')
_ACR = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,255}")  # one acr value: no space or quote


@dataclass(frozen=True, slots=True)
class StepUp:
    """What an API's 401 asks a new sign-in for (RFC 9470)."""

    acr_values: tuple[str, ...]  # in the API's order of preference
    max_age: int | None


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    status: int | None  # None: no answer at all (the gateway is down)
    body: str  # for the page (it escapes it); or why there was no answer
    refreshed: bool = False  # the access token was refreshed before this call
    step_up: StepUp | None = None  # a 401 asking for a stronger or more recent sign-in


def step_up_of(challenge: str | None) -> StepUp | None:
    """The step-up a Bearer ``WWW-Authenticate`` asks for: its error must be RFC
    9470's, with at least one of ``acr_values`` and ``max_age``. Anything malformed
    (an acr value with odd characters, a max_age that is not a small number) is left
    out; nothing at all left: None (the 401 is shown as it is)."""
    if not challenge or len(challenge) > MAX_CHALLENGE:
        return None
    scheme, _, rest = challenge.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    params: dict[str, str] = {}
    for name, quoted, token in _PARAM.findall(rest):
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted else token
        params.setdefault(name.lower(), value)
    if params.get("error") != STEP_UP_ERROR:
        return None
    return step_up(params.get("acr_values", ""), params.get("max_age", ""))


def step_up(acr_values: str, max_age: str) -> StepUp | None:
    """A step-up from its two parameters as text: acr values with odd characters and a
    max_age that is not a small number are left out; nothing left, None."""
    acr = tuple(v for v in acr_values.split(" ") if _ACR.fullmatch(v))[:10]
    small = max_age.isascii() and max_age.isdigit() and len(max_age) <= 9
    age = int(max_age) if small else None
    if not acr and age is None:
        return None
    return StepUp(acr, age)


def shown(body: bytes, content_type: str, truncated: bool) -> str:
    """A body as the page shows it."""
    if content_type.split(";")[0].strip().lower().endswith("json") and not truncated:
        try:
            return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    text = body.decode("utf-8", errors="replace")
    return text + "\n[... cut]" if truncated else text


async def call_api(http: httpx.AsyncClient, url: str, access_token: str) -> ApiAnswer:
    """``GET url`` with ``Authorization: Bearer``; the body read up to MAX_SHOWN."""
    request = httpx.Request(
        "GET", url, headers={"Authorization": f"Bearer {access_token}", "Accept": "*/*"}
    )
    try:
        response = await http.send(request, stream=True)
    except httpx.HTTPError as exc:
        return ApiAnswer(None, f"no answer from {url}: {type(exc).__name__}")
    body = bytearray()
    truncated = False
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_SHOWN:
                del body[MAX_SHOWN:]
                truncated = True
                break
    except httpx.HTTPError as exc:
        return ApiAnswer(None, f"the answer from {url} broke off: {type(exc).__name__}")
    finally:
        await response.aclose()
    content_type = response.headers.get("content-type", "")
    step_up = None
    if response.status_code == 401:
        step_up = step_up_of(response.headers.get("www-authenticate"))
    return ApiAnswer(
        response.status_code, shown(bytes(body), content_type, truncated), step_up=step_up
    )
